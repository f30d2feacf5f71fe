"""Tiny models and zoo-building helpers for the fault and bad-input tests.

Owns the test-only factories that Ray workers import (``tests.jobs.fault_models:...``): a small
MLP, one whose forward stops at a *gate* the first time it runs (so a test can SIGKILL the worker
or remove its node while a conversion is in flight), one that is not FX-traceable, an LSTM, models
returning a tuple or a dict, one finite in fp32 that overflows fp16, a factory that raises past
``except Exception``, and a factory that needs more memory than a node has. Workers import
this module through PYTHONPATH = the repository root (see docs/reliability.md).
Must not import ray, click or jobs.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

IN_FEATURES = 16


@torch.fx.wrap
def gate(x: torch.Tensor, marker: str, seconds: float) -> torch.Tensor:
    """On the first call for ``marker`` (across every process): write our PID there, then sleep.

    ``torch.fx.wrap`` keeps it a call in the traced graph, so it also runs during int8
    calibration. A retried task finds the marker and passes straight through.
    """
    if marker and not os.path.exists(marker):
        tmp = f"{marker}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, marker)
        time.sleep(seconds)
    return x


class TinyMLP(nn.Module):
    """``[B, 16] -> [B, 4]``: Linear, ReLU, Linear (int8-friendly). ``width`` sets its size."""

    def __init__(self, width: int = 32, marker: str = "", seconds: float = 0.0):
        super().__init__()
        self.marker, self.seconds = marker, float(seconds)
        self.fc1 = nn.Linear(IN_FEATURES, width)
        self.fc2 = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gate(x, self.marker, self.seconds)
        return self.fc2(torch.relu(self.fc1(x)))


class Untraceable(TinyMLP):
    """Data-dependent control flow: torch.fx cannot trace it (int8 must fail with TraceError)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:
            h = h * 2
        return self.fc2(h)


class SeqLSTM(nn.Module):
    """Reads ``[B, 16]`` as 4 steps of 4 values through an ``nn.LSTM`` (static int8 leaves it float)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.lstm = nn.LSTM(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.reshape(x.shape[0], 4, 4))
        return self.head(out[:, -1])


class TupleOut(TinyMLP):
    """Returns ``(logits, hidden)``."""

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.fc1(x))
        return self.fc2(h), h


class DictOut(TinyMLP):
    """Returns ``{"logits": ..., "hidden": ...}``."""

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.fc1(x))
        return {"logits": self.fc2(h), "hidden": h}


class Overflows(TinyMLP):
    """Finite in fp32, but its hidden activations (~1e5) overflow fp16's 65504: inf in fp16."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.fc1.weight.fill_(1000.0)
            self.fc1.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.abs() * 8)))


class NotAnException(BaseException):
    """Raised past every ``except Exception``: the task itself fails, and Ray does not retry."""


def raises_base_exception() -> nn.Module:
    raise NotAnException("a factory that escapes the task's error handling")


def memory_hog(gib: float = 64.0) -> nn.Module:
    """A factory that touches ``gib`` GiB before it returns (a model far larger than the node).

    Allocates in 256 MiB steps and writes every page, so the node's memory really fills and Ray's
    memory monitor (or Python's MemoryError) stops it long before ``gib`` is reached.
    """
    hoard = []
    for _ in range(int(gib * 4)):
        block = np.empty(256 << 20, dtype=np.uint8)
        block.fill(1)
        hoard.append(block)
    return TinyMLP()


class _RunsCode:
    """Unpickling this calls ``os.system`` (a hostile checkpoint)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_checkpoint(path: str, marker: str) -> None:
    """Write a torch file whose unpickling would create ``marker`` (it must never appear)."""
    state = TinyMLP().state_dict()
    state["payload"] = _RunsCode(marker)
    torch.save(state, path)


def write_checkpoint(path, model: nn.Module | None = None, seed: int = 0) -> nn.Module:
    """Save a ``TinyMLP`` (or ``model``) state_dict to ``path``; return the model."""
    torch.manual_seed(seed)
    model = model if model is not None else TinyMLP()
    torch.save(model.state_dict(), str(path))
    return model


def write_calib(folder, rows: int = 96, seed: int = 0, *, features: int = IN_FEATURES,
                fill: float | None = None) -> str:
    """A calibration shard of ``rows`` random ``[features]`` rows; ``fill`` sets every value."""
    from quantizer import write_calibration

    rng = np.random.RandomState(seed)
    x = rng.randn(rows, features).astype(np.float32)
    if fill is not None:
        x[:] = fill
    write_calibration(str(folder), x, rng.randint(0, 4, size=rows).astype(np.int64))
    return str(folder)
