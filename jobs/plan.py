"""The plan: which (model, precision) pairs to convert or skip, and why; content keys.

``KEY`` hashes everything that determines a result: the checkpoint's bytes, factory and kwargs,
precision, backend, observer and calibration data and settings (int8), the fidelity gates, and the
versions of torch and of this tool. The plan is decided from the zoo, the manifest and the store
alone, without importing torch or starting Ray, so a run with nothing to do is quick.
Must not import ray, click or torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata

import pyarrow.fs as pafs

from jobs.manifest import Manifest
from jobs.store import Store, StoreError, filesystem_for, redact_uri, retry_io
from jobs.zoo import ModelSpec, Zoo

HASH_CACHE = ".cache/source-hashes.json"
SHARD_SUFFIXES = (".arrow", ".feather", ".parquet")   # as quantizer.shards reads
KEY_CHARS = 24
ARTIFACT_FILE = "model.pt"   # the file quantizer.load_artifact takes


def versions() -> dict[str, str]:
    """torch's and this tool's versions, read from package metadata (no torch import)."""
    return {"torch": metadata.version("torch"), "quantizer": metadata.version("quantize-all")}


@dataclass(frozen=True)
class Source:
    uri: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Unit:
    """One unit of work: a model in one precision, with its key and what to do about it."""

    spec: ModelSpec
    precision: str
    key: str
    source: Source | None          # None when the checkpoint cannot be read (the task reports it)
    calibration_sha256: str | None
    action: str                     # "convert" | "skip"
    reason: str

    @property
    def artifact_dir(self) -> str:
        return f"artifacts/{self.spec.name}/{self.precision}/{self.key}"

    @property
    def record_path(self) -> str:
        """The completion record a finished task writes beside its artifact folder."""
        return f"{self.artifact_dir}.json"


class SourceHasher:
    """sha256 of checkpoints and calibration shards, cached by file identity.

    Local files are re-read only when (size, mtime_ns, ctime_ns, inode) changed. ctime cannot be
    set from user space, so rewriting a file and resetting its mtime with ``touch -d`` or
    ``os.utime`` still changes the identity. Object stores: (size, mtime) as the store reports.
    """

    def __init__(self, store: Store):
        self.store = store
        self.cache: dict[str, dict] = store.read_json(HASH_CACHE) or {}
        self.dirty = False
        self._datasets: dict[str, str] = {}   # many models share one calibration folder

    def digest(self, uri: str) -> Source:
        fs, path, local = filesystem_for(uri)
        info = _io(uri, fs.get_file_info, path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{redact_uri(uri)}: not found")
        if local:
            st = os.stat(path)
            ident = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        else:
            ident = [info.size, info.mtime_ns]
        name = redact_uri(uri)      # the cache is written to DEST: no credentials in it
        cached = self.cache.get(name)
        if cached and cached.get("ident") == ident:
            return Source(uri, cached["sha256"], cached["bytes"])
        sha, size = _io(uri, _hash_file, fs, path)
        self.cache[name] = {"ident": ident, "sha256": sha, "bytes": size}
        self.dirty = True
        return Source(uri, sha, size)

    def digest_dataset(self, uri: str) -> str:
        """One sha256 over every shard of a calibration file or folder (once per run)."""
        if uri not in self._datasets:
            self._datasets[uri] = self._digest_dataset(uri)
        return self._datasets[uri]

    def _digest_dataset(self, uri: str) -> str:
        fs, path, _ = filesystem_for(uri)
        info = _io(uri, fs.get_file_info, path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{redact_uri(uri)}: not found")
        if info.type == pafs.FileType.File:
            return self.digest(uri).sha256
        sel = pafs.FileSelector(path, recursive=False)
        names = sorted(
            i.base_name for i in _io(uri, fs.get_file_info, sel)
            if i.type == pafs.FileType.File and i.base_name.endswith(SHARD_SUFFIXES)
            and not i.base_name.startswith((".", "_")))
        h = hashlib.sha256()
        for name in names:
            h.update(f"{name}:{self.digest(uri.rstrip('/') + '/' + name).sha256};".encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.dirty:
            self.store.write_json(HASH_CACHE, self.cache)
            self.dirty = False


def _io(uri: str, fn, *args):
    """``fn(*args)`` with the store's retries; a permanent failure stays an OSError (the row's)."""
    try:
        return retry_io(fn, *args, what=redact_uri(uri))
    except StoreError as e:
        raise OSError(str(e)) from None


def _hash_file(fs: pafs.FileSystem, path: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def content_key(spec: ModelSpec, precision: str, source_sha256: str | None,
                calibration_sha256: str | None, vers: dict[str, str]) -> str:
    """The content key of one (model, precision): equal keys give the same artifact."""
    parts = {
        "source": source_sha256, "factory": spec.factory, "kwargs": spec.kwargs,
        "precision": precision, "gates": [spec.min_sqnr_db, spec.min_quantized_fraction],
        "calibration": calibration_sha256, "batch_size": spec.calibration.batch_size,
        "shape": spec.calibration.shape, "versions": vers,
    }
    if precision == "int8":
        # Only int8 depends on these: changing the backend reconverts the int8 rows alone.
        parts.update(backend=spec.backend, observer=spec.observer,
                     batches=spec.calibration.batches, min_speedup=spec.min_speedup)
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_CHARS]


def make_plan(zoo: Zoo, manifest: Manifest, store: Store, hasher: SourceHasher,
              *, force: bool = False) -> list[Unit]:
    """Decide convert/skip for every (model, precision) of the zoo."""
    vers = versions()
    units = []
    for spec in zoo.models:
        source, source_error = _try(hasher.digest, spec.checkpoint)
        calib = None
        if spec.calibration.data:
            calib, _ = _try(hasher.digest_dataset, spec.calibration.data)
        for precision in spec.precisions:
            key = content_key(spec, precision, source and source.sha256, calib, vers)
            action, reason = _decide(spec, precision, key, source, source_error,
                                     manifest.get(spec.name, precision), store, force)
            units.append(Unit(spec, precision, key, source, calib, action, reason))
    return units


def _try(fn, arg):
    try:
        return fn(arg), None
    except (OSError, ValueError, StoreError) as e:
        return None, str(e)  # one unreadable source is its rows' problem, not the run's


def _decide(spec, precision, key, source, source_error, row, store, force) -> tuple[str, str]:
    if source is None:
        return "convert", f"checkpoint unreadable ({source_error}); the task will report it"
    if force:
        return "convert", "--force"
    if row is None:
        return "convert", "new"
    if row.get("status") == "failed" and row.get("key") == key:
        return "convert", f"last attempt failed ({row.get('error_type')})"
    if row.get("key") != key:
        if row.get("source_sha256") != source.sha256:
            return "convert", "checkpoint changed"
        if precision == "int8" and row.get("backend") != spec.backend:
            return "convert", f"backend changed ({row.get('backend')} -> {spec.backend})"
        return "convert", "settings, calibration data or versions changed"
    if row.get("status") != "ok":
        return "convert", f"last status {row.get('status')}"
    if not _artifact_present(row, store):
        return "convert", "artifact missing from the store"
    return "skip", f"up to date (run {row.get('run_id')})"


def _artifact_present(row: dict, store: Store) -> bool:
    return store.exists(f"artifacts/{row['name']}/{row['precision']}/{row['key']}/{ARTIFACT_FILE}")
