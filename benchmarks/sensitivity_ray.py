"""Issue 13's figure: a model's sensitivity pass fanned out as Ray tasks, 2 workers against 1.

The pass is what ``quantize-all`` runs when a plain int8 conversion misses its gate: the task
(fp32 model, calibrated observers' statistics, held-out rows) cut into ``jobs.tune.MAX_CHUNKS``
pieces as ``quantizer.tune_int8`` cuts it, handed to a conversion-like Ray task (1 CPU, one
torch thread) in a local Ray of 2 CPUs. One worker: that task runs the pieces as one pass itself
(what ``jobs.task.map_chunks`` does when only one CPU is free). Two workers: that task calls
``jobs.task.map_chunks``, which runs one chunk itself and one ``sensitivity_task`` per other
free CPU, sharing the task put in the object store once. Both walls are timed
from the driver (submit to result), after one untimed warm-up of each mode (workers started,
torch and quantizer imported), and both passes must give the same SQNR per unit. Beside them,
the median seconds of one unit in each mode (a unit slower with two workers than with one means
the two cores were not both free: the shared-machine effect) and the busiest chunk's seconds in
its worker (the wall beyond it is Ray's: shipping, scheduling, merging).

    unshare -n sh -c 'ip link set lo up && python -m benchmarks.sensitivity_ray [--model crepe-full]
        [--rows 32] [--repeats 1]'

Models: the pretrained ones of ``tests.real.cli_zoo`` (their weight wheels installed): the
default, CREPE-full (20 static units, ~0.07 s per held-out row and unit on one core), is heavy
enough that Ray's per-task costs are small beside it. Prints both walls, the ratio (issue 13
asks <= 0.6) and the 1-minute load at start and end: on a shared machine the ratio means little
without it. Starts its own Ray (run it in a network namespace of its own on a shared host).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
import warnings

import ray
import torch

from benchmarks import harness
from jobs import task as job_task
from jobs.tune import MAX_CHUNKS
from quantizer import int8, load_model, sensitivity
from tests.real import cli_zoo
from tests.real import models as real

# map_chunks counts free CPUs in ray.available_resources(), a view the GCS refreshes about once a
# second: right after a task ends it can still show that task's CPU as taken.
SETTLE_S = 1.0


def build_task(name: str, rows: int) -> tuple[list, tuple[str, ...]]:
    """(the pass cut into MAX_CHUNKS pieces, the unit order) for pretrained model ``name``:
    calibrated on its zoo's calibration rows, measured on ``rows`` held-out rows."""
    factory, kwargs, (batches, size), extra = cli_zoo.PRETRAINED[name]
    layout = {k: extra[k] for k in ("checkpoint_key", "ignore_keys") if k in extra}
    fixed = dict(extra.get("forward_kwargs", {}))
    model = load_model(f"tests.real.models:{factory}", real.asset(name), kwargs=kwargs, **layout)
    data = cli_zoo.pretrained_inputs(name, batches * size + rows, seed=1)
    held = data[batches * size:]
    if name == "speaker-encoder":
        whole = sensitivity.task_for("dynamic", model, held)
    else:
        loader = [(data[i * size:(i + 1) * size], None) for i in range(batches)]
        prepared = int8.calibrate_int8(model, loader, batches, forward_kwargs=fixed)
        whole = sensitivity.task_for("static", model, held, prepared=prepared)
    return sensitivity.split_tasks(whole, MAX_CHUNKS), whole.units


@ray.remote(num_cpus=1)
def sensitivity_pass(tasks: list, fan_out: bool) -> list:
    """The pass as a conversion task runs it: fanned out through ``map_chunks``, or alone."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if fan_out:
        return job_task.map_chunks(tasks)
    units = tuple(unit for task in tasks for unit in task.units)   # as map_chunks on one CPU
    return [sensitivity.run_sensitivity(dataclasses.replace(tasks[0], units=units))]


def timed(tasks: list, order, fan_out: bool) -> tuple[float, list, float, int]:
    """(wall seconds from the driver, the merged per-unit results, the busiest chunk's seconds
    inside its worker, the number of chunks) of one pass."""
    time.sleep(SETTLE_S)
    start = time.perf_counter()
    parts = ray.get(sensitivity_pass.remote(tasks, fan_out))
    wall = time.perf_counter() - start
    busiest = max(sum(item.seconds for item in part) for part in parts)
    return wall, sensitivity.merge_sensitivity(parts, order), busiest, len(parts)


def warm_up(tasks: list, order) -> int:
    """Run both modes on two one-unit pieces until the fan-out really used two chunks, so the
    three worker processes it needs (the blocked caller's and two chunks') exist and have
    imported torch and quantizer. Returns the tries it took."""
    timed(tasks[:2], order, False)
    for attempt in range(1, 4):
        if timed(tasks[:2], order, True)[3] == 2:
            return attempt
    raise RuntimeError("map_chunks never saw a free CPU: is another Ray task running?")


def _unit_s(runs) -> float:
    """Median seconds of one unit (held-out forward with one unit quantized) in a worker."""
    return statistics.median(item.seconds for _, results, _, _ in runs for item in results)


def _same(a: list, b: list) -> float:
    """Largest |SQNR difference| between two passes' results (they must cover the same units)."""
    assert [x.name for x in a] == [y.name for y in b], "the passes measured different units"
    gaps = [abs(x.sqnr_db - y.sqnr_db) for x, y in zip(a, b)
            if math.isfinite(x.sqnr_db) and math.isfinite(y.sqnr_db)]
    return max(gaps, default=0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crepe-full", choices=sorted(cli_zoo.PRETRAINED))
    parser.add_argument("--rows", type=int, default=32, help="held-out rows measured per unit")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes of each mode")
    args = parser.parse_args(argv)
    figures = harness.start_figures()
    tasks, order = build_task(args.model, args.rows)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        figures["warm_up_tries"] = warm_up(tasks, order)
        one, two = [], []
        for _ in range(args.repeats):            # alternate, so both see the same load
            one.append(timed(tasks, order, False))
            two.append(timed(tasks, order, True))
    finally:
        ray.shutdown()
    wall_1, wall_2 = (statistics.median(run[0] for run in runs) for runs in (one, two))
    figures.update({"model": args.model, "units": len(order), "held_out_rows": args.rows,
                    "wall_1_worker_s": wall_1, "wall_2_workers_s": wall_2,
                    "wall_ratio": wall_2 / wall_1, "target_ratio": 0.6,
                    "max_sqnr_gap_db": _same(one[0][1], two[0][1]),
                    # a unit slower with 2 workers than with 1: the cores were not both free
                    "unit_s_1_worker": _unit_s(one), "unit_s_2_workers": _unit_s(two),
                    "busiest_chunk_s": statistics.median(run[2] for run in two),
                    "chunks_2_workers": min(run[3] for run in two),
                    "load_1min_at_end": round(os.getloadavg()[0], 2)})
    harness.print_figures(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
