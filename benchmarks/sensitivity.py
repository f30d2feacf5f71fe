"""How much a split sensitivity pass gains: one process against two chunks in two processes.

For each model: the per-layer sensitivity pass (``quantizer.sensitivity``) run as ONE task in one
warm worker process, then split into TWO tasks run at once in two warm worker processes (each
worker one torch thread, started and warmed before timing, as Ray's workers are), and the ratio
of the two wall times; shipping the task (fp32 model, calibrated observers' statistics,
held-out rows) and merging are inside both timings. Beside it, the CPU seconds of the busiest
chunk against the one-chunk pass's: the ratio two idle cores would give, which a loaded shared
machine hides. Then a full ``tune_int8`` with ``min_sqnr_db`` whose
sensitivity chunks go to the same two workers: its time, trials and layers kept float.

    python -m benchmarks.sensitivity [--model NAME ...] [--repeats 3] [--min-sqnr-db 20]

Models: ``mtcnn-onet`` (static, simulated), ``speaker-encoder`` (dynamic, converted),
``resnet18`` (benchmarks.models, 64x64, static, simulated; random weights, calibrated on noise:
for timing only). The pretrained ones need their weight wheels. Prints the load average before
and after: on a shared machine the ratio means little without it. Must not import ray.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
import warnings

import torch

from benchmarks import models as bench_models
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


def measure(name: str, pools, repeats: int, gate: tuning.Gate) -> str:
    model, loader, held, recipe = _setup(name)
    task = _task(model, loader, held, recipe)
    one, two = [], []
    for _ in range(repeats):   # alternate, so both see the same load
        one.append(_timed(pools[1], [task], task.units))
        two.append(_timed(pools[2], sensitivity.split_tasks(task, 2), task.units))
    t1, t2 = (statistics.median(wall for wall, _ in runs) for runs in (one, two))
    c1, c2 = (statistics.median(cpu for _, cpu in runs) for runs in (one, two))
    start = time.perf_counter()
    try:
        result = tuning.tune_int8(model, loader, held, gate=gate, calibration_batches=len(loader),
                                  config=tuning.TuningConfig(recipe=recipe, chunks=2),
                                  map_chunks=lambda tasks: pools[2].map(
                                      sensitivity.run_sensitivity, tasks, chunksize=1))
        tuned = (f"{result.tuning_s:.1f} s, {len(result.trials)} trials, "
                 f"{result.chosen.sqnr_db:.1f} dB, float {list(result.chosen.float_layers)}")
    except GateNotMetError as exc:
        tuned = f"{time.perf_counter() - start:.1f} s, failed: {str(exc)[:120]}"
    return (f"| {name} | {recipe} | {len(task.units)} | {t1:.2f} | {t2:.2f} | {t2 / t1:.3f} | "
            f"{c1:.2f} | {c2:.2f} | {c2 / c1:.3f} | {tuned} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=MODELS, default=[])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-sqnr-db", type=float, default=20.0)
    args = parser.parse_args(argv)
    _one_thread()
    context = multiprocessing.get_context("spawn")
    pools = {n: context.Pool(n, initializer=_one_thread) for n in (1, 2)}
    try:
        for n, pool in pools.items():
            pool.map(_warm, range(n), chunksize=1)
        print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
        print("| model | recipe | units | 1 process s | 2 processes s | wall ratio | CPU s, 1 | "
              "CPU s, busiest of 2 | CPU ratio | tune_int8 (2 chunks) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in args.model or MODELS:
            print(measure(name, pools, args.repeats, tuning.Gate(min_sqnr_db=args.min_sqnr_db)),
                  flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        for pool in pools.values():
            pool.terminate()


if __name__ == "__main__":
    main()
