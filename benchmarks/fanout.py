"""Fan-out benchmark: 16 ResNet-18-scale CNNs to fp16 + int8, quantize-all against a for-loop.

Run (from the repo root; on a sandbox without network use the ``unshare -n`` form, see
docs/performance.md)::

    .venv/bin/python -m benchmarks.fanout            # full: 16 models, 10 calibration batches
    .venv/bin/python -m benchmarks.fanout --quick    # smoke: 4 models, 2 batches, 1 repeat

Baseline: the loop a user writes instead, in one fresh process (torch at its default thread
count): load each checkpoint, ``to_fp16``, ``to_int8``, ``torch.save``. Contender: the real
``quantize-all`` command in a subprocess, starting its own local Ray on all cores; its wall time
includes Python and Ray start-up and the per-row measurements (fidelity, latency) the loop skips.
The two alternate, repeat after repeat, and the medians are compared. Owns nothing the product
uses; must not import ray or jobs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks import harness
from benchmarks.models import ARCHS, INPUT_SHAPE

BATCH_SIZE = 8
HELD_OUT = 64     # rows the tasks use for fidelity and latency (jobs.task.FIDELITY_ROWS)


def build_zoo(folder: str, archs: list[str], batches: int) -> str:
    """Checkpoints (seeded random weights), one Arrow calibration file, zoo.yaml; returns its path."""
    import torch

    import quantizer
    from benchmarks.models import build

    os.makedirs(os.path.join(folder, "ckpt"), exist_ok=True)
    for i, arch in enumerate(archs):
        torch.manual_seed(i)
        torch.save(build(arch).state_dict(), os.path.join(folder, "ckpt", f"{arch}.pt"))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batches * BATCH_SIZE + HELD_OUT, *INPUT_SHAPE, generator=gen)
    quantizer.write_calibration(os.path.join(folder, "calib", "images.arrow"), images,
                                torch.zeros(len(images), dtype=torch.int64))
    models = [{"name": a, "factory": "benchmarks.models:build", "kwargs": {"arch": a},
               "checkpoint": f"ckpt/{a}.pt"} for a in archs]
    defaults = {"precisions": ["fp16", "int8"], "backend": "fbgemm",
                "calibration": {"data": "calib/images.arrow", "batches": batches,
                                "batch_size": BATCH_SIZE}}
    return harness.write_zoo(os.path.join(folder, "zoo.yaml"), models, defaults)


def baseline(zoo_path: str, out: str) -> None:
    """The user's loop (run in its own process by ``--baseline``): no Ray, no measurements."""
    import torch
    import yaml

    import quantizer
    from benchmarks.models import build

    folder = os.path.dirname(os.path.abspath(zoo_path))
    with open(zoo_path) as f:
        zoo = yaml.safe_load(f)
    cal = zoo["defaults"]["calibration"]
    calib = quantizer.read_calibration(os.path.join(folder, cal["data"]), batch_size=cal["batch_size"])
    os.makedirs(out, exist_ok=True)
    for entry in zoo["models"]:
        model = build(**entry["kwargs"])
        model.load_state_dict(torch.load(os.path.join(folder, entry["checkpoint"]), weights_only=True))
        model.eval()
        torch.save(quantizer.to_fp16(model).state_dict(), os.path.join(out, f"{entry['name']}.fp16.pt"))
        int8 = quantizer.to_int8(model, calib, calibration_batches=cal["batches"])
        torch.save(int8.state_dict(), os.path.join(out, f"{entry['name']}.int8.pt"))


def _task_seconds(summary: dict) -> dict:
    rows = [r for r in summary["rows"] if r["status"] == "ok"]
    by = {p: sum(r["duration_s"] or 0 for r in rows if r["precision"] == p) for p in ("fp16", "int8")}
    return {"fp16": by["fp16"], "int8": by["int8"], "total": by["fp16"] + by["int8"],
            "failed": sum(r["status"] == "failed" for r in summary["rows"])}


def measure(zoo: str, work: str, repeats: int, scaling: bool) -> dict:
    base_walls, qa_walls, tasks = [], [], []
    for i in range(repeats):
        b = harness.run_timed([sys.executable, "-m", "benchmarks.fanout", "--baseline", zoo,
                               os.path.join(work, f"loop-{i}")])
        if b.returncode:
            raise RuntimeError(f"baseline loop failed:\n{b.stderr[-3000:]}")
        base_walls.append(b.wall_s)
        q = harness.run_cli(zoo, os.path.join(work, f"qa-{i}"))
        qa_walls.append(q.wall_s)
        tasks.append(_task_seconds(q.json()))
        print(f"repeat {i + 1}/{repeats}: loop {b.wall_s:.1f} s, quantize-all {q.wall_s:.1f} s "
              f"(task seconds fp16 {tasks[-1]['fp16']:.1f}, int8 {tasks[-1]['int8']:.1f})",
              file=sys.stderr, flush=True)
    figures = {"baseline_wall_s": harness.median(base_walls),
               "quantize_all_wall_s": harness.median(qa_walls)}
    figures["ratio"] = figures["baseline_wall_s"] / figures["quantize_all_wall_s"]
    figures["ray_startup_s"] = harness.ray_startup_s()
    total = harness.median([t["total"] for t in tasks])
    figures.update(task_seconds_fp16=harness.median([t["fp16"] for t in tasks]),
                   task_seconds_int8=harness.median([t["int8"] for t in tasks]),
                   task_seconds_total=total, failed_rows=max(t["failed"] for t in tasks))
    cores = os.cpu_count() or 1
    # wall ~ fixed (interpreter, Ray, plan, report) + task seconds / cores: what is left over
    figures["fixed_s"] = figures["quantize_all_wall_s"] - total / cores
    for n in (4, 8, 16):
        figures[f"projected_ratio_{n}_cores"] = figures["baseline_wall_s"] / (figures["fixed_s"] + total / n)
    if scaling:
        one = harness.run_cli(zoo, os.path.join(work, "qa-1cpu"), "--num-cpus", "1")
        figures["quantize_all_wall_1cpu_s"] = one.wall_s
        figures["ratio_1cpu"] = figures["baseline_wall_s"] / one.wall_s
    figures["repeats"] = repeats
    return figures


def _main(args, work: str) -> int:
    if args.baseline:
        baseline(*args.baseline)
        return 0
    archs = list(ARCHS)[:4] if args.quick else list(ARCHS)
    batches = 2 if args.quick else 10
    repeats = args.repeats or (1 if args.quick else 3)
    machine = harness.start_figures()
    t0 = time.perf_counter()
    zoo = build_zoo(os.path.join(work, "zoo"), archs, batches)
    print(f"zoo of {len(archs)} models built in {time.perf_counter() - t0:.1f} s: {zoo}", file=sys.stderr)
    figures = {"models": len(archs), "calibration_batches": batches, **machine}
    figures.update(measure(zoo, work, repeats, scaling=not (args.quick or args.no_scaling)))
    figures["target_ratio_met"] = figures["ratio"] >= 1.7
    harness.print_figures(figures)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 models, 2 batches, 1 repeat")
    parser.add_argument("--repeats", type=int, help="alternating repeats (default 3, quick 1)")
    parser.add_argument("--no-scaling", action="store_true",
                        help="skip the extra quantize-all run with --num-cpus 1")
    parser.add_argument("--workdir", help="keep the zoo and outputs here (default: a temp dir)")
    parser.add_argument("--baseline", nargs=2, metavar=("ZOO", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return harness.in_workdir(args, "bench-fanout-", _main)


if __name__ == "__main__":
    sys.exit(main())
