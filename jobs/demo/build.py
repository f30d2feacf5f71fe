"""Builds the bundled demo zoo: trains small models on scikit-learn's digits and writes a zoo folder.

Owns ``build_demo`` (checkpoints, calibration shards, ``zoo.yaml`` and ``zoo-tests.yaml``) and
``digits_split`` (the deterministic train / held-out split both the build and the tests use).
The digits data set ships inside scikit-learn, so building needs no network.
Must not import ray, click or torch.ao (it trains fp32 models; converting them is the CLI's job).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from jobs.demo.models import DEMO_MODELS, FLAT_INPUT_MODELS, TEST_MODELS
from quantizer.calibration import write_calibration

N_TRAIN = 1500          # of 1797 digits; the other 297 are held out (calibration + evaluation)
ROWS_PER_SHARD = 128
IMAGE_CALIB, FLAT_CALIB = "calib/images", "calib/flat"


@dataclass(frozen=True)
class DigitsSplit:
    """Digits scaled to [0, 1] as float32 ``[N, 1, 8, 8]`` images with int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    held_x: np.ndarray
    held_y: np.ndarray


def digits_split(seed: int = 0) -> DigitsSplit:
    """The demo's train / held-out split of scikit-learn's bundled digits.

    Args:
        seed: seeds the shuffle; the same seed gives the same split.

    Returns:
        A ``DigitsSplit`` of 1500 training and 297 held-out images.
    """
    from sklearn.datasets import load_digits  # optional dependency ("demo" extra)

    digits = load_digits()
    # reshape, not [:, None]: a None axis gets stride 0, and pyarrow reads odd strides as a
    # permuted tensor layout when the shards are written
    images = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    order = np.random.RandomState(seed).permutation(len(labels))
    train, held = order[:N_TRAIN], order[N_TRAIN:]
    return DigitsSplit(images[train], labels[train], images[held], labels[held])


def model_input(name: str, images: torch.Tensor) -> torch.Tensor:
    """The input a demo model expects: ``[B, 64]`` for flat-input models, else ``[B, 1, 8, 8]``."""
    return images.reshape(len(images), -1) if name in FLAT_INPUT_MODELS else images


def logits_of(output) -> torch.Tensor:
    """The logits of a model output (``TupleOutputCNN`` returns ``(logits, features)``)."""
    return output[0] if isinstance(output, tuple) else output


def accuracy(model: nn.Module, name: str, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` (in eval mode, no grad) on ``images`` ``[N, 1, 8, 8]``."""
    model.eval()
    with torch.no_grad():
        out = logits_of(model(model_input(name, torch.from_numpy(images))))
    return float((out.argmax(1) == torch.from_numpy(labels)).float().mean())


def train(model: nn.Module, name: str, split: DigitsSplit, *, epochs: int, seed: int) -> float:
    """Train ``model`` in place with Adam and a one-cycle schedule; return held-out accuracy."""
    gen = torch.Generator().manual_seed(seed)
    x = model_input(name, torch.from_numpy(split.train_x))
    y = torch.from_numpy(split.train_y)
    batch = 50
    steps = epochs * (len(y) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(len(y) // batch):
            idx = order[i * batch:(i + 1) * batch]
            opt.zero_grad()
            loss_fn(logits_of(model(x[idx])), y[idx]).backward()
            opt.step()
            sched.step()
    return accuracy(model, name, split.held_x, split.held_y)


def build_demo(dest: str, *, epochs: int = 8, seed: int = 0, verbose: bool = True) -> str:
    """Train the demo models and write a ready-to-convert zoo folder (overwriting a previous one).

    Writes ``dest/ckpt/NAME.pt`` (``state_dict`` only), calibration shards of the held-out digits
    in ``dest/calib/images/`` (``[1, 8, 8]``) and ``dest/calib/flat/`` (``[64]``), ``dest/zoo.yaml``
    (the demo) and ``dest/zoo-tests.yaml`` (adds models whose int8 rows are expected to fail).

    Args:
        dest: a local folder; created if missing.
        epochs: training epochs per model.
        seed: seeds the split and each model's initialisation and shuffling.
        verbose: print each model's held-out accuracy and time.

    Returns:
        The path of ``dest/zoo.yaml``.

    Raises:
        RuntimeError: a model trained below 90% held-out accuracy (the demo would be misleading).
    """
    split = digits_split(seed)
    os.makedirs(os.path.join(dest, "ckpt"), exist_ok=True)
    threads = torch.get_num_threads()
    # these models are so small that intra-op threads cost more than they save
    # (ResidualCNN trains ~6x slower on 2 threads than on 1)
    torch.set_num_threads(1)
    try:
        for offset, (name, (cls, kwargs)) in enumerate({**DEMO_MODELS, **TEST_MODELS}.items()):
            torch.manual_seed(seed * 1000 + offset)   # the initial weights
            model = cls(**kwargs)
            _train_and_save(dest, name, model, split, epochs, seed * 1000 + offset, verbose)
    finally:
        torch.set_num_threads(threads)
    _write_calibration_sets(dest, split)
    _write_text(os.path.join(dest, "zoo-tests.yaml"), TESTS_ZOO)
    zoo = os.path.join(dest, "zoo.yaml")
    _write_text(zoo, DEMO_ZOO)
    return zoo


def _train_and_save(dest: str, name: str, model: nn.Module, split: DigitsSplit, epochs: int,
                    seed: int, verbose: bool) -> None:
    start = time.perf_counter()
    acc = train(model, name, split, epochs=epochs, seed=seed)
    if verbose:
        print(f"{name:18s} held-out accuracy {acc:6.1%}  ({time.perf_counter() - start:.1f} s)")
    if acc < 0.9:
        raise RuntimeError(f"{name}: held-out accuracy {acc:.1%} < 90%; raise --epochs")
    torch.save(model.state_dict(), os.path.join(dest, "ckpt", f"{name}.pt"))


def _write_calibration_sets(dest: str, split: DigitsSplit) -> None:
    for folder, inputs in ((IMAGE_CALIB, split.held_x), (FLAT_CALIB, split.held_x.reshape(-1, 64))):
        path = os.path.join(dest, folder)
        # a rebuild must not leave shards of an older, larger build behind
        shutil.rmtree(path, ignore_errors=True)
        write_calibration(path, inputs, split.held_y, rows_per_shard=ROWS_PER_SHARD, fmt="arrow")


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# Written by hand rather than yaml.dump: the comments are the point (users copy this file).
_DEFAULTS = """\
defaults:                         # every key is optional; a model's own keys override these
  precisions: [fp16, int8]
  backend: fbgemm                 # x86 server kernels; qnnpack for ARM
  calibration:                    # merged key by key with a model's own `calibration`
    data: calib/images/           # Arrow IPC shards of held-out digits, [1, 8, 8] float32 in [0, 1]
    batches: 10
    batch_size: 16
  min_sqnr_db: 15                 # an int8 model below 15 dB SQNR against fp32 is failed, not shipped
"""

_DEMO_MODELS = """\
models:
  - name: residual-cnn            # conv-bn-relu blocks with residual adds
    factory: jobs.demo.models:ResidualCNN
    kwargs: {num_classes: 10, width: 48}
    checkpoint: ckpt/residual-cnn.pt   # a state_dict, loaded with torch.load(weights_only=True)

  - name: digits-mlp              # plain MLP on the flattened image
    factory: jobs.demo.models:DigitsMLP
    kwargs: {num_classes: 10, hidden: 320}
    checkpoint: ckpt/digits-mlp.pt
    calibration: {data: calib/flat/}   # takes [B, 64]: the same digits, flattened

  - name: depthwise-cnn           # MobileNet-style depthwise-separable convolutions
    factory: jobs.demo.models:DepthwiseCNN
    kwargs: {num_classes: 10, width: 384, stem_stride: 2}
    checkpoint: ckpt/depthwise-cnn.pt
"""

_GATED = """\
  # GatedCNN's forward branches on the data (`if x.mean() > threshold:`), which torch.fx cannot
  # trace, so FX int8 quantization is impossible: only fp16 is offered.
  - name: gated-cnn
    factory: jobs.demo.models:GatedCNN
    kwargs: {num_classes: 10, width: 16}
    checkpoint: ckpt/gated-cnn.pt
    precisions: [fp16]
"""

_TESTS_EXTRA = """\
  # Everything below is for tests: these int8 rows are expected to fail while the others go on.
  - name: gated-cnn               # int8: failed, TraceError (data-dependent `if` in forward)
    factory: jobs.demo.models:GatedCNN
    kwargs: {num_classes: 10, width: 16}
    checkpoint: ckpt/gated-cnn.pt
    precisions: [fp16, int8]

  - name: lstm-classifier         # int8: failed, NotQuantizedError (FX leaves nn.LSTM in float)
    factory: jobs.demo.models:LSTMClassifier
    kwargs: {num_classes: 10, hidden: 64}
    checkpoint: ckpt/lstm-classifier.pt

  - name: tuple-output-cnn        # returns (logits, features): fidelity must handle tuple outputs
    factory: jobs.demo.models:TupleOutputCNN
    kwargs: {num_classes: 10, width: 96}
    checkpoint: ckpt/tuple-output-cnn.pt
    fidelity: {output: 0}         # the class scores (top-1 agreement is measured on them only)
"""

DEMO_ZOO = ("# The bundled demo zoo: small models trained on scikit-learn's digits (8x8 grey, 10 classes).\n"
            "# Rebuild with `python -m jobs.demo build DEST`; convert with `quantize-all DEST/zoo.yaml --out OUT`.\n"
            + _DEFAULTS + "\n" + _DEMO_MODELS + "\n" + _GATED)
TESTS_ZOO = ("# The demo zoo plus models whose int8 rows must fail (used by the tests). Paths are relative\n"
             "# to this file. Not a demo: `quantize-all` exits 1 on it by design.\n"
             + _DEFAULTS + "\n" + _DEMO_MODELS + "\n" + _TESTS_EXTRA)
