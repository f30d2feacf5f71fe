"""The fan-out cost model: what a run's wall time is made of, fitted from runs on this machine.

``wall(c) = F + span(c)``: ``F`` is what happens outside the fan-out (interpreter and Ray
start-up, planning, the last manifest and report, Ray's shutdown), ``span(c)`` the time from the
first task's start to the last one's end on ``c`` CPUs. With one job per model scheduled longest
first, ``span(c) = LPT(job seconds at 1 thread x contention(c), c)``:
the longest-processing-time-first makespan of the jobs, each slowed by ``contention(c)`` (tasks
running side by side share memory bandwidth and caches; measured as task seconds at 2 CPUs over
task seconds at 1 CPU). Where the driver would make one job per (model, precision) instead
(``jobs.plan.split_by_precision``, decided here from the measured rows as the driver decides from
the last run's), each does the model's load and reference itself. Pure arithmetic on measured
figures; of the product it imports only ``jobs.plan``'s scheduling arithmetic (no torch, no Ray).
"""

from __future__ import annotations

from jobs.plan import lpt_makespan, split_by_precision


def split_here(rows: list[dict], cpus: int) -> bool:
    """Whether the driver would split these rows' models by precision on ``cpus`` CPUs, were
    these rows the last run's."""
    return split_by_precision(job_seconds(rows), [r["duration_s"] for r in rows
                                                  if r.get("duration_s")], cpus)


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
