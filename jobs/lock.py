"""The run lock on DEST: one live run writes DEST at a time (SPEC.md section 8).

Use::

    with StoreLock(store, run_id) as lock:   # acquire; start the heartbeat thread
        ...
        lock.ensure_held()   # before every manifest, report or run-record write: LockLostError
    # on exit: the heartbeat thread is stopped AND joined, then the lock is released

``DEST/.lock`` holds ``{run_id, host, pid, boot_id, pid_ns, proc_start, started_at, heartbeat,
beat}`` (``jobs.lock_identity`` says why a holder is named by more than host and pid). The lock's
own thread rewrites it every ``expiry_s / 6`` with ``beat`` counted up, so its bytes (its *token*:
the file's bytes, or S3's ETag) change for as long as the holder lives.

Judging a holder dead, in this order:

1. the kernel: a local lock whose ``flock`` is held has a live holder, wherever it runs; one whose
   ``flock`` is free and whose holder ran on this kernel (same boot id, any pid namespace) is dead.
   On object stores, a holder on this kernel and in this pid namespace is dead when no process with
   its pid and start tick exists (``jobs.lock_identity``).
2. watching, when the kernel cannot tell (a holder on another host; on S3, in another pid
   namespace): a holder whose ``heartbeat`` looks fresh by our clock is alive at once; otherwise the
   contender watches the token for ``expiry_s`` of its *own monotonic clock* and the holder is dead
   only if the token never changed. Wall clocks of two hosts are never compared to take a lock over:
   skew can only make a contender wait longer, never take a live lock.

The take-over is then a compare-and-swap on the token judged dead (``jobs.lock_backends``): if the
lock was written since, the swap fails and the contender judges the new holder. A heartbeat that
finds the lock no longer ours, or that has not landed for ``expiry_s / 2``, marks it lost;
``ensure_held()`` also re-reads the store. Must not import ray or click.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time

from jobs import lock_identity
from jobs.lock_backends import backend_for
from jobs.store import LOCK_EXPIRY_S, LOCK_NAME, LockHeldError, Store, StoreError

_ACQUIRE_ATTEMPTS = 5
_log = logging.getLogger(__name__)


class LockLostError(Exception):
    """This run no longer holds DEST's lock (CLI exit 3): it must stop writing DEST."""

    def __init__(self, uri: str, run_id: str, reason: str):
        self.reason = reason
        super().__init__(
            f"{uri}: run {run_id} lost the lock on DEST ({reason}); it stopped writing DEST. "
            f"Another run may own DEST now: see {uri}/runs/ and run the same command again "
            f"once it has finished")


class StoreLock:
    """An exclusive lock on DEST with its own heartbeat thread (see the module docstring)."""

    def __init__(self, store: Store, run_id: str):
        self.store, self.run_id = store, run_id
        self.expiry_s = float(LOCK_EXPIRY_S)   # read per lock, so a test can shorten it
        self.holder = {
            "run_id": run_id, **lock_identity.identity(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "heartbeat": time.time(), "beat": 0,
        }
        self.backend = backend_for(store)
        self.mode = self.backend.mode       # "local" | "s3-conditional" | "advisory"
        self.held = False                   # the last known state (cheap to read)
        self.lost_reason: str | None = None
        self._mutex = threading.Lock()      # one store operation on our lock at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._landed_at = 0.0               # monotonic time of our last write that landed

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (taking over a dead holder's) and start the heartbeat thread.

        Raises:
            LockHeldError: a live run holds it, or was seen refreshing it while we watched.
            StoreError: DEST cannot be reached, or its filesystem cannot lock files.
        """
        self.store.check_reachable()
        for _ in range(_ACQUIRE_ATTEMPTS):
            if self._try_acquire():
                self.held, self.lost_reason = True, None
                self._landed_at = time.monotonic()
                self._start_heartbeat()
                return
        raise LockHeldError(self.store.display, self.backend.read()[0] or {})

    def _try_acquire(self) -> bool:
        """True when taken; False to try again (it changed hands or vanished)."""
        blob = self._blob()
        if self.backend.create(blob):
            return True
        holder, token = self.backend.read()
        if holder is None:
            return False                    # released in between
        alive = self.backend.alive(holder)
        if alive is None:
            alive = self._seems_alive(holder, token)
        if alive:
            raise LockHeldError(self.store.display, self.backend.read()[0] or holder)
        return self.backend.take_over(token, blob)

    def _seems_alive(self, holder: dict, token) -> bool:
        """A holder the kernel cannot vouch for: alive if fresh-looking or seen to change."""
        beat = holder.get("heartbeat")
        if isinstance(beat, (int, float)) and math.isfinite(beat) \
                and abs(time.time() - beat) < self.expiry_s:
            return True
        _log.warning("%s/%s: run %s (host %s) has not refreshed its lock by our clock; watching "
                     "it for %.0f s before taking it over", self.store.display, LOCK_NAME,
                     holder.get("run_id"), holder.get("host"), self.expiry_s)
        deadline = time.monotonic() + self.expiry_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, self.expiry_s / 12))
            current, now = self.backend.read()
            if now != token:
                return current is not None  # refreshed: alive; released: not, try again
        return False

    def heartbeat(self) -> None:
        """Refresh the lock if this run still holds it; mark it lost if it is no longer ours."""
        with self._mutex:
            if not self.held:
                return
            self.holder["heartbeat"] = time.time()
            self.holder["beat"] += 1
            try:
                ours = self.backend.refresh(self._blob())
            except (OSError, StoreError) as e:
                self._lose_if_stale(f"{type(e).__name__}: {e}")
                return
            if ours:
                self._landed_at = time.monotonic()
            else:
                self._lose(self._who_has_it())

    def ensure_held(self) -> None:
        """Re-check the store; return only if this run still holds the lock.

        Raises:
            LockLostError: the lock was taken over or deleted, or not refreshed for long enough
                that another run may have judged this one dead.
            StoreError: DEST cannot be read to check.
        """
        with self._mutex:
            self._lose_if_stale("no heartbeat landed")
            if self.held and not self.backend.check():
                self._lose(self._who_has_it())
            if not self.held:
                raise LockLostError(self.store.display, self.run_id,
                                    self.lost_reason or "it was released")

    def release(self) -> None:
        """Stop and join the heartbeat thread, then remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            try:
                if self.held:
                    self.backend.release()
            except (OSError, StoreError) as e:
                _log.warning("%s/%s: could not remove the lock (%s); the next run takes it over "
                             "once it is judged dead", self.store.display, LOCK_NAME, e)
            finally:
                self.backend.close()
                self.held = False

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="quantize-all-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while self.held and not self._stop.wait(self.expiry_s / 6):
            self.heartbeat()

    def _lose_if_stale(self, why: str) -> None:
        silent = time.monotonic() - self._landed_at
        if self.held and silent > self.expiry_s / 2:
            self._lose(f"its heartbeat has not landed for {silent:.0f} s ({why}); after "
                       f"{self.expiry_s:.0f} s another run may take DEST over")

    def _lose(self, reason: str) -> None:
        self.held, self.lost_reason = False, reason
        _log.error("%s/%s: run %s lost the lock: %s", self.store.display, LOCK_NAME,
                   self.run_id, reason)

    def _who_has_it(self) -> str:
        try:
            holder, _ = self.backend.read()
        except (OSError, StoreError) as e:
            return f"{LOCK_NAME} is no longer ours, and cannot be read: {e}"
        if holder is None:
            return f"{LOCK_NAME} was deleted by someone else"
        return (f"{LOCK_NAME} now names run {holder.get('run_id')} on host {holder.get('host')} "
                f"(pid {holder.get('pid')})")

    def _blob(self) -> bytes:
        return json.dumps(self.holder, allow_nan=False).encode()
