"""The run lock on DEST: one live run at a time, on a local folder or an object store.

The lock is one object, ``DEST/.lock``, holding ``{run_id, host, pid, started_at, heartbeat}``;
the holder refreshes ``heartbeat`` every ``LOCK_EXPIRY_S / 6``. A lock not refreshed for
``LOCK_EXPIRY_S`` (or, on the same host, whose PID is gone) is dead and is taken over. Three
backends give the same semantics:

- local folders: created with ``O_EXCL``; a dead lock is renamed aside (atomic) before retaking.
- S3 (with boto3): conditional writes. ``PUT If-None-Match: *`` creates it only if absent, a
  takeover or heartbeat is ``PUT If-Match: <etag seen>`` and release is ``DELETE If-Match``, so
  of two runs racing only one wins (S3 answers the loser 412 Precondition Failed).
- other object stores, or S3 without boto3: advisory. Create-if-absent is a check, a PUT and a
  read-back after ``ADVISORY_SETTLE_S``; S3 and GCS are read-after-write consistent, so two runs
  both winning needs both to start within that window. Install boto3 for a strict lock on S3.
Must not import ray or click.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from jobs.store import (LOCK_EXPIRY_S, LOCK_NAME, LockHeldError, Store, StoreError,
                        TransientStoreError, redact_text)

ADVISORY_SETTLE_S = 1.0


class LockLostError(LockHeldError):
    """This run no longer holds DEST's lock (another run took it over): stop writing (exit 3)."""

    def __init__(self, uri: str, run_id: str, holder: dict | None):
        self.holder = holder or {}
        Exception.__init__(
            self, f"{uri}: run {run_id} lost its lock"
            + (f" to run {self.holder.get('run_id')} on host {self.holder.get('host')}"
               if holder else " (the lock is gone)")
            + "; it stopped before writing the manifest again. Check that no two runs share "
              "this DEST, then run the command again.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_is_dead(holder: dict, now: float) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _pid_alive(holder["pid"]):
            return True
    return now - float(holder.get("heartbeat", 0)) > LOCK_EXPIRY_S


class StoreLock:
    """An exclusive lock on DEST (see the module docstring for the backends)."""

    def __init__(self, store: Store, run_id: str):
        self.store, self.run_id = store, run_id
        self.path = store.path(LOCK_NAME)
        self.holder = {
            "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "heartbeat": time.time(),
        }
        self.backend = _backend_for(store, self.path)
        self.mode = self.backend.mode       # "local" | "s3-conditional" | "advisory"

    # -- the CONTRACTS.md API (a minimal version until jobs.lock is rewritten) ----------------
    def __enter__(self) -> "StoreLock":
        self.acquire()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beat_loop, name="quantize-all-lock",
                                      daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()
        self.release()

    @property
    def held(self) -> bool:
        """The last known state: False once a check found another holder."""
        return getattr(self, "_held", True)

    def ensure_held(self) -> None:
        """Re-read the lock; raise LockLostError unless this run still holds it."""
        holder, _ = self.backend.read()
        if holder is None or holder.get("run_id") != self.run_id:
            self._held = False
            raise LockLostError(self.store.display, self.run_id, holder)

    def _beat_loop(self) -> None:
        while not self._stop.wait(LOCK_EXPIRY_S / 6):
            self.heartbeat()

    def acquire(self) -> None:
        """Take the lock, taking over a dead holder's lock.

        Raises:
            LockHeldError: a live run holds it.
            StoreError: DEST (its bucket) cannot be reached.
        """
        self.store.check_reachable()
        for _ in range(3):
            if self.backend.create(self._blob()):
                return
            holder, token = self.backend.read()
            if holder is None:
                continue                      # released in between: try again
            if not _holder_is_dead(holder, time.time()):
                raise LockHeldError(self.store.display, holder)
            if self.backend.take_over(token, self._blob()):
                return
        raise LockHeldError(self.store.display, self.backend.read()[0] or {})

    def heartbeat(self) -> None:
        """Refresh the heartbeat if this run still holds the lock."""
        self.holder["heartbeat"] = time.time()
        try:
            self.backend.refresh(self.run_id, self._blob())
        except (OSError, StoreError):
            pass      # the next beat tries again; the lock expires only after LOCK_EXPIRY_S

    def release(self) -> None:
        """Remove the lock if this run holds it."""
        self.backend.release(self.run_id)

    def _blob(self) -> bytes:
        return json.dumps(self.holder).encode()


def _backend_for(store: Store, path: str):
    if store.is_local:
        return _LocalBackend(path)
    if store.kind == "s3":
        try:
            import boto3  # noqa: F401  (optional: only the strict S3 lock needs it)
        except ImportError:
            return _AdvisoryBackend(store)
        return _S3Backend(store)
    return _AdvisoryBackend(store)


def _parse(blob: bytes | None) -> dict | None:
    if blob is None:
        return None
    try:
        return json.loads(blob or b"{}")
    except json.JSONDecodeError:
        # A holder killed between create and write leaves an empty file: treat it as a lock
        # with no heartbeat, which expires at once.
        return {"heartbeat": 0}


class _LocalBackend:
    mode = "local"

    def __init__(self, path: str):
        self.path = path

    def create(self, blob: bytes) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        return True

    def read(self) -> tuple[dict | None, None]:
        try:
            return _parse(Path(self.path).read_bytes()), None
        except FileNotFoundError:
            return None, None

    def take_over(self, token, blob: bytes) -> bool:
        # Renaming the stale lock aside is atomic: of two runs taking over at once, only one
        # rename succeeds and the loser sees the winner's fresh lock.
        try:
            os.rename(self.path, f"{self.path}.stale-{uuid.uuid4().hex}")
        except FileNotFoundError:
            return False
        return self.create(blob)

    def refresh(self, run_id: str, blob: bytes) -> None:
        current, _ = self.read()
        if current is not None and current.get("run_id") == run_id:
            tmp = f"{self.path}.hb-{uuid.uuid4().hex}"
            Path(tmp).write_bytes(blob)
            os.replace(tmp, self.path)

    def release(self, run_id: str) -> None:
        current, _ = self.read()
        if current is not None and current.get("run_id") == run_id:
            os.remove(self.path)
        for stale in Path(self.path).parent.glob(f"{Path(self.path).name}.stale-*"):
            stale.unlink(missing_ok=True)


class _S3Backend:
    """Conditional writes through boto3 (pyarrow's S3 client cannot send If-None-Match)."""

    mode = "s3-conditional"

    def __init__(self, store: Store):
        self.store = store
        self.bucket, _, self.key = store.path(LOCK_NAME).partition("/")
        self.client = _s3_client(store)
        self.etag: str | None = None

    def create(self, blob: bytes) -> bool:
        return self._put(blob, IfNoneMatch="*")

    def read(self) -> tuple[dict | None, str | None]:
        try:
            got = self._call(self.client.get_object, Bucket=self.bucket, Key=self.key)
        except _NotFound:
            return None, None
        return _parse(got["Body"].read()), got["ETag"]

    def take_over(self, token: str | None, blob: bytes) -> bool:
        return token is not None and self._put(blob, IfMatch=token)

    def refresh(self, run_id: str, blob: bytes) -> None:
        if self.etag is not None and not self._put(blob, IfMatch=self.etag):
            self.etag = None                  # taken over after expiry: stop refreshing

    def release(self, run_id: str) -> None:
        if self.etag is None:
            return
        try:
            self._call(self.client.delete_object, Bucket=self.bucket, Key=self.key,
                       IfMatch=self.etag)
        except _Precondition:
            pass                              # someone else's lock now: leave it
        except StoreError as e:
            if "NotImplemented" not in str(e):
                raise
            current, _ = self.read()          # a store without conditional deletes
            if current and current.get("run_id") == run_id:
                self._call(self.client.delete_object, Bucket=self.bucket, Key=self.key)
        self.etag = None

    def _put(self, blob: bytes, **condition) -> bool:
        try:
            got = self._call(self.client.put_object, Bucket=self.bucket, Key=self.key,
                             Body=blob, ContentType="application/json", **condition)
        except _Precondition:
            return False
        self.etag = got["ETag"]
        return True

    def _call(self, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise _Precondition() from None
            if code in ("NoSuchKey", "404") or status == 404 and code != "NoSuchBucket":
                raise _NotFound() from None
            kind = TransientStoreError if status and status >= 500 else StoreError
            raise kind(f"output store {self.store.display}: lock {LOCK_NAME}: "
                       f"{redact_text(str(e))}") from None
        except BotoCoreError as e:
            raise TransientStoreError(f"output store {self.store.display}: lock {LOCK_NAME}: "
                                      f"{redact_text(str(e))}") from None


class _Precondition(Exception):
    pass


class _NotFound(Exception):
    pass


def _s3_client(store: Store):
    """A boto3 S3 client with the same endpoint, region and credentials as the store's URI."""
    import boto3
    from botocore.config import Config

    parts = urlsplit(store.uri)
    query = dict(parse_qsl(parts.query))
    endpoint = query.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
    creds = {}
    if parts.username:
        creds = {"aws_access_key_id": unquote(parts.username),
                 "aws_secret_access_key": unquote(parts.password or "")}
    region = query.get("region") or getattr(store.fs, "region", None) or None
    # endpoint None: boto3 reads AWS_ENDPOINT_URL(_S3) itself, as pyarrow does
    config = Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=5,
                    read_timeout=20)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config, **creds)


class _AdvisoryBackend:
    """Check, PUT, settle, read back: for stores without conditional writes (see module doc)."""

    mode = "advisory"

    def __init__(self, store: Store):
        self.store = store

    def create(self, blob: bytes) -> bool:
        if self.store.exists(LOCK_NAME):
            return False
        return self._write_and_confirm(blob)

    def read(self) -> tuple[dict | None, str | None]:
        data = self.store.read_bytes(LOCK_NAME)
        return _parse(data), None if data is None else data.decode(errors="replace")

    def take_over(self, token: str | None, blob: bytes) -> bool:
        data = self.store.read_bytes(LOCK_NAME)
        if data is None or data.decode(errors="replace") != token:
            return False                      # changed since we judged it dead
        return self._write_and_confirm(blob)

    def refresh(self, run_id: str, blob: bytes) -> None:
        current, _ = self.read()
        if current is not None and current.get("run_id") == run_id:
            self.store.write_bytes(LOCK_NAME, blob)

    def release(self, run_id: str) -> None:
        current, _ = self.read()
        if current is not None and current.get("run_id") == run_id:
            self.store.delete(LOCK_NAME)

    def _write_and_confirm(self, blob: bytes) -> bool:
        self.store.write_bytes(LOCK_NAME, blob)
        time.sleep(ADVISORY_SETTLE_S)
        return self.store.read_bytes(LOCK_NAME) == blob
