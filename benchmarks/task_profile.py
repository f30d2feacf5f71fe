"""Task profile: where one model's task spends its CPU, against the bare conversions.

Run (from the repo root; no Ray is started)::

    .venv/bin/python -m benchmarks.task_profile            # the 16-model benchmark zoo
    .venv/bin/python -m benchmarks.task_profile --quick    # 4 models

Builds the fan-out benchmark's zoo, then in one process at one thread (as a task runs), after one
warm-up model: for every model, the bare work (load, ``to_fp16``, ``to_int8``, ``torch.save`` of
both) and then ``jobs.convert.convert_model`` (everything a task does: verified load, fp32
reference, both conversions, measurements, gates, the artifacts with their TorchScript copies,
publishing). Times are CPU seconds (``time.process_time``): on a machine shared with other work
they move far less than wall time. The task's phases are timed by wrapping the functions that do
them. Prints the totals, the CPU overhead ratio (task / bare) and seconds per model of each
phase. Imports ``jobs.convert`` to time it; must not import ray.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys
import time
import warnings

from benchmarks import harness
from benchmarks.fanout import build_zoo
from benchmarks.models import ARCHS

# (module, function): each one's CPU seconds are summed (nested ones are counted in both)
PHASES = (("quantizer.artifacts", "torchscript_bytes"), ("quantizer.artifacts", "_model_bytes"),
          ("quantizer.artifacts", "_fingerprint"),
          ("jobs.convert", "_load"), ("jobs.convert", "_state_bytes"),
          ("jobs.measure", "reference"), ("jobs.measure", "measure_fp16"),
          ("jobs.measure", "measure_int8"), ("jobs.measure", "latency_ms"),
          ("jobs.artifact", "publish_dir"), ("quantizer", "tune_int8"),
          ("quantizer.int8", "calibrate_int8"), ("quantizer.int8", "convert_int8"),
          ("quantizer.search", "_state_bytes"))
# methods: (module, class, method, label)
METHODS = (("quantizer.search", "Search", "__init__", "search_reference"),
           ("quantizer.search", "Search", "trial", "search_trial"))
clock = time.process_time


def _timed(phases: collections.Counter) -> None:
    """Wrap each phase's function (and the two conversions) to add up its CPU seconds."""
    import importlib

    import quantizer

    def wrap(owner, name, label):
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[label] += clock() - t0
        setattr(owner, name, timed)

    for module, name in PHASES:
        wrap(importlib.import_module(module), name, name)
    for module, cls, name, label in METHODS:
        wrap(getattr(importlib.import_module(module), cls), name, label)
    for name in ("to_fp16", "to_int8"):
        wrap(quantizer, name, name)


def _jobs(zoo_path: str, out: str):
    from jobs.convert import worker_facts
    from jobs.manifest import Manifest
    from jobs.plan import conversion_jobs, make_plan
    from jobs.sources import SourceHasher, search_path
    from jobs.store import Store
    from jobs.zoo import load_zoo

    zoo, store = load_zoo(zoo_path), Store(out)
    units = make_plan(zoo, Manifest(), store, SourceHasher(store), worker_facts(),
                      search=search_path(os.path.dirname(zoo_path)))
    return {j.name: j for j in conversion_jobs(units, Manifest(), store.uri, "profile")}, store


def _bare(name: str, folder: str, calib) -> None:
    import torch

    import quantizer
    from benchmarks.models import build

    model = build(arch=name)
    model.load_state_dict(torch.load(os.path.join(folder, "ckpt", f"{name}.pt"), weights_only=True))
    model.eval()
    torch.save(quantizer.to_fp16(model).state_dict(), io.BytesIO())
    torch.save(quantizer.to_int8(model, calib, calibration_batches=10).state_dict(), io.BytesIO())


def measure(work: str, archs: list[str]) -> dict:
    import torch

    import quantizer
    from jobs.convert import convert_model

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    zoo = build_zoo(os.path.join(work, "zoo"), archs, 10)
    folder = os.path.dirname(zoo)
    calib = quantizer.read_calibration(os.path.join(folder, "calib", "images.arrow"), batch_size=8)
    jobs, store = _jobs(zoo, os.path.join(work, "out"))
    _bare(archs[0], folder, calib)                       # warm-up: imports, first-call costs
    convert_model(jobs[archs[0]], store=type(store)(os.path.join(work, "warm")))
    phases: collections.Counter = collections.Counter()
    _timed(phases)
    bare = task = 0.0
    for name in archs:
        t0 = clock()
        _bare(name, folder, calib)
        t1 = clock()
        rows = convert_model(jobs[name], store=store)
        t2 = clock()
        assert all(r["status"] == "ok" for r in rows), rows
        bare, task = bare + t1 - t0, task + t2 - t1
    n = len(archs)
    figures = {"bare_cpu_s": bare, "task_cpu_s": task, "cpu_overhead_ratio": task / bare,
               "bare_cpu_s_per_model": bare / n, "task_cpu_s_per_model": task / n}
    # to_int8 is the loop's (the task converts through tune_int8: calibrate_int8, convert_int8,
    # and Search's trial, which measures the candidate); to_fp16 is both sides'
    figures["to_int8_cpu_s_per_model"] = phases.pop("to_int8") / n
    figures["to_fp16_cpu_s_per_model"] = phases.pop("to_fp16") / 2 / n
    for label, seconds in phases.most_common():
        figures[f"{label}_cpu_s_per_model"] = seconds / n
    return figures


def _main(args, work: str) -> int:
    figures = harness.start_figures()
    archs = list(ARCHS)[:4] if args.quick else list(ARCHS)
    figures.update(models=len(archs), threads=1)
    figures.update(measure(work, archs))
    harness.print_figures(figures)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 models")
    parser.add_argument("--workdir", help="keep the zoo and outputs here (default: a temp dir)")
    args = parser.parse_args(argv)
    return harness.in_workdir(args, "bench-profile-", _main)


if __name__ == "__main__":
    sys.exit(main())
