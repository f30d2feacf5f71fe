"""The plan: which (model, precision) rows to convert, skip or fail, and why; the jobs to run.

Decided from the zoo, the manifest, the store and the workers' predicted facts alone, without
importing torch or starting Ray, so a run with nothing to do is quick. A row whose checkpoint or
calibration data cannot be hashed is failed here, named, and never converted, adopted or
published: its key would not say what it was made from. The rows left to convert become one
``ConversionJob`` per model (all its precisions: the checkpoint is loaded and the fp32 reference
computed once), or per (model, precision) when that is expected to finish sooner on the CPUs there
are (``jobs_for``), ordered longest first. Must not import ray, click or torch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from jobs import layout
from jobs.keys import content_key, inputs_digest
from jobs.manifest import Manifest
from jobs.publish import files_present
from jobs.sources import Source, SourceHasher, factory_code
from jobs.store import Store, StoreError
from jobs.zoo import ModelSpec, Zoo

ARTIFACT_FILE = layout.ARTIFACT_FILE     # re-exported: jobs.verify reads it from here

FIDELITY_ROWS = 64       # held-out rows after the calibration rows, for SQNR / top-1 agreement

# A model never converted before: seconds = base + per MB of checkpoint + per tensor in it, by
# precision (fitted on the benchmark zoo's rows, one core of the machine in docs/performance.md:
# correlation with the measured seconds 0.36 for fp16 and 0.62 for int8, against 0.15 for the
# size alone: a conversion costs per layer as much as per weight). Only the order of jobs
# depends on it. A checkpoint whose tensors cannot be counted is taken to hold 3 per MB.
ESTIMATE_S = {"fp16": (0.5, 0.006, 0.0015), "int8": (1.0, 0.005, 0.005)}
TENSORS_PER_MB_UNKNOWN = 3.0
# A job per (model, precision) loads the checkpoint and computes the fp32 reference itself: on the
# benchmark zoo such jobs take 1.19x the jobs per model in all (47.5 s against 40.0 s at one CPU).
SPLIT_EXTRA = 0.19
# Split only when that is expected to shorten the run by more than this share: it costs CPU.
SPLIT_MIN_GAIN = 0.05


@dataclass(frozen=True)
class Unit:
    """One manifest row's fate in this run."""

    spec: ModelSpec
    precision: str
    action: str                    # "convert" | "skip" | "fail"
    reason: str
    inputs: str | None = None      # the driver's part of the key; None when a hash is missing
    key: str | None = None         # inputs + the workers' predicted facts (None: not predicted)
    source: Source | None = None
    error: tuple[str, str] | None = None      # (error_type, message) of a "fail" unit

    @property
    def backend(self) -> str | None:
        """Backend and observer shape int8 results only; an fp16 row claims neither."""
        return self.spec.backend if self.precision == "int8" else None

    @property
    def observer(self) -> str | None:
        return self.spec.observer if self.precision == "int8" else None


@dataclass(frozen=True)
class PrecisionJob:
    precision: str
    inputs: str                    # the driver's part of the key; the worker completes it
    planned_key: str | None        # completed with the driver's prediction of the facts
    replace: bool                  # --force: fresh files replace an intact artifact


@dataclass(frozen=True)
class ConversionJob:
    """What one task converts: one model, each precision of it still to do."""

    spec: ModelSpec
    source: Source
    precisions: tuple[PrecisionJob, ...]
    store_uri: str
    run_id: str
    estimate_s: float

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        """Names this job among the run's: the model, or the model and its only precision."""
        if len(self.precisions) == len(self.spec.precisions):
            return self.spec.name
        return ".".join([self.spec.name, *(p.precision for p in self.precisions)])

    def backend_for(self, precision: str) -> str | None:
        return self.spec.backend if precision == "int8" else None

    def observer_for(self, precision: str) -> str | None:
        return self.spec.observer if precision == "int8" else None


def make_plan(zoo: Zoo, manifest: Manifest, store: Store, hasher: SourceHasher,
              facts: dict | None, *, force: bool = False,
              search: tuple[str, ...] = ()) -> list[Unit]:
    """Decide convert / skip / fail for every (model, precision) of the zoo.

    Args:
        facts: the workers' predicted facts (``jobs.keys``): keys are completed with them. None
            when DEST holds nothing to compare with (a new DEST): every row is new, and the
            workers complete the keys.
        search: where the factories' modules are looked for (``jobs.sources.search_path``).
    """
    units = []
    for spec in zoo.models:
        source, calib, error = _hash_inputs(spec, hasher)
        code = factory_code(spec.factory, search) if error is None else None
        for precision in spec.precisions:
            if error is not None:
                units.append(Unit(spec, precision, "fail", error[1], source=source, error=error))
                continue
            inputs = inputs_digest(spec, precision, source.sha256, calib, code)
            row = manifest.get(spec.name, precision)
            if facts is None and row is None:
                units.append(Unit(spec, precision, "convert", "--force" if force else "new",
                                  inputs, None, source))
                continue
            key = content_key(inputs, precision, _backend(spec, precision), facts)
            action, reason = decide(spec, precision, key, source, facts, row, store, force)
            units.append(Unit(spec, precision, action, reason, inputs, key, source))
    return units


def _backend(spec: ModelSpec, precision: str) -> str | None:
    return spec.backend if precision == "int8" else None


def _hash_inputs(spec: ModelSpec, hasher: SourceHasher):
    """(source, calibration sha256, None) or (source?, None, (error_type, message))."""
    try:
        source = hasher.digest(spec.checkpoint)
    except (OSError, ValueError, StoreError) as e:
        return None, None, ("CheckpointError", _unhashable("checkpoint", spec, e))
    if not spec.calibration.data:
        return source, None, None
    try:
        return source, hasher.digest_dataset(spec.calibration.data), None
    except (OSError, ValueError, StoreError) as e:
        return source, None, ("CalibrationError", _unhashable("calibration data", spec, e))


def _unhashable(what: str, spec: ModelSpec, error: Exception) -> str:
    return (f"model {spec.name}: its {what} could not be read to hash it ({error}); without "
            f"its sha256 no key says what a result was made from, so nothing was converted, "
            f"adopted or published. Fix the path or the store; the next run retries this row.")


def decide(spec: ModelSpec, precision: str, key: str, source: Source, facts: dict,
           row: dict | None, store: Store, force: bool) -> tuple[str, str]:
    """Convert or skip one row whose inputs are all hashed; returns (action, reason)."""
    if force:
        return "convert", "--force"
    if row is None:
        return "convert", "new"
    if row.get("status") == "failed":
        return "convert", f"last attempt failed ({row.get('error_type')})"
    if row.get("key") != key:
        return "convert", _why_key_changed(spec, precision, source, facts, row)
    if row.get("status") != "ok":
        return "convert", f"last status {row.get('status')}"
    folder = layout.artifact_dir(spec.name, precision, key)
    if not files_present(store, folder, row.get("files")):
        return "convert", "artifact missing or incomplete in the store"
    return "skip", f"up to date (run {row.get('run_id')})"


def _why_key_changed(spec, precision, source, facts, row) -> str:
    if row.get("source_sha256") != source.sha256:
        return "checkpoint changed"
    if precision == "int8" and row.get("backend") != spec.backend:
        return f"backend changed ({row.get('backend')} -> {spec.backend})"
    if (row.get("torch_version"), row.get("quantizer_version")) != \
            (facts.get("torch"), facts.get("quantizer")):
        return (f"versions changed (torch {row.get('torch_version')} -> {facts.get('torch')}, "
                f"quantizer {row.get('quantizer_version')} -> {facts.get('quantizer')})")
    return "settings, calibration data or factory code changed"


def estimate_s(spec: ModelSpec, precisions: list[str], source: Source,
               manifest: Manifest) -> float:
    """Seconds one job is expected to take: the last run's ``duration_s`` of these rows when
    the manifest has all of them, else an estimate from the checkpoint's size and number of
    tensors (``ESTIMATE_S``)."""
    last = [(manifest.get(spec.name, p) or {}).get("duration_s") for p in precisions]
    if all(isinstance(d, (int, float)) and d > 0 for d in last):
        return float(sum(last))
    mb = source.bytes / 2**20
    tensors = source.tensors if source.tensors is not None else TENSORS_PER_MB_UNKNOWN * mb
    return sum(base + per_mb * mb + per_tensor * tensors
               for base, per_mb, per_tensor in (ESTIMATE_S[p] for p in precisions))


def conversion_jobs(units: list[Unit], manifest: Manifest, store_uri: str, run_id: str,
                    *, force: bool = False, per_precision: bool = False) -> list[ConversionJob]:
    """One job per model with rows to convert, longest expected first.

    ``per_precision``: one job per (model, precision) instead (see ``jobs_for``): each job then
    loads the model and computes the reference itself, but the longest job, which can bound the
    run, is shorter.
    """
    by_model: dict[tuple, list[Unit]] = {}
    for unit in units:
        if unit.action == "convert":
            group = (unit.spec.name, unit.precision if per_precision else None)
            by_model.setdefault(group, []).append(unit)
    jobs = []
    for todo in by_model.values():
        spec, source = todo[0].spec, todo[0].source
        precisions = tuple(PrecisionJob(u.precision, u.inputs, u.key, force) for u in todo)
        jobs.append(ConversionJob(spec, source, precisions, store_uri, run_id,
                                  estimate_s(spec, [u.precision for u in todo], source, manifest)))
    return sorted(jobs, key=lambda j: -j.estimate_s)


def jobs_for(units: list[Unit], manifest: Manifest, store_uri: str, run_id: str, cpus: int,
             *, force: bool = False) -> list[ConversionJob]:
    """``conversion_jobs`` per model, or per (model, precision) where ``split_by_precision``
    expects those to finish sooner on ``cpus`` CPUs."""
    whole = conversion_jobs(units, manifest, store_uri, run_id, force=force)
    split = conversion_jobs(units, manifest, store_uri, run_id, force=force, per_precision=True)
    if len(split) > len(whole) and split_by_precision(
            [j.estimate_s for j in whole], [j.estimate_s for j in split], cpus):
        return split
    return whole


def split_by_precision(whole_s: list[float], split_s: list[float], cpus: int) -> bool:
    """Whether one job per (model, precision) is expected to end the run sooner than one job per
    model: their longest-first makespans on ``cpus`` CPUs, each split job taking ``SPLIT_EXTRA``
    more for the load and reference it repeats. ``split_s`` are the split jobs' estimates (the
    last run's rows: each carries half its model's shared work). Splitting pays when the longest
    models would otherwise end the run alone, with about as many CPUs as models or more (the
    benchmark zoo's 16 models, one run's rows: on 16 CPUs 3.5 s split against 4.1 s; on 12, 4.5
    against 4.2)."""
    split = lpt_makespan([s * (1 + SPLIT_EXTRA) for s in split_s], cpus)
    return split < lpt_makespan(whole_s, cpus) * (1 - SPLIT_MIN_GAIN)


def lpt_makespan(seconds: list[float], cpus: int) -> float:
    """Makespan of jobs of ``seconds`` on ``cpus`` identical CPUs, longest first, each to the CPU
    that frees first (what the fan-out's window does)."""
    free = [0.0] * max(1, cpus)
    for d in sorted(seconds, reverse=True):
        heapq.heapreplace(free, free[0] + d)
    return max(free)
