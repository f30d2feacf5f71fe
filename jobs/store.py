"""The output store: a folder or a URI behind ``pyarrow.fs``, atomic writes, retries, redaction.

Everything quantize-all writes to DEST goes through ``Store``: bytes land under a temporary name and
are renamed into place (local stores), or are written as one object under a content-addressed key
(object stores, where a PUT is atomic but there is no rename). Transient store errors (timeouts,
resets, 5xx) are retried here with bounded exponential backoff; permanent ones (403, a missing
bucket) raise ``StoreError`` at once. Credentials never leave this module in a URI or a message:
``redact_uri`` and ``redact_text`` strip them. The run lock lives in ``jobs.lock``.
Must not import ray or click.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import pyarrow.fs as pafs

from jobs.layout import TEMP_PREFIX

# A lock whose holder has not refreshed it for this long is taken to be dead (the holder's
# heartbeat refreshes it every LOCK_EXPIRY_S / 6). Same-host holders whose PID is gone are dead
# at once.
LOCK_EXPIRY_S = 300.0
LOCK_NAME = ".lock"

# Transient errors: RETRY_ATTEMPTS tries, sleeping RETRY_BASE_S, doubling up to RETRY_MAX_S
# (0.2 + 0.4 + ... + 5 + 5 = 16 s at most, on top of pyarrow's own 3 tries per request).
RETRY_ATTEMPTS = 8
RETRY_BASE_S = 0.2
RETRY_MAX_S = 5.0

_SECRET_QUERY = re.compile(r"(?i)(secret|token|key|password|credential|signature)")
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "GOOGLE_APPLICATION_CREDENTIALS_JSON")
_MIN_SECRET_CHARS = 8           # shorter values would mangle ordinary words in messages
_seen_secrets: set[str] = set()  # user-info seen in URIs parsed by this process


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
    r"response code: 5\d\d|\b50[0234]\b|slow_?down|throttl|temporarily|try again|"
    r"service_?unavailable|internal_?(failure|error)|couldn't connect|curlCode)")


def is_transient(error: BaseException) -> bool:
    """True for store errors worth retrying (timeouts, resets, 5xx); False for 403, 404, ..."""
    return bool(_TRANSIENT.search(str(error)))


def _remember_secrets(uri: str) -> None:
    parts = urlsplit(uri) if "://" in uri else None
    for value in (parts.username, parts.password) if parts else ():
        if value and len(unquote(value)) >= _MIN_SECRET_CHARS:
            _seen_secrets.update({value, unquote(value)})


def redact_text(text: str) -> str:
    """``text`` without URI user-info, secret query values, or known credential values.

    Known credentials: the AWS key, secret and session token of this process's environment, and
    user-info of any URI this process parsed with ``redact_uri`` or ``filesystem_for``.
    """
    text = re.sub(r"([a-z][a-z0-9+.-]*://)[^/@\s]*@", r"\1", text)
    text = re.sub(r"(?i)([?&][a-z_]*(?:secret|token|password|credential|signature)[a-z_]*=)"
                  r"[^&\s]*", r"\1***", text)
    secrets = set(_seen_secrets)
    secrets.update(v for v in (os.environ.get(k) for k in _SECRET_ENV)
                   if v and len(v) >= _MIN_SECRET_CHARS)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def redact_uri(uri: str) -> str:
    """Return ``uri`` without user-info and without secret-looking query parameters."""
    if "://" not in uri:
        return uri
    _remember_secrets(uri)
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(
        q for q in parts.query.split("&") if q and not _SECRET_QUERY.search(q.split("=", 1)[0])
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str, bool]:
    """Return ``(filesystem, path, is_local)`` for a folder path or a ``scheme://`` URI.

    Credentials come from the URI's user-info or pyarrow's usual chain (for S3: the
    ``AWS_*`` environment, ``~/.aws``, instance roles; ``AWS_ENDPOINT_URL`` or
    ``?endpoint_override=host:port&scheme=http`` for S3-compatible stores).

    Raises:
        StoreError: the URI's scheme or options are not understood by pyarrow.
    """
    if "://" not in uri or uri.startswith("file://"):
        path = urlsplit(uri).path if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), True
    _remember_secrets(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:
        raise StoreError(_one_line(f"cannot open store {redact_uri(uri)}: {redact_text(str(e))}"))
    return fs, path.rstrip("/"), False


def _one_line(text: str) -> str:
    return " ".join(text.split())


def with_backoff(fn, *args, retryable, **kwargs):
    """Call ``fn(*args, **kwargs)``, retrying errors ``retryable(error)`` accepts.

    Up to ``RETRY_ATTEMPTS`` tries, sleeping ``RETRY_BASE_S`` doubling to ``RETRY_MAX_S`` with
    full jitter (retries of many workers hitting one store spread out). The last error, or the
    first one not retryable, is raised as it is.
    """
    delay = RETRY_BASE_S
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == RETRY_ATTEMPTS or not retryable(e):
                raise
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(2 * delay, RETRY_MAX_S)
    raise AssertionError("unreachable")


def _transient_oserror(error: BaseException) -> bool:
    return (isinstance(error, OSError) and not isinstance(error, FileNotFoundError)
            and is_transient(error))


def retry_io(fn, *args, what: str = "store", **kwargs):
    """Call ``fn(*args, **kwargs)``, retrying transient ``OSError``s with exponential backoff.

    Returns:
        What ``fn`` returns.

    Raises:
        FileNotFoundError: as ``fn`` raised it (never retried).
        TransientStoreError: still transient after ``RETRY_ATTEMPTS`` tries.
        StoreError: any other ``OSError`` (403, a missing bucket, ...), at once.
    """
    try:
        return with_backoff(fn, *args, retryable=_transient_oserror, **kwargs)
    except FileNotFoundError:
        raise
    except OSError as e:
        transient = is_transient(e)
        kind = TransientStoreError if transient else StoreError
        tries = f" (after {RETRY_ATTEMPTS} tries)" if transient else ""
        raise kind(_one_line(f"{what}: {redact_text(str(e))}{tries}")) from None


@dataclass
class Store:
    """One output store (DEST). Paths given to its methods are relative to DEST."""

    uri: str

    def __post_init__(self):
        self.fs, self.root, self.is_local = filesystem_for(self.uri)
        self.display = redact_uri(self.uri) if not self.is_local else self.root
        self.kind = "local" if self.is_local else self.fs.type_name   # "s3", "gcs", "hdfs", ...

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

    @property
    def bucket(self) -> str | None:
        """The bucket of an object store (s3, gcs), else None."""
        return self.root.split("/", 1)[0] if self.kind in ("s3", "gcs") else None

    # -- reading -------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._call(self.fs.get_file_info, self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes | None:
        """The bytes of ``rel``, or None when it does not exist."""
        def read():
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        try:
            return self._call(read)
        except FileNotFoundError:
            return None

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
        if self.kind != "s3":        # S3 has no folders: a marker object would only clutter
            self._call(self.fs.create_dir, parent, recursive=True)
        if not self.is_local:
            self._call(self._put, target, data)
            return
        tmp = f"{parent}/{TEMP_PREFIX}{uuid.uuid4().hex}-{target.rsplit('/', 1)[1]}"
        try:
            self._call(self._put, tmp, data)
            os.replace(tmp, target)
        except BaseException:
            # a full disk mid-write must not leave a half-written file beside the manifest
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def _put(self, path: str, data) -> None:
        """One whole write; a retry starts it again from the first byte."""
        with self.fs.open_output_stream(path) as out:
            if isinstance(data, (bytes, bytearray, memoryview)):
                out.write(data)
            else:
                with open(data, "rb") as f:
                    shutil.copyfileobj(f, out, 8 << 20)

    def put_file(self, rel: str, local_file: str) -> None:
        """Write ``rel`` from a local file (one PUT; a retry starts again from the first byte)."""
        self._call(self._put, self.path(rel), local_file)

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=False, default=str).encode())

    def delete(self, rel: str) -> None:
        info = self._call(self.fs.get_file_info, self.path(rel))
        if info.type == pafs.FileType.Directory:
            self._call(self.fs.delete_dir, self.path(rel))
        elif info.type == pafs.FileType.File:
            self._call(self.fs.delete_file, self.path(rel))

    def sweep_temporaries(self, rel: str = "artifacts", *,
                          older_than_s: float = LOCK_EXPIRY_S) -> int:
        """Delete temporaries of killed writers under ``rel`` (local stores only).

        A temporary is a killed writer's only when nothing in it changed for ``older_than_s``:
        a live writer (a task of this run, or of a run that lost the lock and does not know
        yet) is writing into its temporary right now, and its files are never swept.
        """
        if not self.is_local or not os.path.isdir(self.path(rel)):
            return 0
        count, cutoff = 0, time.time() - older_than_s
        for dirpath, dirnames, filenames in os.walk(self.path(rel)):
            for name in [n for n in dirnames + filenames if n.startswith(TEMP_PREFIX)]:
                full = os.path.join(dirpath, name)
                if _newest_mtime(full) >= cutoff:
                    continue
                if os.path.isdir(full):
                    shutil.rmtree(full, ignore_errors=True)
                else:
                    os.remove(full)
                count += 1
            dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_PREFIX)]
        return count

    def file_sizes(self, rel: str) -> dict[str, int]:
        """``{relative path: bytes}`` of every file under ``rel`` (one listing)."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=True)
        base = self.path(rel) + "/"
        return {i.path[len(base):]: i.size for i in self._call(self.fs.get_file_info, sel)
                if i.type == pafs.FileType.File}

    def check_reachable(self) -> None:
        """Fail early with a one-line StoreError when DEST's bucket is missing or forbidden."""
        if self.bucket is None:
            return
        info = self._call(self.fs.get_file_info, self.bucket)
        if info.type == pafs.FileType.NotFound:
            raise StoreError(f"output store {self.display}: bucket {self.bucket!r} does not "
                             f"exist (or these credentials cannot see it); create it or fix --out")

    def _call(self, fn, *args, **kwargs):
        return retry_io(fn, *args, what=f"output store {self.display}", **kwargs)


def child_uri(uri: str, name: str) -> str:
    """``uri``/``name``: the child joins the path, a URI's ``?query`` (endpoint, region) stays."""
    if "://" not in uri:
        return os.path.join(uri, name)
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))


def _newest_mtime(path: str) -> float:
    newest = os.lstat(path).st_mtime
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def boto3_client(store: Store, *, read_timeout_s: float):
    """A boto3 S3 client with the endpoint, region and credentials of ``store``'s ``s3://`` URI
    (the strict lock's conditional writes and first-writer-wins publishing need what pyarrow
    does not offer). With no endpoint in the URI, boto3 reads ``AWS_ENDPOINT_URL(_S3)`` itself,
    as pyarrow does.

    Raises:
        ImportError: boto3 is not installed (the optional ``s3`` extra).
    """
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
    config = Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=5,
                    read_timeout=read_timeout_s)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config, **creds)
