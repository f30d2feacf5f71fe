"""The fan-out cost model: what a run's wall time is made of, fitted from runs on this machine.

``wall(c) = F + span(c)``: ``F`` is what happens outside the fan-out (interpreter and Ray
start-up, planning, the last manifest and report, Ray's shutdown), ``span(c)`` the time from the
first task's start to the last one's end on ``c`` CPUs. With one job per model scheduled longest
first, ``span(c) = LPT(job seconds at 1 thread x contention(c), c)``:
the longest-processing-time-first makespan of the jobs, each slowed by ``contention(c)`` (tasks
running side by side share memory bandwidth and caches; measured as task seconds at 2 CPUs over
task seconds at 1 CPU). With fewer models than CPUs the driver makes one job per (model,
precision) (``jobs.plan.split_by_precision``), each doing the model's load and reference itself.
Pure arithmetic on measured figures; imports nothing of the product.
"""

from __future__ import annotations

import heapq


def lpt_makespan(durations: list[float], cpus: int) -> float:
    """Makespan of ``durations`` on ``cpus`` identical CPUs, longest first, each to the CPU that
    frees first (what the fan-out's window does)."""
    free = [0.0] * max(1, cpus)
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(free, free[0] + d)
    return max(free)


def job_seconds(rows: list[dict], *, per_precision: bool = False) -> list[float]:
    """Seconds of each job, from the rows of a run with one job per model: a row's
    ``duration_s`` carries its share of the model's load and reference (``shared_s``, from the
    run record); a job per (model, precision) does all of that shared work itself."""
    per: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("duration_s"):
            per.setdefault(row["name"], []).append(row)
    if not per_precision:
        return [sum(r["duration_s"] for r in group) for group in per.values()]
    return [r["duration_s"] + r.get("shared_s", 0.0) * (len(group) - 1) / len(group)
            for group in per.values() for r in group]


def predict(jobs_1cpu: list[float], fixed_s: float, contention: float, cpus: int) -> dict:
    """Predicted span and wall on ``cpus`` CPUs from job seconds measured at 1 CPU."""
    span = lpt_makespan([d * contention for d in jobs_1cpu], cpus)
    return {"span_s": span, "wall_s": fixed_s + span,
            "balance": sum(jobs_1cpu) * contention / cpus / span if span else 1.0}
