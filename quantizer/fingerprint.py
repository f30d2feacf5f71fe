"""Output fingerprints: what an artifact's model computed on a fixed input, checked on reload.

Owns the fixed input (``ROWS`` rows of uniform [-1, 1) values from Python's ``random.Random(SEED)``,
whose ``random()`` sequence Python keeps stable across versions, so the input is the same
everywhere without storing it), taking a fingerprint (the model's outputs on it, flattened) and
checking a rebuilt model against one. The check passes when every output tensor has the stored
shape, non-finite values in the same places, and an SQNR of at least ``MIN_SQNR_DB`` (40 dB, an
RMS error of 1 % of the RMS output) against the stored one. On the machine that wrote the artifact
a faithful reload is bit-identical; the margin is for other CPUs and thread counts, whose kernels
round differently, while lost state is far below it (MTCNN int8 without its PReLU state:
5.9 / 19.4 / 28.6 dB). Must not import torch.ao, ray, click or ``jobs``.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from torch import nn

from quantizer.errors import ArtifactError
from quantizer.fidelity import flatten_outputs, sqnr_db_per_output

ROWS = 2
SEED = 0
MIN_SQNR_DB = 40.0


def fixed_input(shape: Sequence[int], dtype: torch.dtype, rows: int = ROWS,
                seed: int = SEED) -> torch.Tensor:
    """``[rows, *shape]`` values uniform in [-1, 1), the same on every machine and version."""
    size = [int(rows), *(int(d) for d in shape)]
    count = 1
    for dim in size:
        count *= dim
    draw = random.Random(seed).random
    values = torch.tensor([draw() for _ in range(count)], dtype=torch.float64)
    return (values * 2.0 - 1.0).reshape(size).to(dtype)


def _run(model: nn.Module, shape, dtype, forward_kwargs: dict, rows: int, seed: int) -> list:
    with torch.inference_mode():
        out = model(fixed_input(shape, dtype, rows, seed), **forward_kwargs)
    return [t.detach().clone() for t in flatten_outputs(out)]


def take(model: nn.Module, shape: Sequence[int], dtype: torch.dtype,
         forward_kwargs: dict | None = None) -> dict[str, Any]:
    """The fingerprint of ``model``: its outputs on the fixed input, with how to redo it.

    Returns:
        ``{"rows", "seed", "input_shape", "input_dtype", "forward_kwargs", "outputs"}``.
    """
    kwargs = dict(forward_kwargs or {})
    return {"rows": ROWS, "seed": SEED, "input_shape": [int(d) for d in shape],
            "input_dtype": str(dtype).replace("torch.", ""), "forward_kwargs": kwargs,
            "outputs": _run(model, shape, dtype, kwargs, ROWS, SEED)}


def _mismatch(index: int, stored: torch.Tensor, got: torch.Tensor) -> str:
    if stored.shape != got.shape:
        return f"output {index} has shape {list(got.shape)}, stored {list(stored.shape)}"
    finite = torch.isfinite(stored)
    if not torch.equal(finite, torch.isfinite(got)) or \
            not torch.equal(stored[~finite].float().nan_to_num(0.0), got[~finite].float().nan_to_num(0.0)):
        return f"output {index} has NaN/Inf where the stored output has not (or the reverse)"
    return ""


def check(model: nn.Module, fingerprint: dict[str, Any], name: str) -> list[float]:
    """Compare ``model`` with a stored fingerprint.

    Returns:
        The SQNR of each output against the stored one (``inf``: bit-identical).

    Raises:
        ArtifactError: an output differs in count, shape or non-finite places, or falls below
            ``MIN_SQNR_DB``.
    """
    dtype = getattr(torch, str(fingerprint.get("input_dtype", "float32")))
    stored = list(fingerprint["outputs"])
    got = _run(model, fingerprint["input_shape"], dtype, dict(fingerprint.get("forward_kwargs") or {}),
               int(fingerprint.get("rows", ROWS)), int(fingerprint.get("seed", SEED)))
    problems = [f"{len(got)} outputs, stored {len(stored)}"] if len(got) != len(stored) else \
        [p for i, (s, g) in enumerate(zip(stored, got)) if (p := _mismatch(i, s, g))]
    finite = [(s[torch.isfinite(s)], g[torch.isfinite(s)]) for s, g in zip(stored, got)]
    sqnr = [] if problems else sqnr_db_per_output([s for s, _ in finite], [g for _, g in finite])
    problems += [f"output {i}: {v:.1f} dB SQNR" for i, v in enumerate(sqnr) if not v >= MIN_SQNR_DB]
    if problems:
        raise ArtifactError(
            f"{name}: the rebuilt model does not reproduce the outputs stored with the artifact "
            f"on its fixed input ({'; '.join(problems)}; needed >= {MIN_SQNR_DB:.0f} dB per "
            f"output): state was lost in saving or rebuilding, or the factory's code changed "
            f"since the artifact was written")
    return sqnr
