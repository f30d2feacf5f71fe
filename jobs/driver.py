"""The driver: lock DEST, plan, fan the jobs out, record the rows, write the manifest.

Bookkeeping only; Ray is ``jobs.fanout``'s. A run: take DEST's lock; sweep dead writers'
temporaries; start Ray at once when there is surely work (a row never converted, ``--force``),
while the checkpoints are hashed, so start-up and planning overlap; plan (``jobs.plan``); fail
the rows whose inputs cannot be hashed; adopt what an interrupted run finished (only when its files
check out); fan one job per model out; record rows as they come. The manifest is written after
the first result and then every ``FLUSH_EVERY_S``, each write only after checking that this run
still holds the lock (a run that lost it stops, exit 3), and each finished precision also leaves
a completion record, so a killed driver loses nothing that finished. Must not import click,
torch or ray.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from jobs import fanout, layout
from jobs.fanout import RayUnavailableError  # noqa: F401  (re-exported for the CLI)
from jobs.keys import FactsCache, local_environment
from jobs.lock import StoreLock
from jobs.manifest import Manifest, blank_row, now_iso
from jobs.plan import Unit, jobs_for, make_plan
from jobs.progress import Progress
from jobs.publish import intact_record
from jobs.sources import SourceHasher, search_path
from jobs.store import Store, redact_uri
from jobs.zoo import Zoo

FLUSH_EVERY_S = 2.0
CONNECT_TIMEOUT_S = fanout.CONNECT_TIMEOUT_S


@dataclass(frozen=True)
class RunOptions:
    out: str
    address: str | None = None
    num_cpus: int | None = None
    max_retries: int = 2
    force: bool = False


@dataclass
class RunResult:
    run_id: str
    store: str
    rows: list[dict] = field(default_factory=list)   # what this run did, one per unit
    ray_mode: str | None = None   # "local" (started here), "joined" (a cluster), "existing",
                                  # or None: nothing to do, so no Ray at all
    duration_s: float = 0.0

    @property
    def ray_used(self) -> bool:
        """Ray was started or joined for this run (work to do, or a cluster to ask)."""
        return self.ray_mode is not None

    @property
    def ray_started(self) -> bool:
        """This run started or joined Ray itself (and so shuts its connection down)."""
        return self.ray_mode in ("local", "joined")

    @property
    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "failed": 0, "skipped": 0}
        for row in self.rows:
            out[row["status"]] = out.get(row["status"], 0) + 1
        return out

    @property
    def exit_code(self) -> int:
        return 1 if self.counts["failed"] else 0


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def joins_cluster(address: str | None) -> bool:
    address = address or os.environ.get("RAY_ADDRESS")
    return bool(address) and address != "local"


def plan_only(zoo: Zoo, out: str, *, force: bool = False, address: str | None = None) -> list[Unit]:
    """The plan for ``--dry-run``: reads the store, writes nothing, starts no Ray.

    On a cluster (``address``) the workers' facts are the ones they last reported here; a
    worker upgrade since then shows up in the real run."""
    store = Store(out)
    store.check_reachable()
    cache = FactsCache(store)
    facts = cache.get(local_environment(_search(zoo))) or _any_facts(cache)
    return make_plan(zoo, Manifest.load(store), store, SourceHasher(store), facts,
                     force=force, search=_search(zoo))


def _any_facts(cache: FactsCache) -> dict:
    if cache.entries:
        return next(reversed(cache.entries.values()))
    from jobs.convert import worker_facts      # imports torch: only without any cache

    return worker_facts()


def _search(zoo: Zoo) -> tuple[str, ...]:
    return search_path(os.path.dirname(os.path.abspath(zoo.path)))


def run(zoo: Zoo, opts: RunOptions, *, progress: Progress | None = None) -> RunResult:
    """Convert what the plan says to convert; record everything. See the module docstring.

    Raises:
        LockHeldError: another live run holds DEST's lock (LockLostError: it took it over).
        StoreError: DEST cannot be written.
        RayUnavailableError: the Ray cluster cannot be reached.
    """
    t0 = time.perf_counter()
    store = Store(opts.out)
    result = RunResult(run_id=new_run_id(), store=store.display)
    with StoreLock(store, result.run_id) as lock:
        run_ = _Run(zoo, opts, store, lock, result, progress)
        try:
            run_.execute()
            run_.finish(t0)
        except KeyboardInterrupt:
            run_.keep_what_finished()
            raise
        finally:
            run_.close()
    return result


class _Run:
    """One run's state while it holds the lock."""

    def __init__(self, zoo, opts, store, lock, result, progress):
        self.zoo, self.opts, self.store, self.lock, self.result = zoo, opts, store, lock, result
        self.progress = progress
        self.manifest: Manifest | None = None
        self.search = _search(zoo)
        self.facts_cache = FactsCache(store)
        self.last_flush: float | None = None

    def execute(self) -> None:
        self.store.sweep_temporaries()
        self.manifest = Manifest.load(self.store)
        hasher = SourceHasher(self.store)
        # Hash, and learn the workers' facts, while Ray starts: all three mostly wait.
        with ThreadPoolExecutor(2) as pool:
            hashed = pool.submit(_hash_all, self.zoo, hasher)
            facts = self._local_facts(pool)
            if joins_cluster(self.opts.address) or self._work_likely():
                self._start_ray()
            hashed.result()
            facts = facts.result()
            if self.result.ray_mode == "joined" and not self._new_dest():
                facts = fanout.worker_facts()
        units = make_plan(self.zoo, self.manifest, self.store, hasher, facts,
                          force=self.opts.force, search=self.search)
        hasher.save()
        todo = self._settle(units)
        if todo:
            self._fan_out(todo)
        # retirement is decided from the whole file, not the --only selection
        self.manifest.mark_retired(set(self.zoo.all_names or (m.name for m in self.zoo.models)))

    def _work_likely(self) -> bool:
        """A row never converted (or --force): Ray is needed whatever the hashes say."""
        return self.opts.force or any(
            (self.manifest.get(m.name, p) or {}).get("status") != "ok"
            for m in self.zoo.models for p in m.precisions)

    def _start_ray(self) -> None:
        if self.result.ray_mode is None:
            zoo_dir = os.path.dirname(os.path.abspath(self.zoo.path))
            self.result.ray_mode = fanout.connect(self.opts.address, self.opts.num_cpus, zoo_dir)

    def _local_facts(self, pool: ThreadPoolExecutor) -> Future:
        """The facts of this machine's workers (``jobs.keys``): as they last reported them, else
        computed here (a local Ray's workers run this interpreter; importing torch for it
        overlaps Ray's start). A joined cluster is asked instead (``fanout.worker_facts``)."""
        env = local_environment(self.search)
        cached = self.facts_cache.get(env)
        if cached is not None or joins_cluster(self.opts.address) or self._new_dest():
            done: Future = Future()
            done.set_result(cached)
            return done
        return pool.submit(self._computed_facts, env)

    def _new_dest(self) -> bool:
        """Nothing in DEST to compare keys with: the workers complete them, no facts needed."""
        return not self.manifest.rows and not self.store.exists("artifacts")

    def _computed_facts(self, env: str) -> dict:
        from jobs.convert import worker_facts      # imports torch: a new environment

        facts = worker_facts()
        self.facts_cache.put(env, facts)
        return facts

    def _settle(self, units: list[Unit]) -> list[Unit]:
        """Record skipped, failed and adopted rows; return the units left to convert."""
        todo = []
        for unit in units:
            row = self.manifest.get(unit.spec.name, unit.precision)
            if unit.action == "skip":
                self.result.rows.append(dict(row, status="skipped", reason=unit.reason))
            elif unit.action == "fail":
                self._record([failed_row(unit.spec, unit.precision, self.result.run_id,
                                         *unit.error, attempts=0, source=unit.source)],
                             {(unit.spec.name, unit.precision): unit.reason})
            elif not self.opts.force and unit.key and (record := intact_record(
                    self.store, unit.spec.name, unit.precision, unit.key)):
                self.manifest.record(record)
                reason = f"finished by run {record.get('run_id')}, which was interrupted"
                self.result.rows.append(dict(record, status="skipped", reason=reason))
            else:
                todo.append(unit)
        return todo

    def _fan_out(self, todo: list[Unit]) -> None:
        self._start_ray()
        jobs = jobs_for(todo, self.manifest, self.store.uri, self.result.run_id,
                        fanout.cluster_cpus(), force=self.opts.force)
        reasons = {(u.spec.name, u.precision): u.reason for u in todo}
        self.progress = self.progress or Progress(len(todo))
        local_env = None if self.result.ray_mode == "joined" else local_environment(self.search)
        pool = fanout.Fanout(jobs, self.store, max_retries=self.opts.max_retries)
        try:
            for done in pool.results():
                if done is not None:
                    rows = done.rows if done.error is None else _failed_job(done)
                    self._record(rows, reasons, running=pool.running)
                    if done.facts and local_env:
                        self.facts_cache.put(local_env, done.facts)
                self.progress.update(running=pool.running)
                self._flush()
        finally:
            self.progress.close()

    def _record(self, rows: list[dict], reasons: dict, running: int = 0) -> None:
        for row in rows:
            self.manifest.record(row)
            self.result.rows.append(dict(row, reason=reasons.get((row["name"], row["precision"]))))
            if self.progress:
                self.progress.advance(failed=row["status"] == "failed", running=running)

    def _flush(self, *, now: bool = False) -> None:
        """Write the manifest after the first result, then every FLUSH_EVERY_S."""
        converted = any(r["status"] != "skipped" for r in self.result.rows)
        due = self.last_flush is None or time.monotonic() - self.last_flush > FLUSH_EVERY_S
        if now or (converted and due):
            self.lock.ensure_held()
            self.manifest.write(self.store)
            self.last_flush = time.monotonic()

    def keep_what_finished(self) -> None:
        """Ctrl-C: keep what finished in the manifest; the next run converts the rest."""
        if self.manifest is not None and self.result.rows:
            self._flush(now=True)

    def close(self) -> None:
        if self.result.ray_started:
            fanout.shutdown()

    def finish(self, t0: float) -> None:
        from jobs.report import render_report

        self.result.duration_s = round(time.perf_counter() - t0, 3)
        self._flush(now=True)
        self.facts_cache.save()
        if self.result.ray_used:   # per-run retry counters: no longer needed
            self.store.delete(layout.attempts_dir(self.result.run_id))
        self.lock.ensure_held()
        self.store.write_json(layout.run_record(self.result.run_id), _run_record(self))
        html = render_report(self.manifest.sorted_rows(), run={
            "run_id": self.result.run_id, "updated_at": self.manifest.updated_at,
            "counts": self.result.counts})
        self.lock.ensure_held()
        self.store.write_bytes("report.html", html.encode())


def _hash_all(zoo: Zoo, hasher: SourceHasher) -> None:
    """Hash every checkpoint and dataset once, so planning reads the hasher's cache. Errors
    are left for the plan, which asks again and fails the rows concerned."""
    for spec in zoo.models:
        for fn, arg in ((hasher.digest, spec.checkpoint),
                        (hasher.digest_dataset, spec.calibration.data)):
            if arg:
                try:
                    fn(arg)
                except Exception:  # noqa: BLE001  (reported by make_plan, row by row)
                    pass


def _run_record(run_: _Run) -> dict:
    result = run_.result
    return {
        "run_id": result.run_id, "zoo": os.path.abspath(run_.zoo.path),
        "store": run_.store.display, "host": socket.gethostname(), "finished_at": now_iso(),
        "duration_s": result.duration_s, "ray_used": result.ray_used,
        "ray_mode": result.ray_mode, "counts": result.counts, "rows": result.rows,
        "argv": [redact_uri(a) for a in sys.argv]}


def failed_row(spec, precision: str, run_id: str, kind: str, msg: str, *, attempts: int,
               source=None, key: str | None = None) -> dict:
    """A ``failed`` row for a (model, precision) that failed outside a task (or never ran)."""
    return blank_row(
        name=spec.name, precision=precision,
        backend=spec.backend if precision == "int8" else None,
        observer=spec.observer if precision == "int8" else None,
        status="failed", key=key, run_id=run_id, source_uri=redact_uri(spec.checkpoint),
        source_sha256=source and source.sha256, source_bytes=source and source.bytes,
        error_type=kind, error_message=msg.strip().splitlines()[0][:2000] if msg.strip() else kind,
        attempts=attempts, finished_at=now_iso(), factory=spec.factory)


def _failed_job(done: fanout.Done) -> list[dict]:
    kind, msg, attempts = done.error
    job = done.job
    return [failed_row(job.spec, p.precision, job.run_id, kind, msg, attempts=attempts,
                       source=job.source, key=p.planned_key) for p in job.precisions]
