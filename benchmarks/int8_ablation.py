"""int8 ablation: version 2's steps added one at a time, on the fidelity zoo (docs/fidelity.md).

Run (from the repo root; no Ray; uses the trained checkpoints of ``benchmarks.int8_fidelity``)::

    .venv/bin/python -m benchmarks.int8_ablation --models vit-qkv,vit-mha,swin,convnext,residual-cnn

Steps: A version 1; B LayerNorm, GELU, softmax, matmul float, full range, 7-bit depthwise weights
(with the pass that puts back a dequantize FX drops); C + float residual adds (int8 again between
int8 tensors) and float Linear outputs; D + float ``mul``/``mean`` and no float round trips; E +
LayerNorms FX made int8 run float; F + float outputs of dense convolutions (= version 2). It swaps
``quantizer.int8``'s pass list and float-op list for each step (private names: this is a
measurement of their parts, not an API). SQNR of the logits on 128 held-out rows, fbgemm,
4 calibration batches of 8 rows by default. Figures last, as ``name: value`` lines.
Must not import ray.
"""

from __future__ import annotations

import argparse
import contextlib
import operator
import sys

from benchmarks import harness
from benchmarks.int8_fidelity import DEFAULT_CACHE

# (name, float ops beyond LayerNorm/GELU/softmax/matmul, passes after dequantize_float_inputs)
STEPS = (
    ("A", None, ()),
    ("B", (), ()),
    ("C", ("add",), ("int8_adds", "lower_float_outputs")),
    ("D", ("add", "mul", "mean"), ("int8_adds", "lower_float_outputs", "drop_float_roundtrips")),
    ("E", ("add", "mul", "mean"), ("float_layer_norms", "int8_adds", "lower_float_outputs",
                                   "drop_float_roundtrips")),
    ("F", ("add", "mul", "mean"), ("float_layer_norms", "int8_adds", "lower_float_outputs",
                                   "float_output_convs", "drop_float_roundtrips")),
)


def _float_ops(extra: tuple) -> tuple:
    import torch
    from torch import nn

    ops = {"add": (operator.add, torch.add, "add"), "mul": (operator.mul, torch.mul, "mul"),
           "mean": (torch.mean, "mean")}
    base = (nn.LayerNorm, nn.functional.layer_norm, nn.GELU, nn.functional.gelu, nn.Softmax,
            nn.functional.softmax, "softmax", torch.softmax, torch.matmul, operator.matmul,
            "matmul", torch.bmm, "bmm")
    return base + tuple(op for name in extra for op in ops[name])


@contextlib.contextmanager
def _step(extra: tuple, passes: tuple):
    from quantizer import int8, int8_float_outputs, int8_lowering, int8_qconfig

    def lowered(converted, example, settings):
        int8_lowering.dequantize_float_inputs(converted, example, int8_qconfig.FLOAT_OPS)
        for name in passes:
            step = getattr(int8_lowering, name, None) or getattr(int8_float_outputs, name)
            step(converted)
        return converted

    saved = int8._lowered, int8_qconfig.FLOAT_OPS
    int8._lowered, int8_qconfig.FLOAT_OPS = lowered, _float_ops(extra)
    try:
        yield
    finally:
        int8._lowered, int8_qconfig.FLOAT_OPS = saved


def measure(name: str, args) -> dict:
    import torch

    from benchmarks import fidelity_zoo
    from quantizer import int8
    from quantizer.fidelity import sqnr_db

    model = fidelity_zoo.trained(name, args.cache)
    calib, held = fidelity_zoo.rows(name, args.batches * args.batch_size, 128)
    loader = [(b, None) for b in calib.split(args.batch_size)]
    with torch.no_grad():
        reference = model(held)
    row = {}
    for step, extra, passes in STEPS:
        if extra is None:
            converted = int8.to_int8(model, loader, args.batches, "fbgemm", qconfig_version=1)
        else:
            with _step(extra, passes):
                converted = int8.to_int8(model, loader, args.batches, "fbgemm")
        with torch.no_grad():
            row[step] = sqnr_db(reference, converted(held))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vit-qkv,vit-mha,swin,convnext,residual-cnn")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="trained checkpoints (reused)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    figures = harness.start_figures()
    for name in args.models.split(","):
        row = measure(name, args)
        print(f"{name}: " + " ".join(f"{k}={v:.2f}" for k, v in row.items()), file=sys.stderr)
        figures.update({f"sqnr_{k}.{name}": v for k, v in row.items()})
    harness.print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
