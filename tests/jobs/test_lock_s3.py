"""The run lock on S3, for real: moto's server on loopback (the fixtures of ``test_s3.py``),
boto3's conditional writes, racing processes, holders in another pid namespace or on another
machine, a lock deleted or taken over mid-run. Nothing here starts Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from jobs import lock as lock_mod
from jobs.lock import LockLostError, StoreLock
from jobs.store import LockHeldError, Store
from tests.jobs.lock_race import (RACERS, REPO, ROUNDS, crash_holding, hold_in_pid_namespace,
                                  race, require_unshare, wait_ready)
from tests.jobs.test_s3 import moto, s3_env, s3_uri  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def lock_of(store: Store) -> dict | None:
    data = store.read_bytes(".lock")
    return None if data is None else json.loads(data)


def test_lock_on_s3_uses_conditional_writes(moto):
    store = Store(s3_uri(moto, "locked"))
    first, second = StoreLock(store, "run-1"), StoreLock(store, "run-2")
    assert first.mode == "s3-conditional"
    with first:
        with pytest.raises(LockHeldError, match="run-1"):
            second.acquire()
        first.heartbeat()
        assert lock_of(store)["beat"] == first.holder["beat"] == 1
        # Two runs judged the same token dead: S3 lets exactly one swap it.
        _, etag = first.backend.read()
        third = StoreLock(store, "run-3")
        assert second.backend.take_over(etag, second._blob()) is True
        assert third.backend.take_over(etag, third._blob()) is False
        with pytest.raises(LockLostError, match="now names run run-2"):
            first.ensure_held()
    assert lock_of(store)["run_id"] == "run-2"   # first's exit left the new lock alone
    second.backend.release()
    assert store.read_bytes(".lock") is None


def test_s3_racers_on_a_crashed_holders_lock_exactly_one_wins(moto, tmp_path):
    uris = [s3_uri(moto, f"race/dest-{r}", via_proxy=False) for r in range(ROUNDS)]
    crash_holding(uris, tmp_path)
    assert lock_of(Store(uris[0]))["run_id"].startswith("crashed-")
    outcomes = race(uris)
    for round_ in range(ROUNDS):
        assert sorted(outcomes[round_]) == ["held"] * (RACERS - 1) + ["won"], outcomes[round_]
    assert not [u for u in uris if Store(u).read_bytes(".lock") is not None]


def test_deleted_s3_lock_is_reported_not_raised(moto, monkeypatch):
    monkeypatch.setattr(lock_mod, "LOCK_EXPIRY_S", 0.6)      # a beat every 0.1 s
    store = Store(s3_uri(moto, "deleted"))
    with StoreLock(store, "run-1") as lock:
        store.delete(".lock")                                   # behind the lock's back
        deadline = time.monotonic() + 10
        while lock.held and time.monotonic() < deadline:       # the next beat notices
            time.sleep(0.02)
        assert not lock.held and lock._thread is not None
        lock._thread.join(timeout=5)        # the beat that lost it returns, and the loop ends
        assert not lock._thread.is_alive()
        with pytest.raises(LockLostError, match=r"\.lock was deleted by someone else"):
            lock.ensure_held()
        lock.heartbeat()                                        # no traceback, no new lock
    assert store.read_bytes(".lock") is None                    # and leaving it raised nothing


def test_a_stalled_s3_holder_taken_over_stops(moto, monkeypatch):
    store = Store(s3_uri(moto, "stalled"))
    stalled = StoreLock(store, "stalled")   # expiry 300 s: it will not beat during this test
    stalled.holder.update(boot_id="boot-of-another-machine", heartbeat=0.0)
    stalled.acquire()
    monkeypatch.setattr(lock_mod, "LOCK_EXPIRY_S", 1.0)
    t0 = time.monotonic()
    with StoreLock(store, "next"):
        assert time.monotonic() - t0 >= 1.0                     # watched it for the expiry first
        with pytest.raises(LockLostError, match="now names run next"):
            stalled.ensure_held()
        stalled.heartbeat()
        stalled.release()
        assert lock_of(store)["run_id"] == "next"
    assert store.read_bytes(".lock") is None


def _hold(moto, tmp_path, prefix: str, *extra: str) -> tuple[subprocess.Popen, Store]:
    dest = s3_uri(moto, prefix, via_proxy=False)
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-m", "tests.jobs.lock_race", "hold", dest,
                             str(ready), str(stop), *extra], cwd=REPO)
    wait_ready(proc, ready)
    return proc, Store(dest)


def test_an_s3_holder_on_another_machine_with_a_slow_clock_is_watched_not_taken(
        moto, tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod, "LOCK_EXPIRY_S", 3.0)     # a beat every 0.5 s
    proc, store = _hold(moto, tmp_path, "skewed", "--foreign", "--skew", "-400",
                        "--expiry", "3", "--die")
    try:
        holder = lock_of(store)
        assert holder["host"] == "another-machine" and time.time() - holder["heartbeat"] > 390
        with pytest.raises(LockHeldError, match=holder["run_id"]):
            StoreLock(store, "mine").acquire()
    finally:
        (tmp_path / "stop").touch()
        proc.wait(30)
    t0 = time.monotonic()               # it died: its lock stops changing, and is taken over
    with StoreLock(store, "mine"):
        assert time.monotonic() - t0 >= 3.0 and lock_of(store)["run_id"] == "mine"


def test_a_live_s3_holder_in_another_pid_namespace_keeps_its_lock(moto, tmp_path, monkeypatch):
    require_unshare()
    monkeypatch.setattr(lock_mod, "LOCK_EXPIRY_S", 3.0)
    dest = s3_uri(moto, "pidns", via_proxy=False)
    proc, stop = hold_in_pid_namespace(dest, tmp_path, "--expiry", "3")
    try:
        holder = lock_of(Store(dest))
        assert not os.path.exists(f"/proc/{holder['pid']}")     # its pid means nothing here
        with pytest.raises(LockHeldError, match=holder["run_id"]):
            StoreLock(Store(dest), "second").acquire()
    finally:
        stop.touch()
        proc.wait(30)
    assert Store(dest).read_bytes(".lock") is None             # it released on its way out
