"""Shared helpers of the real-model tests: artifact recipes, a round trip through an artifact,
and a summary of what was measured, printed at the end of the run (the numbers are the point:
low fidelity is reported, not hidden)."""

from __future__ import annotations

import torch
from torch import nn

from quantizer.artifacts import load_artifact, save_artifact

MEASURED: list[str] = []


def report(line: str) -> None:
    """Add a line to the "real-model measurements" section of pytest's summary."""
    MEASURED.append(line)


def pytest_terminal_summary(terminalreporter) -> None:
    if MEASURED:
        terminalreporter.section("real-model measurements (tests/real)")
        for line in MEASURED:
            terminalreporter.write_line(line)


def round_trip(model: nn.Module, folder, precision: str, factory: str, shape: list[int],
               kwargs: dict | None = None, example=None, **extra) -> nn.Module:
    """Save ``model`` as an artifact and load it back with the factory pinned (fingerprint checked).

    ``example=None`` skips the TorchScript copy (it costs three forwards: slow for CPU fp16).
    """
    recipe = {"precision": precision, "factory": factory, "kwargs": dict(kwargs or {}),
              "input_shape": list(shape),
              "input_dtype": "float16" if precision == "fp16" else "float32", **extra}
    save_artifact(model, folder, recipe, example)
    return load_artifact(folder, factory=factory, kwargs=dict(kwargs or {}))


def same_outputs(a, b) -> bool:
    from quantizer.fidelity import flatten_outputs

    return all(torch.equal(x, y) for x, y in zip(flatten_outputs(a), flatten_outputs(b)))
