"""How much a split sensitivity pass gains: one process against two chunks in two processes.

For each model: the per-layer sensitivity pass (``quantizer.sensitivity``) run as ONE task in one
warm worker process, then split into TWO tasks run at once in two warm worker processes (each
worker one torch thread, started and warmed before timing, as Ray's workers are), and the ratio
of the two wall times; shipping the task (fp32 model, calibrated observers' statistics,
held-out rows) and merging are inside both timings. Beside it, the CPU seconds of the busiest
chunk against the one-chunk pass's: the ratio two idle cores would give, which a loaded shared
machine hides. Then a full ``tune_int8`` with ``min_sqnr_db`` whose
sensitivity chunks go to the same two workers: its time, trials and layers kept float. For the
static models, the pass is also run with a real conversion per unit instead of the simulator:
the CPU seconds of both and the largest SQNR difference between them.

    python -m benchmarks.sensitivity [--model NAME ...] [--repeats 3] [--min-sqnr-db 20] [--quick]

Models: ``mtcnn-onet`` (static, simulated), ``speaker-encoder`` (dynamic, converted),
``resnet18`` (benchmarks.models, 64x64, static, simulated; random weights, calibrated on noise:
for timing only). The pretrained ones need their weight wheels. Prints a table, then the
figures (``harness.print_figures``) with the load average at start and end: on a shared machine
the wall ratio means little without it. Must not import ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import statistics
import time
import warnings

import torch

from benchmarks import harness, models as bench_models
from benchmarks.tuning_zoo import _pretrained, _real_data
from quantizer import GateNotMetError, int8, sensitivity, tuning

MODELS = ("mtcnn-onet", "speaker-encoder", "resnet18")


def _one_thread() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")


def _warm(_):
    return os.getpid()


def _setup(name: str):
    """(model, calibration batches, held-out rows, recipe) for a benchmark model."""
    if name == "resnet18":
        torch.manual_seed(0)
        model = bench_models.build("resnet18").eval()
        data = torch.randn(96, *bench_models.INPUT_SHAPE)
        cal, held = data[:32], data[32:]
    else:
        model = _pretrained(name)
        data = _real_data(name, 128)
        cal, held = data[:64], data[64:]
    recipe = "dynamic" if name == "speaker-encoder" else "static"
    return model, [(cal[i:i + 16], None) for i in range(0, len(cal), 16)], held, recipe


def _task(model, loader, held, recipe) -> sensitivity.SensitivityTask:
    if recipe == "dynamic":
        return sensitivity.task_for("dynamic", model, held)
    prepared = int8.calibrate_int8(model, loader, len(loader))
    return sensitivity.task_for("static", model, held, prepared=prepared)


def _run_counted(task):
    """A chunk's results and the CPU seconds its process spent on it."""
    start = time.process_time()
    results = sensitivity.run_sensitivity(task)
    return results, time.process_time() - start


def _timed(pool, tasks, order) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the busiest chunk) of one pass over ``tasks``."""
    start = time.perf_counter()
    done = pool.map(_run_counted, tasks, chunksize=1)
    sensitivity.merge_sensitivity([results for results, _ in done], order)
    return time.perf_counter() - start, max(cpu for _, cpu in done)


def measure(name: str, pools, repeats: int, gate: tuning.Gate) -> dict:
    """One model's figures: wall and busiest-chunk CPU seconds for 1 and 2 chunks, tuning."""
    model, loader, held, recipe = _setup(name)
    task = _task(model, loader, held, recipe)
    one, two = [], []
    for _ in range(repeats):   # alternate, so both see the same load
        one.append(_timed(pools[1], [task], task.units))
        two.append(_timed(pools[2], sensitivity.split_tasks(task, 2), task.units))
    t1, t2 = (statistics.median(wall for wall, _ in runs) for runs in (one, two))
    c1, c2 = (statistics.median(cpu for _, cpu in runs) for runs in (one, two))
    methods = _methods(pools[1], task) if recipe == "static" else {}
    start = time.perf_counter()
    try:
        result = tuning.tune_int8(model, loader, held, gate=gate, calibration_batches=len(loader),
                                  config=tuning.TuningConfig(recipe=recipe, chunks=2),
                                  map_chunks=lambda tasks: pools[2].map(
                                      sensitivity.run_sensitivity, tasks, chunksize=1))
        tuned = (f"{len(result.trials)} trials, {result.chosen.sqnr_db:.1f} dB, "
                 f"float {list(result.chosen.float_layers)}")
    except GateNotMetError as exc:
        tuned = f"failed: {str(exc)[:120]}"
    return {"recipe": recipe, "units": len(task.units), "wall_1": t1, "wall_2": t2,
            "cpu_1": c1, "cpu_2": c2, "tuning_s": time.perf_counter() - start, "tuned": tuned,
            **methods}


def _methods(pool, task) -> dict:
    """CPU seconds of the pass simulated and with a real conversion per unit, and the largest
    difference between their SQNRs (finite ones)."""
    (simulated, cpu_sim), (converted, cpu_convert) = pool.map(
        _run_counted, [task, dataclasses.replace(task, method="convert")], chunksize=1)
    gaps = [abs(a.sqnr_db - b.sqnr_db) for a, b in zip(simulated, converted)
            if math.isfinite(a.sqnr_db) and math.isfinite(b.sqnr_db)]
    return {"cpu_simulate": cpu_sim, "cpu_convert": cpu_convert, "max_gap_db": max(gaps)}


def _row(name: str, f: dict) -> str:
    return (f"| {name} | {f['recipe']} | {f['units']} | {f['wall_1']:.2f} | {f['wall_2']:.2f} | "
            f"{f['wall_2'] / f['wall_1']:.3f} | {f['cpu_1']:.2f} | {f['cpu_2']:.2f} | "
            f"{f['cpu_2'] / f['cpu_1']:.3f} | {f['tuning_s']:.1f} s: {f['tuned']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=MODELS, default=[])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-sqnr-db", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="mtcnn-onet only, 1 repeat")
    args = parser.parse_args(argv)
    _one_thread()
    figures = harness.start_figures()
    names = ["mtcnn-onet"] if args.quick else (args.model or list(MODELS))
    repeats = 1 if args.quick else args.repeats
    context = multiprocessing.get_context("spawn")
    pools = {n: context.Pool(n, initializer=_one_thread) for n in (1, 2)}
    try:
        for n, pool in pools.items():
            pool.map(_warm, range(n), chunksize=1)
        print("| model | recipe | units | 1 process s | 2 processes s | wall ratio | CPU s, 1 | "
              "CPU s, busiest of 2 | CPU ratio | tune_int8, 2 chunks |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in names:
            found = measure(name, pools, repeats, tuning.Gate(min_sqnr_db=args.min_sqnr_db))
            print(_row(name, found), flush=True)
            figures[f"{name}_wall_ratio"] = found["wall_2"] / found["wall_1"]
            figures[f"{name}_cpu_ratio"] = found["cpu_2"] / found["cpu_1"]
            figures[f"{name}_tuning_s"] = found["tuning_s"]
            for key in ("cpu_simulate", "cpu_convert", "max_gap_db"):
                if key in found:
                    figures[f"{name}_{key}"] = found[key]
    finally:
        for pool in pools.values():
            pool.terminate()
    figures["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    harness.print_figures(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
