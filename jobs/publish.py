"""Artifact folders in DEST: publish one atomically, and check what a record says is stored.

Two attempts at one key (a retried task, or a task of a killed driver still running beside the
rerun) must never leave the manifest describing bytes that are not in the store. So publishing is
first-writer-wins: a local folder appears with one rename, and on S3 each file is written only if
absent (``If-None-Match: *`` through boto3); whatever an attempt finds already there, it keeps and
describes by hashing the stored bytes. ``--force`` and a damaged folder replace the old files:
one atomic exchange of folders locally, a PUT per file elsewhere. A completion record counts only
while every file it lists is stored with its recorded sha256 and size. Must not import ray, click
or torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import uuid
from pathlib import Path

from jobs import layout
from jobs.layout import TEMP_PREFIX
from jobs.store import Store, StoreError, boto3_client, is_transient, redact_text, with_backoff


def publish_dir(store: Store, local_dir: str, rel: str, *, replace: bool = False) -> list[str]:
    """Publish a finished local folder as ``rel``; return the names that were kept as found.

    ``replace=False`` (first writer wins): what is already at ``rel`` stays and its names are
    returned, so the caller describes the stored bytes, never its own copy. ``replace=True``:
    the new files replace the old ones.

    Raises:
        StoreError: the store cannot be written.
    """
    if store.is_local:
        return _publish_local(store, local_dir, rel, replace)
    kept = []
    for sub in _local_files(local_dir):
        full = os.path.join(local_dir, *sub.split("/"))
        if replace:
            store.put_file(f"{rel}/{sub}", full)
        elif not _put_if_absent(store, f"{rel}/{sub}", full):
            kept.append(sub)
    return kept


def stored_files(store: Store, rel: str, names: list[str] | None = None) -> list[dict]:
    """``{path, sha256, bytes}`` of files under ``rel`` as stored (all of them by default)."""
    out = []
    for name in names if names is not None else store.list_files(rel):
        data = store.read_bytes(f"{rel}/{name}")
        if data is not None:
            out.append({"path": name, "sha256": hashlib.sha256(data).hexdigest(),
                        "bytes": len(data)})
    return out


def files_intact(store: Store, rel: str, files: list[dict] | None) -> bool:
    """Every file listed exists under ``rel`` with its recorded sha256 and size (reads them)."""
    if not files:
        return False
    found = {f["path"]: f for f in stored_files(store, rel, [f["path"] for f in files])}
    return all(found.get(f["path"]) == {"path": f["path"], "sha256": f["sha256"],
                                        "bytes": f["bytes"]} for f in files)


def files_present(store: Store, rel: str, files: list[dict] | None) -> bool:
    """Every file listed exists under ``rel`` with its recorded size (one listing, no reads)."""
    if not files:
        return False
    sizes = store.file_sizes(rel)
    return all(sizes.get(f["path"]) == f["bytes"] for f in files)


def intact_record(store: Store, name: str, precision: str, key: str) -> dict | None:
    """The ``ok`` completion record at ``key`` if the files it lists are stored intact."""
    record = store.read_json(layout.record_path(name, precision, key))
    if not record or record.get("status") != "ok" or record.get("key") != key:
        return None
    folder = layout.artifact_dir(name, precision, key)
    return record if files_intact(store, folder, record.get("files")) else None


def _publish_local(store: Store, local_dir: str, rel: str, replace: bool) -> list[str]:
    target = Path(store.path(rel))
    if target.is_dir() and not replace:
        return store.list_files(rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{target.name}"
    try:
        shutil.copytree(local_dir, tmp)
        if replace and target.is_dir():
            _swap_dirs(str(tmp), str(target))     # tmp now holds the old folder
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.is_dir() and not replace:
            return store.list_files(rel)           # another attempt published it meanwhile
        raise StoreError(f"output store {store.display}: writing {rel}: {e}") from e
    return []


def _local_files(folder: str) -> list[str]:
    out = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/"))
    return sorted(out)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _swap_dirs(a: str, b: str) -> None:
    """Exchange two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    Where the kernel or filesystem cannot, ``b`` is renamed aside and ``a`` put in its place:
    for that instant ``b`` is absent, never half-written.
    """
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD,
                                           os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return
    aside = f"{a}.old"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _put_if_absent(store: Store, rel: str, local_file: str) -> bool:
    """Write ``rel`` from a local file unless it exists; False when it was there."""
    client = _s3_client(store) if store.kind == "s3" else None
    if client is None:       # no conditional write here (GCS, HDFS, no boto3): check, then PUT
        if store.exists(rel):
            return False
        store.put_file(rel, local_file)
        return True
    bucket, _, key = store.path(rel).partition("/")
    try:
        return with_backoff(_s3_put_if_absent, client, bucket, key, local_file,
                            retryable=_transient_s3)
    except OSError as e:
        raise StoreError(f"output store {store.display}: writing {rel}: {e}") from None


def _s3_client(store: Store):
    """A boto3 client with the endpoint, region and credentials of an ``s3://`` store URI, or
    None without boto3 (the optional ``s3`` extra)."""
    if not hasattr(store, "_boto3"):
        store._boto3 = _make_s3_client(store)
    return store._boto3


def _make_s3_client(store: Store):
    try:
        return boto3_client(store, read_timeout_s=60)       # uploads: a longer read timeout
    except ImportError:
        return None


def _s3_put_if_absent(client, bucket: str, key: str, local_file: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        with open(local_file, "rb") as body:
            client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 412 or e.response.get("Error", {}).get("Code") == "PreconditionFailed":
            return False
        raise OSError(f"s3://{bucket}/{key}: {redact_text(str(e))}") from None
    except BotoCoreError as e:
        raise OSError(f"s3://{bucket}/{key}: timed out or unreachable: "
                      f"{redact_text(str(e))}") from None
    return True


def _transient_s3(error: BaseException) -> bool:
    # 409 ConditionalRequestConflict: another conditional write to this key is in flight
    return "ConditionalRequestConflict" in str(error) or is_transient(error)
