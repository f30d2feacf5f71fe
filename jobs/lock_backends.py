"""Where DEST's lock lives: a local file under ``flock``, an S3 object with conditional writes
(``jobs.lock_s3``), or an advisory object on other stores. ``jobs.lock`` decides *when* to take or drop the lock; these
classes only make each step a compare-and-swap on the store.

Every backend offers the same six steps. ``create(blob)`` takes the lock if nobody holds it.
``read()`` returns ``(holder, token)``: the holder's JSON and a token that changes with every
write (the file's bytes; S3's ETag). ``alive(holder)`` answers from the kernel when it can (True,
False) and None when it cannot. ``take_over(token, blob)`` replaces the lock only if it still
holds ``token``. ``refresh(blob)`` rewrites our own lock only if it is still ours and says whether
it was; ``check()`` says whether it is still ours; ``release()`` removes it only if it is ours.

Local folders: ``DEST/.lock`` is opened and locked with ``flock(LOCK_EX | LOCK_NB)``; the holder
keeps that descriptor (and its kernel lock) open for the whole run, and the kernel drops the lock
when the process dies, in whatever pid namespace it ran. Every write happens under that kernel
lock, after checking that the locked file is still the one at ``DEST/.lock`` (a release unlinks
it), so judging a holder dead and replacing its bytes cannot interleave with another contender.
A held ``flock`` proves a live holder wherever it runs; a free one proves a dead holder only on
this kernel (same boot id): a filesystem may keep ``flock`` host-local, so holders on other hosts
are judged by ``jobs.lock`` from their heartbeat. A local DEST shared between hosts therefore
needs a filesystem whose ``flock`` is cluster-wide (NFSv4, or NFSv3 with NLM, not ``nolock`` or
``local_lock=flock``); otherwise use an object store.

S3 (with boto3): conditional writes, in ``jobs.lock_s3``. Other object stores, or S3 without
boto3: advisory (check, PUT, settle ``ADVISORY_SETTLE_S``, read back), which two runs starting
within that window can both pass. Must not import ray or click.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time

from jobs.lock_identity import process_alive, same_kernel
from jobs.store import LOCK_NAME, Store, StoreError

ADVISORY_SETTLE_S = 1.0
# The local lock's bytes are padded to this size, so a heartbeat rewrites them in one pwrite of
# unchanged length (a reader never sees a shortened file).
_LOCAL_BLOB_BYTES = 1024


def backend_for(store: Store):
    """The strictest backend DEST's store allows (see the module docstring)."""
    if store.is_local:
        return LocalBackend(store.path(LOCK_NAME))
    if store.kind == "s3":
        try:
            import boto3  # noqa: F401  (optional: only the strict S3 lock needs it)
        except ImportError:
            return AdvisoryBackend(store)
        from jobs.lock_s3 import S3Backend

        return S3Backend(store)
    return AdvisoryBackend(store)


def parse_holder(blob: bytes | None) -> dict | None:
    """The holder's JSON; ``{}`` for bytes that are not JSON (a torn or foreign write)."""
    if blob is None:
        return None
    try:
        holder = json.loads(blob or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


class LocalBackend:
    """``DEST/.lock`` held under ``flock`` for the run's life (see the module docstring)."""

    mode = "local"

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None          # open, flock'ed, while we hold the lock
        self.written: bytes | None = None   # our bytes in it

    def create(self, blob: bytes) -> bool:
        fd = self._open_locked(create=True)
        if fd is None:
            return False
        if os.pread(fd, _LOCAL_BLOB_BYTES + 1, 0).strip():
            os.close(fd)                    # a holder's bytes: for jobs.lock to judge
            return False
        return self._keep(fd, blob)

    def read(self) -> tuple[dict | None, bytes | None]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return parse_holder(data), data

    def alive(self, holder: dict) -> bool | None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True                     # a live process holds the kernel lock
        finally:
            os.close(fd)
        return False if same_kernel(holder) else None

    def take_over(self, token: bytes | None, blob: bytes) -> bool:
        fd = self._open_locked(create=False)
        if fd is None:
            return False
        if token is None or os.pread(fd, len(token) + 1, 0) != token:
            os.close(fd)                    # changed since it was judged dead
            return False
        return self._keep(fd, blob)

    def refresh(self, blob: bytes) -> bool:
        if not self.check():
            return False
        self.written = _write(self.fd, blob)
        return True

    def check(self) -> bool:
        if self.fd is None:
            return False
        try:
            same = _same_file(os.fstat(self.fd), os.stat(self.path))
        except FileNotFoundError:
            return False
        return same and os.pread(self.fd, len(self.written) + 1, 0) == self.written

    def release(self) -> None:
        if self.check():
            os.remove(self.path)            # while still flock'ed: nobody has it open to judge
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)               # drops the kernel lock
        self.fd, self.written = None, None

    def _keep(self, fd: int, blob: bytes) -> bool:
        self.fd, self.written = fd, _write(fd, blob)
        return True

    def _open_locked(self, *, create: bool) -> int | None:
        """A descriptor of the file now at ``self.path``, under our ``flock``; None if busy."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = _same_file(os.fstat(fd), os.stat(self.path))
        except BlockingIOError:
            same = None
        except FileNotFoundError:
            same = False                    # released (unlinked) before we locked it
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise StoreError(f"cannot lock {self.path}: {e.strerror}; the run lock needs a "
                                 f"filesystem with flock(2) (mount NFS with locking, not "
                                 f"'nolock'), or an object store as DEST") from None
            raise
        if not same:
            os.close(fd)
            return None
        return fd


def _write(fd: int, blob: bytes) -> bytes:
    """Overwrite the file behind ``fd`` with ``blob`` padded with spaces; return what was written."""
    padded = blob.ljust(_LOCAL_BLOB_BYTES)
    os.pwrite(fd, padded, 0)
    os.ftruncate(fd, len(padded))   # a no-op unless a holder's bytes were longer
    os.fsync(fd)
    return padded


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class AdvisoryBackend:
    """Check, PUT, settle, read back: for stores without conditional writes (see module doc)."""

    mode = "advisory"

    def __init__(self, store: Store):
        self.store = store
        self.written: bytes | None = None

    def create(self, blob: bytes) -> bool:
        if self.store.exists(LOCK_NAME):
            return False
        return self._write_and_confirm(blob)

    def read(self) -> tuple[dict | None, bytes | None]:
        data = self.store.read_bytes(LOCK_NAME)
        return parse_holder(data), data

    def alive(self, holder: dict) -> bool | None:
        return process_alive(holder)

    def take_over(self, token: bytes | None, blob: bytes) -> bool:
        if token is None or self.store.read_bytes(LOCK_NAME) != token:
            return False                      # changed since we judged it dead
        return self._write_and_confirm(blob)

    def refresh(self, blob: bytes) -> bool:
        if not self.check():
            return False
        self.store.write_bytes(LOCK_NAME, blob)
        self.written = blob
        return True

    def check(self) -> bool:
        return self.written is not None and self.store.read_bytes(LOCK_NAME) == self.written

    def release(self) -> None:
        if self.check():
            self.store.delete(LOCK_NAME)
        self.written = None

    def close(self) -> None:
        self.written = None

    def _write_and_confirm(self, blob: bytes) -> bool:
        self.store.write_bytes(LOCK_NAME, blob)
        time.sleep(ADVISORY_SETTLE_S)
        if self.store.read_bytes(LOCK_NAME) != blob:
            return False
        self.written = blob
        return True
