"""The int8 fidelity zoo: trained attention models and CNNs, with the data they were trained on.

Owns ``ZOO`` (name -> ``Entry``: builder, data, training epochs), ``digit_photos`` (the data),
``train`` (any model, on it), ``trained`` (a zoo model trained on it, cached on disk) and ``rows``
(the calibration and held-out rows every tool sees). Seeded initialisation is not enough for
attention fidelity questions (softmax inputs, LayerNorm statistics and residual-stream ranges of a
random net are nothing like a trained one's), so every model is trained for a few epochs on real,
bundled data: scikit-learn's digits added in a bright random colour onto dimmed random crops of
scikit-learn's two sample photographs (``digit_photos``, 32x32 or 64x64 RGB, 10 classes), or the
plain 8x8 digits for the demo's CNNs. Must not import ray or torch.ao (the int8 engine in
``quantizer`` is its only home); imports ``jobs.demo.models`` for the demo CNNs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from benchmarks import attention_models, models
from jobs.demo import models as demo_models

N_TRAIN = 1500            # of sklearn's 1797 digits; the other 297 are held out
DATA_VERSION = 1          # bump when digit_photos changes: it invalidates the cache
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Entry:
    """One zoo model: how to build it, which data it reads, how long it trains."""

    build: Callable[[], nn.Module]
    data: str                       # "photo32", "photo64" or "digits8"
    epochs: int
    lr: float = 1e-3
    kind: str = "cnn"               # "attention" or "cnn": which target applies
    spec: dict = field(default_factory=dict)   # what the cache key hashes besides the name


def _attention(arch: str, epochs: int, **kwargs) -> Entry:
    return Entry(lambda: attention_models.build(arch, **kwargs), "photo32", epochs, 2e-3,
                 "attention", {"arch": arch, **kwargs})


def _cnn(arch: str, data: str, epochs: int) -> Entry:
    return Entry(lambda: models.build(arch, num_classes=10), data, epochs, 2e-3, "cnn",
                 {"arch": arch})


def _demo(name: str, epochs: int = 10) -> Entry:
    cls, kwargs = demo_models.DEMO_MODELS[name]
    return Entry(lambda: cls(**kwargs), "digits8", epochs, 2e-3, "cnn", {"demo": name, **kwargs})


ZOO: dict[str, Entry] = {
    "vit-mha": _attention("vit-mha", 10),
    "vit-qkv": _attention("vit-qkv", 10),
    "convnext": _attention("convnext", 6),
    "swin": _attention("swin", 8),
    "resnet18": _cnn("resnet18", "photo64", 2),
    "mobilenet-wide": _cnn("mobilenet-wide", "photo32", 2),
    "mobilenet-hswish-se": _cnn("mobilenet-hswish-se", "photo32", 2),
    "residual-cnn": _demo("residual-cnn"),
    "depthwise-cnn": _demo("depthwise-cnn"),
}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.RandomState(0).permutation(len(data.target))
    return (data.images[order] / 16.0).astype(np.float32), data.target[order].astype(np.int64)


def _photo_crops(count: int, size: int, rng: np.random.RandomState) -> torch.Tensor:
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255
              for p in load_sample_images().images]
    crops = []
    for _ in range(count):
        photo = photos[rng.randint(len(photos))]
        side = rng.randint(size, min(photo.shape[1:]) // 2)
        top, left = rng.randint(photo.shape[1] - side), rng.randint(photo.shape[2] - side)
        crops.append(photo[:, top:top + side, left:left + side])
    return torch.stack([nn.functional.interpolate(c[None], size=(size, size), mode="area")[0]
                        for c in crops])


def digit_photos(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits, each drawn in a random colour over a random crop of a sample photograph.

    Args:
        size: image side (32 or 64).

    Returns:
        ``(x, y)``: float32 ``[1797, 3, size, size]`` normalised with the ImageNet mean and std,
        and int64 labels; the first ``N_TRAIN`` rows are for training, the rest held out.
    """
    images, labels = _digits()
    rng = np.random.RandomState(size)
    ink = nn.functional.interpolate(torch.from_numpy(images)[:, None], size=(size, size),
                                    mode="bilinear", align_corners=False).clamp(0, 1)
    colour = torch.from_numpy(rng.uniform(0.5, 1, (len(labels), 3, 1, 1)).astype(np.float32))
    # a dimmed photograph with the digit added in a bright colour: always legible
    x = (0.5 * _photo_crops(len(labels), size, rng) + ink * colour).clamp(0, 1)
    x = (x - torch.tensor(_MEAN)[:, None, None]) / torch.tensor(_STD)[:, None, None]
    return x.contiguous(), torch.from_numpy(labels)


def data(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole data set a zoo entry reads: ``photo32``, ``photo64`` or ``digits8``."""
    if kind == "digits8":
        images, labels = _digits()
        return torch.from_numpy(images)[:, None].contiguous(), torch.from_numpy(labels)
    return digit_photos(int(kind.removeprefix("photo")))


def train(model: nn.Module, kind: str, epochs: int, lr: float = 2e-3, rows: int = N_TRAIN) -> nn.Module:
    """Train ``model`` on the first ``rows`` training rows of data set ``kind`` (seeded AdamW,
    one-cycle schedule, batches of 64); returns it in eval mode."""
    x, y = data(kind)
    _train(model, x[:min(rows, N_TRAIN)], y[:min(rows, N_TRAIN)], epochs, lr)
    return model


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(x) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            index = order[start:start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
            schedule.step()
    model.eval()


def _cache_path(cache: str, name: str, entry: Entry) -> str:
    spec = {"name": name, "data": entry.data, "data_version": DATA_VERSION, "epochs": entry.epochs,
            "lr": entry.lr, "torch": torch.__version__.split("+")[0], **entry.spec}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache, f"{name}-{digest}.pt")


def trained(name: str, cache: str | None = None, epochs: int | None = None) -> nn.Module:
    """Zoo model ``name`` trained on its data (eval mode); loaded from ``cache`` when there.

    Args:
        name: a key of ``ZOO``.
        cache: a folder for trained state_dicts (created), or None to always train.
        epochs: override the entry's epochs (tests train shorter).

    Returns:
        The trained float32 model.
    """
    entry = ZOO[name]
    if epochs is not None:
        entry = Entry(entry.build, entry.data, epochs, entry.lr, entry.kind, entry.spec)
    torch.manual_seed(0)
    model = entry.build()
    path = _cache_path(cache, name, entry) if cache else None
    if path and os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    x, y = data(entry.data)
    _train(model, x[:N_TRAIN], y[:N_TRAIN], entry.epochs, entry.lr)
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    return model


def rows(name: str, calibration: int = 32, held_out: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration rows (from the training split) and held-out rows of zoo entry ``name``."""
    x, _ = data(ZOO[name].data)
    return x[:calibration], x[N_TRAIN:N_TRAIN + held_out]


def accuracy(model: nn.Module, name: str) -> float:
    """Top-1 accuracy of ``model`` on all held-out rows of ``name``'s data."""
    x, y = data(ZOO[name].data)
    with torch.no_grad():
        return float((model(x[N_TRAIN:]).argmax(1) == y[N_TRAIN:]).float().mean())
