"""Fidelity of a converted model against its fp32 source: SQNR, top-1 agreement, latency.

Owns ``sqnr_db`` (pooled) and ``sqnr_db_per_output``, ``top1_output`` (which output holds class
scores) and ``top1_agreement``, ``measure_latency_ms`` and ``flatten_outputs``. Pure torch:
must not import torch.ao.quantization, ray, click or ``jobs``.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Flatten a model output into a list of tensors, in a stable order.

    Args:
        out: a tensor, or a (nested) tuple/list/dict of tensors; dicts are walked in key order
            so that two outputs of the same model line up.

    Returns:
        The tensors, depth first.

    Raises:
        TypeError: an element is neither a tensor nor a container of tensors.
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out, key=str) for t in flatten_outputs(out[key])]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in flatten_outputs(item)]
    raise TypeError(f"model output must be tensors (or tuples/lists/dicts of them), got {type(out)!r}")


def _paired(reference: Any, test: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    refs, tests = flatten_outputs(reference), flatten_outputs(test)
    if len(refs) != len(tests):
        raise ValueError(f"outputs differ in structure: {len(refs)} tensors vs {len(tests)}")
    for index, (ref, out) in enumerate(zip(refs, tests)):
        if ref.shape != out.shape:
            raise ValueError(f"output {index} differs in shape: {tuple(ref.shape)} vs {tuple(out.shape)}")
    return list(zip(refs, tests))


def _sqnr(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    signal = noise = 0.0
    for ref, out in pairs:
        ref32 = ref.detach().to(torch.float32)
        diff = ref32 - out.detach().to(torch.float32)
        signal += float(ref32.pow(2).sum())
        noise += float(diff.pow(2).sum())
    if math.isnan(signal) or math.isnan(noise):
        return float("nan")
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)  # 10*log10 of power == 20*log10 of norm


def sqnr_db(reference: Any, test: Any) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB.

    ``20 * log10(||ref|| / ||ref - test||)`` over all output tensors at once; both sides are cast
    to float32 first, so fp16 and dequantized int8 outputs compare directly.

    Args:
        reference: the fp32 model's output (tensor, or tuple/list/dict of tensors).
        test: the converted model's output, same structure and shapes.

    Returns:
        The SQNR in dB; ``inf`` if the outputs are identical, ``-inf`` if the reference is all
        zeros and the test is not.

    Raises:
        ValueError: the outputs differ in structure or shape.
    """
    return _sqnr(_paired(reference, test))


def sqnr_db_per_output(reference: Any, test: Any) -> list[float]:
    """``sqnr_db`` of each output tensor alone, in ``flatten_outputs`` order.

    A model whose outputs differ in scale (MTCNN: box offsets, probabilities) can hide a broken
    small output in the pooled figure; this one cannot.

    Raises:
        ValueError: the outputs differ in structure or shape.
    """
    return [_sqnr([pair]) for pair in _paired(reference, test)]


def top1_output(outputs: Any, output: int | None = None) -> int | None:
    """Which output (``flatten_outputs`` index) holds class scores, for top-1 agreement.

    Args:
        outputs: a model's output (tensor, or tuple/list/dict of tensors).
        output: the index the zoo names (``fidelity: {output: N}``), checked to exist; None: the
            default rule, which picks output 0 only when the model has exactly one output
            tensor and it is 2-D (``[batch, classes]``).

    Returns:
        The index, or None when no output counts as class scores by default.

    Raises:
        ValueError: ``output`` is not the index of an output tensor.
    """
    tensors = flatten_outputs(outputs)
    if output is None:
        return 0 if len(tensors) == 1 and tensors[0].dim() == 2 else None
    if isinstance(output, bool) or not isinstance(output, int) or not 0 <= output < len(tensors):
        shapes = ", ".join(f"{i}: {list(t.shape)}" for i, t in enumerate(tensors))
        raise ValueError(f"fidelity output {output!r} is not an output index; the model's "
                         f"outputs are {shapes}")
    return output


def top1_agreement(reference: Any, test: Any, output: int | None = None, *, dim: int = -1) -> float:
    """Share of rows whose argmax over the class dimension agrees, on one output tensor.

    Args:
        reference: the fp32 model's output.
        test: the converted model's output, same structure.
        output: index (``flatten_outputs`` order) of the class-score output; None: the one
            ``top1_output`` picks by default.
        dim: the class dimension of that output (every other dimension counts rows), e.g. 1
            for a ``[B, C, H, W]`` map of per-pixel scores.

    Returns:
        A fraction in [0, 1].

    Raises:
        ValueError: no output is class scores by default (pass ``output``), a bad index, or the
            compared tensors differ in shape or are empty.
    """
    index = top1_output(reference, output)
    if index is None:
        shapes = [list(t.shape) for t in flatten_outputs(reference)]
        raise ValueError(f"no output counts as class scores by default (outputs {shapes}; the "
                         f"default needs exactly one [batch, classes] tensor): name it with "
                         f"output=N (zoo: fidelity: {{output: N}})")
    ref, out = _paired(reference, test)[index]
    if ref.numel() == 0:
        raise ValueError("cannot compare empty outputs")
    agree = ref.detach().float().argmax(dim=dim) == out.detach().float().argmax(dim=dim)
    return float(agree.float().mean())


def measure_latency_ms(
    model: nn.Module,
    inputs: Any,
    *,
    warmup: int = 2,
    repeats: int = 10,
    budget_s: float = 5.0,
) -> float:
    """Median wall-clock milliseconds of one forward pass, within a time budget.

    Runs under ``torch.inference_mode`` with the caller's thread count, so two models measured in
    the same process compare fairly. Warm-up runs are not timed. Once ``budget_s`` is spent
    (warm-up included) no further run starts, but at least one run is always timed: a slow model
    (fp16 on a CPU) still gets a number instead of stalling a batch.

    Args:
        model: the model to time; its mode is left as it is.
        inputs: a tensor, or a tuple/list of positional input tensors.
        warmup: untimed runs first.
        repeats: timed runs at most.
        budget_s: wall-clock budget in seconds.

    Returns:
        The median of the timed runs, in milliseconds.
    """
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    deadline = time.perf_counter() + budget_s
    timings: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            if time.perf_counter() >= deadline:
                break
            model(*args)
        for _ in range(max(1, repeats)):
            if timings and time.perf_counter() >= deadline:
                break
            start = time.perf_counter()
            model(*args)
            timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)
