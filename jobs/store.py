"""The output store: a folder or a URI behind ``pyarrow.fs``, atomic writes, and the run lock.

Everything quantize-all writes to DEST goes through ``Store``: bytes land under a temporary name and
are renamed into place (local stores), or are written as one object under a content-addressed key
(object stores, where a PUT is atomic). The lock keeps two runs on one DEST from interleaving.
Must not import ray or click.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

# A lock whose holder has not refreshed it for this long is taken to be dead (the holder's
# heartbeat refreshes it every LOCK_EXPIRY_S / 6). Same-host holders whose PID is gone are dead
# at once.
LOCK_EXPIRY_S = 300.0
LOCK_NAME = ".lock"

_SECRET_QUERY = re.compile(r"(?i)(secret|token|key|password|credential|signature)")


class StoreError(Exception):
    """The output store cannot be reached or written (CLI exit 4)."""


class TransientStoreError(StoreError):
    """A store error worth retrying: a timeout, a connection reset, a 5xx answer."""


class LockHeldError(Exception):
    """Another live run holds the lock on this store (CLI exit 3)."""

    def __init__(self, uri: str, holder: dict):
        self.holder = holder
        super().__init__(
            f"{uri} is locked by run {holder.get('run_id')} on host {holder.get('host')} "
            f"(pid {holder.get('pid')}) since {holder.get('started_at')}; wait for it to finish. "
            f"A lock not refreshed for {LOCK_EXPIRY_S:.0f} s is taken over automatically."
        )


_TRANSIENT = re.compile(
    r"(?i)(time[d ]?out|timed out|connection (reset|refused|aborted)|network_connection|"
    r"response code: 5\d\d|\b50[0234]\b|slowdown|throttl|temporarily|try again)")


def is_transient(error: BaseException) -> bool:
    """True for store errors worth retrying (timeouts, resets, 5xx); False for 403, 404, ..."""
    return bool(_TRANSIENT.search(str(error)))


def redact_text(text: str) -> str:
    """``text`` with user-info of any URIs in it removed (error messages quote URIs)."""
    return re.sub(r"([a-z][a-z0-9+.-]*://)[^/@\s]*@", r"\1", text)


def redact_uri(uri: str) -> str:
    """Return ``uri`` without user-info and without secret-looking query parameters."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(
        q for q in parts.query.split("&") if q and not _SECRET_QUERY.search(q.split("=", 1)[0])
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str, bool]:
    """Return ``(filesystem, path, is_local)`` for a folder path or a ``scheme://`` URI.

    Raises:
        StoreError: the URI's scheme or options are not understood by pyarrow.
    """
    if "://" not in uri or uri.startswith("file://"):
        path = urlsplit(uri).path if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), True
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot open store {redact_uri(uri)}: {e}") from None
    return fs, path.rstrip("/"), False


@dataclass
class Store:
    """One output store (DEST). Paths given to its methods are relative to DEST."""

    uri: str

    def __post_init__(self):
        self.fs, self.root, self.is_local = filesystem_for(self.uri)
        self.display = redact_uri(self.uri) if not self.is_local else self.root

    # -- paths ---------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def uri_of(self, rel: str) -> str:
        """A credential-free URI of ``rel`` for the manifest."""
        if self.is_local:
            return Path(self.path(rel)).as_uri()
        scheme = urlsplit(self.uri).scheme
        return f"{scheme}://{self.path(rel)}"

    def open_uri(self, rel: str) -> str:
        """A URI of ``rel`` that keeps DEST's options (endpoint, credentials): never record it."""
        if self.is_local:
            return self.path(rel)
        parts = urlsplit(self.uri)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + rel))

    # -- reading -------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._call(self.fs.get_file_info, self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes | None:
        """The bytes of ``rel``, or None when it does not exist."""
        if not self.exists(rel):
            return None
        with self._call(self.fs.open_input_stream, self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str):
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def list_files(self, rel: str) -> list[str]:
        """Relative paths of every file under ``rel`` (recursive), sorted."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=True)
        infos = self._call(self.fs.get_file_info, sel)
        base = self.path(rel) + "/"
        return sorted(i.path[len(base):] for i in infos if i.type == pafs.FileType.File)

    # -- writing -------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` atomically: aside then rename (local) or one PUT (object stores)."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self._call(self.fs.create_dir, parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{target.rsplit('/', 1)[1]}" if self.is_local else target
        with self._call(self.fs.open_output_stream, tmp) as f:
            f.write(data)
        if self.is_local:
            os.replace(tmp, target)

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=False, default=str).encode())

    def put_dir(self, local_dir: str, rel: str) -> bool:
        """Publish a finished local folder as ``rel``; False if ``rel`` already exists.

        Local stores: copy aside into DEST, then one rename, so the folder appears whole or not at
        all. Object stores: upload file by file under ``rel`` (a content key, so a retry writes the
        same bytes to the same place); the completion record written after it is the commit.
        """
        if self.exists(rel):
            return False
        if self.is_local:
            target = Path(self.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".tmp-{uuid.uuid4().hex}-{target.name}"
            try:
                shutil.copytree(local_dir, tmp)
                os.rename(tmp, target)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if target.is_dir():
                    return False
                raise StoreError(f"output store {self.display}: writing {rel}: {e}") from e
            return True
        for name in sorted(os.listdir(local_dir)):
            with open(os.path.join(local_dir, name), "rb") as f:
                self.write_bytes(f"{rel}/{name}", f.read())
        return True

    def delete(self, rel: str) -> None:
        info = self._call(self.fs.get_file_info, self.path(rel))
        if info.type == pafs.FileType.Directory:
            self._call(self.fs.delete_dir, self.path(rel))
        elif info.type == pafs.FileType.File:
            self._call(self.fs.delete_file, self.path(rel))

    def sweep_temporaries(self, rel: str = "artifacts") -> int:
        """Delete ``.tmp-*`` leftovers of killed writers under ``rel`` (local stores only)."""
        if not self.is_local or not os.path.isdir(self.path(rel)):
            return 0
        count = 0
        for dirpath, dirnames, filenames in os.walk(self.path(rel)):
            for name in [n for n in dirnames + filenames if n.startswith(".tmp-")]:
                full = os.path.join(dirpath, name)
                shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
                count += 1
            dirnames[:] = [d for d in dirnames if not d.startswith(".tmp-")]
        return count

    def check_writable(self) -> None:
        """Fail early (StoreError) when DEST cannot be created or written."""
        self.write_bytes(".probe", b"ok")
        self.delete(".probe")

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except OSError as e:
            kind = TransientStoreError if is_transient(e) else StoreError
            raise kind(f"output store {self.display}: {redact_text(str(e))}") from e


# -- the lock -------------------------------------------------------------------------------------
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
    """An exclusive lock on DEST: a ``.lock`` file created with O_EXCL, refreshed by heartbeat.

    Local stores only here; object stores get their own lock in ``jobs.store`` (documented in
    README: without conditional writes an object store cannot arbitrate, so the lock there is
    advisory).
    """

    def __init__(self, store: Store, run_id: str):
        self.store, self.run_id = store, run_id
        self.path = store.path(LOCK_NAME)
        self.holder = {
            "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "heartbeat": time.time(),
        }

    def acquire(self) -> None:
        """Take the lock, taking over a dead holder's lock; LockHeldError if it is alive."""
        os.makedirs(self.store.root, exist_ok=True)
        for _ in range(3):
            if self._create():
                return
            holder = self._read()
            if holder is None:
                continue
            if not _holder_is_dead(holder, time.time()):
                raise LockHeldError(self.store.display, holder)
            # Renaming the stale lock aside is atomic: of two runs taking over at once,
            # only one rename succeeds and the loser sees the winner's fresh lock.
            try:
                os.rename(self.path, f"{self.path}.stale-{uuid.uuid4().hex}")
            except FileNotFoundError:
                continue
        holder = self._read() or {}
        raise LockHeldError(self.store.display, holder)

    def heartbeat(self) -> None:
        self.holder["heartbeat"] = time.time()
        current = self._read()
        if current is not None and current.get("run_id") == self.run_id:
            tmp = f"{self.path}.hb-{uuid.uuid4().hex}"
            Path(tmp).write_text(json.dumps(self.holder))
            os.replace(tmp, self.path)

    def release(self) -> None:
        current = self._read()
        if current is not None and current.get("run_id") == self.run_id:
            os.remove(self.path)
        for stale in Path(self.store.root).glob(f"{LOCK_NAME}.stale-*"):
            stale.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.holder, f)
        return True

    def _read(self) -> dict | None:
        try:
            return json.loads(Path(self.path).read_text() or "{}")
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            # A holder killed between O_EXCL create and its write leaves an empty file: treat
            # it as a lock with no heartbeat, which expires at once.
            return {"heartbeat": 0}
