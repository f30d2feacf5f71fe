"""Processes for the lock tests (``test_lock.py``, ``test_lock_s3.py``): holders that crash, sit in
another pid namespace or pretend to be another machine, and racers started at one instant.

``crash_holding``, ``race`` and ``hold_in_pid_namespace`` run in the test and start the others.
As a command, ``python -m tests.jobs.lock_race hold DEST READY STOP [--die] [--expiry S]
[--skew S] [--foreign]`` takes DEST's lock, writes READY, waits until STOP exists (60 s at most),
then releases, or with ``--die`` exits at once without releasing (a crash: the kernel drops the
``flock``, the lock's bytes stay). ``--expiry`` shortens ``LOCK_EXPIRY_S`` (every party of a test
uses the same), ``--skew`` sets this process's wall clock that many seconds off, ``--foreign`` gives
it another boot id and hostname (a holder on another machine).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROUNDS, RACERS = 50, 8
REPO = Path(__file__).resolve().parents[2]


# -- in the test process ------------------------------------------------------------------------
def crash_holding(uris: list[str], tmp_path: Path) -> None:
    """One process takes the lock of every DEST in ``uris``, then is SIGKILLed."""
    ready = tmp_path / "crashed-holder"
    proc = mp.get_context("spawn").Process(target=_hold_then_crash, args=(uris, str(ready)))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL and ready.exists()


def race(uris: list[str]) -> dict[int, list[str]]:
    """RACERS processes try each DEST's lock at the same instant; their outcomes per round."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(RACERS), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(w, uris, barrier, results)) for w in range(RACERS)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=120) for _ in range(len(uris) * RACERS)]
    finally:
        for p in procs:
            p.join(30)
            if p.exitcode is None:
                p.kill()
    outcomes = defaultdict(list)
    for round_, _, outcome in got:
        outcomes[round_].append(outcome)
    return outcomes


def require_unshare() -> None:
    """Skip (fail under CI) unless this process may run ``unshare -p`` (root and util-linux)."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        return
    if os.environ.get("CI"):
        pytest.fail("the pid-namespace tests need root and unshare(1) (util-linux) in CI")
    pytest.skip("needs root and unshare(1)")


def _unused_pid() -> int:
    """A pid no process of this namespace has, near the top of the range (rarely reached)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(p for p in range(pid_max - 100, 300, -1) if not Path(f"/proc/{p}").exists())


def hold_in_pid_namespace(dest, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """A ``hold`` process in a new pid namespace whose pid, seen from here, is no process's.

    Returns the ``unshare`` process and the STOP file that ends the holder.
    """
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    pid = _unused_pid()
    hold = [sys.executable, "-m", "tests.jobs.lock_race", "hold", dest, ready, stop, *extra]
    script = (f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid && "
              f"{' '.join(shlex.quote(str(a)) for a in hold)}")
    proc = subprocess.Popen(["unshare", "-p", "-f", "--mount-proc", "sh", "-c", script],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    wait_ready(proc, ready)
    return proc, stop


def wait_ready(proc: subprocess.Popen, ready: Path) -> None:
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the holder did not start"
        time.sleep(0.02)


# -- in the processes those start ---------------------------------------------------------------
def _hold_then_crash(uris: list[str], ready: str) -> None:
    """Take the lock on every DEST in ``uris``, write ``ready``, then die by SIGKILL."""
    from jobs.lock import StoreLock
    from jobs.store import Store

    for uri in uris:
        StoreLock(Store(uri), f"crashed-{os.getpid()}").acquire()
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def _race(worker: int, uris: list[str], barrier, results) -> None:
    """For each DEST in turn: wait for every racer, try to take its lock, report, hold it until
    every racer has reported, then release it."""
    from jobs.lock import StoreLock
    from jobs.store import LockHeldError, Store

    for round_, uri in enumerate(uris):
        lock = StoreLock(Store(uri), f"racer-{worker}-round-{round_}")
        barrier.wait()
        try:
            lock.acquire()
            outcome = "won"
        except LockHeldError:
            outcome = "held"
        except Exception as e:  # noqa: BLE001  (reported to the test, which fails on it)
            outcome = f"error: {type(e).__name__}: {e}"
        results.put((round_, worker, outcome))
        barrier.wait()
        if outcome == "won":
            lock.release()


def _hold(args) -> None:
    from jobs import lock as lock_mod
    from jobs.store import Store

    if args.expiry:
        lock_mod.LOCK_EXPIRY_S = args.expiry
    if args.skew:
        real = time.time
        time.time = lambda: real() + args.skew
    if args.foreign:
        from jobs import lock_identity

        lock_identity.BOOT_ID = "boot-of-another-machine"
        socket.gethostname = lambda: "another-machine"
    lock = lock_mod.StoreLock(Store(args.dest), f"held-by-{os.getpid()}")
    lock.acquire()
    with open(args.ready, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not os.path.exists(args.stop) and time.monotonic() < deadline:
        time.sleep(0.02)
    if args.die:
        os._exit(0)
    lock.release()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["hold"])
    parser.add_argument("dest")
    parser.add_argument("ready")
    parser.add_argument("stop")
    parser.add_argument("--die", action="store_true")
    parser.add_argument("--foreign", action="store_true")
    parser.add_argument("--expiry", type=float)
    parser.add_argument("--skew", type=float)
    _hold(parser.parse_args())
