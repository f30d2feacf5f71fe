"""The run lock on a local DEST, for real: racing processes, crashed holders, a holder in another
pid namespace, a holder on another machine whose clock is off, a lock lost mid-run.

Holders and racers are separate processes (``tests/jobs/lock_race.py``); nothing here starts Ray.
The pid-namespace test needs root for ``unshare -p`` (it skips without, and fails under CI).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs import lock as lock_mod
from jobs.lock import LockLostError, StoreLock
from jobs.store import LockHeldError, Store
from tests.jobs.lock_race import (RACERS, ROUNDS, crash_holding, hold_in_pid_namespace, race,
                                  require_unshare)


def test_racers_on_a_crashed_holders_lock_exactly_one_wins(tmp_path):
    uris = [str(tmp_path / f"dest-{r}") for r in range(ROUNDS)]
    crash_holding(uris, tmp_path)
    held = json.loads(Path(uris[0], ".lock").read_text())
    assert held["run_id"].startswith("crashed-") and held["host"] == socket.gethostname()
    outcomes = race(uris)
    for round_ in range(ROUNDS):
        assert sorted(outcomes[round_]) == ["held"] * (RACERS - 1) + ["won"], outcomes[round_]
    assert not [u for u in uris if Path(u, ".lock").exists()]   # each winner released its lock


# -- a holder in another pid namespace on this host ---------------------------------------------
def test_a_live_holder_in_another_pid_namespace_keeps_its_lock(tmp_path):
    require_unshare()
    dest = tmp_path / "out"
    proc, stop = hold_in_pid_namespace(dest, tmp_path, "--die")
    try:
        holder = json.loads((dest / ".lock").read_text())
        assert holder["host"] == socket.gethostname()
        assert not Path(f"/proc/{holder['pid']}").exists()   # its pid means nothing here
        with pytest.raises(LockHeldError, match=holder["run_id"]):
            StoreLock(Store(str(dest)), "second").acquire()
    finally:
        stop.touch()
        proc.wait(30)
    # It died without releasing: its flock died with it, so the lock is taken over at once.
    with StoreLock(Store(str(dest)), "second") as lock:
        assert lock.held and json.loads((dest / ".lock").read_text())["run_id"] == "second"


# -- a holder on another machine, whose clock is 400 s behind ours ------------------------------
def _foreign_holder(path: Path, stop: threading.Event, skew_s: float) -> None:
    """What a holder on another machine leaves in DEST/.lock: its flock is not visible here
    (a filesystem whose flock is host-local), its boot id is not ours, its clock is off."""
    beat = 0
    while not stop.is_set():
        holder = {"run_id": "far-away-run", "host": "another-machine", "pid": 4242,
                  "boot_id": "boot-of-another-machine", "started_at": "2026-01-01T00:00:00Z",
                  "heartbeat": time.time() + skew_s, "beat": beat}
        tmp = path.with_name(".lock.writing")
        tmp.write_text(json.dumps(holder))
        os.replace(tmp, path)
        beat += 1
        stop.wait(0.1)


def test_a_holder_on_another_machine_with_a_slow_clock_is_watched_not_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod, "LOCK_EXPIRY_S", 1.5)
    store, stop = Store(str(tmp_path)), threading.Event()
    writer = threading.Thread(target=_foreign_holder, args=(tmp_path / ".lock", stop, -400.0))
    writer.start()
    try:
        while not (tmp_path / ".lock").exists():
            time.sleep(0.01)
        # its heartbeat reads 400 s old by our clock, yet it changes: alive
        with pytest.raises(LockHeldError, match="far-away-run"):
            StoreLock(store, "mine").acquire()
    finally:
        stop.set()
        writer.join()
    # now it stopped changing: taken over, but only after watching it for the whole expiry
    t0 = time.monotonic()
    with StoreLock(store, "mine") as lock:
        assert time.monotonic() - t0 >= 1.5
        assert lock.held and json.loads((tmp_path / ".lock").read_text())["run_id"] == "mine"
    assert not (tmp_path / ".lock").exists()


# -- losing the lock, and letting it go ---------------------------------------------------------
def test_a_run_whose_lock_was_replaced_stops_and_leaves_the_new_lock(tmp_path):
    store, path = Store(str(tmp_path)), tmp_path / ".lock"
    with StoreLock(store, "first") as first:
        first.ensure_held()
        path.unlink()                                   # e.g. a cleanup job deleted it
        second = StoreLock(store, "second")
        second.acquire()
        with pytest.raises(LockLostError, match="now names run second on host"):
            first.ensure_held()
        assert not first.held
        first.heartbeat()                               # a late beat must not write over it
        assert json.loads(path.read_text())["run_id"] == "second"
    assert json.loads(path.read_text())["run_id"] == "second"   # leaving did not remove it
    second.release()
    assert not path.exists()


def test_leaving_the_block_joins_the_heartbeat_before_releasing(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod, "LOCK_EXPIRY_S", 0.06)   # a beat every 10 ms
    store, path = Store(str(tmp_path)), tmp_path / ".lock"
    for i in range(30):
        with StoreLock(store, f"run-{i}") as lock:
            deadline = time.monotonic() + 10
            while lock.holder["beat"] < 2 and time.monotonic() < deadline:
                time.sleep(0.005)                    # beats are landing when we leave
            assert lock.held and lock.holder["beat"] >= 2
        assert not lock.held and not path.exists()
        assert "quantize-all-lock" not in {t.name for t in threading.enumerate()}
    time.sleep(0.1)
    assert not path.exists()


def test_cli_exits_3_when_the_run_loses_its_lock(tmp_path, monkeypatch):
    from jobs import driver
    from jobs.cli import main

    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models:\n  - {name: m, factory: 'pkg.mod:Net', checkpoint: m.pt, "
                   "precisions: [fp16]}\n")

    def lose(spec, opts, **_):
        raise LockLostError(str(tmp_path / "out"), "run-a", ".lock now names run run-b on "
                            "host h2 (pid 7)")

    monkeypatch.setattr(driver, "run", lose)
    result = CliRunner().invoke(main, [str(zoo), "--out", str(tmp_path / "out")])
    assert result.exit_code == 3, result.output
    assert "run run-a lost the lock on DEST" in result.output and "run-b" in result.output
