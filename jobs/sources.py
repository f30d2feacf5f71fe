"""What a conversion is made from, identified without running it: checkpoint and calibration
hashes, and the factory's code.

``SourceHasher`` hashes checkpoints and calibration shards (sha256), cached in DEST by file
identity. ``factory_code`` finds the source file of a factory's module and the installed version of
its top-level package WITHOUT importing anything: ``importlib.util.find_spec("a.b.c")`` would
import ``a`` and ``a.b`` (for ``torchvision.models`` that is torch itself, seconds, and user code
run in the driver), so the module is located by walking the search path the workers use (the
current folder, the zoo's folder, ``PYTHONPATH``, then ``sys.path``); only a top-level name not
found there is asked of the import system's finders (``find_spec`` of a top-level name imports
nothing; it covers editable installs). Only the module's own file is hashed, not what it imports:
a model spread over several files of a package is covered by the package's version when it is
installed, and otherwise needs ``--force`` after an edit of another file. Must not import ray,
click or torch.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import struct
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata

import pyarrow as pa
import pyarrow.fs as pafs

from jobs.layout import HASH_CACHE
from jobs.store import Store, StoreError, child_uri, filesystem_for, redact_uri, retry_io

SHARD_SUFFIXES = (".arrow", ".feather", ".parquet")   # as quantizer.shards reads


@dataclass(frozen=True)
class Source:
    uri: str
    sha256: str
    bytes: int
    # entries of a torch.save zip / tensors of a safetensors file (None: another format): how
    # many layers the model roughly has, for ordering jobs never timed (``jobs.plan.estimate_s``)
    tensors: int | None = None


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
        """The sha256 and size of one file.

        Raises:
            OSError: not found or unreadable (after the store's retries), naming the file.
        """
        fs, path, local = _filesystem(uri)
        info = _io(uri, fs.get_file_info, path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{redact_uri(uri)}: not found")
        if info.type != pafs.FileType.File:
            raise IsADirectoryError(f"{redact_uri(uri)}: is a folder, not a file")
        if local:
            st = os.stat(path)
            ident = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        else:
            ident = [info.size, info.mtime_ns]
        name = redact_uri(uri)      # the cache is written to DEST: no credentials in it
        cached = self.cache.get(name)
        if cached and cached.get("ident") == ident:
            return Source(uri, cached["sha256"], cached["bytes"], cached.get("tensors"))
        sha, size, tensors = _io(uri, _hash_file, fs, path)
        self.cache[name] = {"ident": ident, "sha256": sha, "bytes": size, "tensors": tensors}
        self.dirty = True
        return Source(uri, sha, size, tensors)

    def digest_dataset(self, uri: str) -> str:
        """One sha256 over every shard of a calibration file or folder (once per run).

        Raises:
            OSError: missing, empty of shards, or a shard unreadable, naming it.
        """
        if uri not in self._datasets:
            self._datasets[uri] = self._digest_dataset(uri)
        return self._datasets[uri]

    def _digest_dataset(self, uri: str) -> str:
        fs, path, _ = _filesystem(uri)
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
        if not names:
            raise FileNotFoundError(f"{redact_uri(uri)}: no {'/'.join(SHARD_SUFFIXES)} shards")
        h = hashlib.sha256()
        for name in names:
            h.update(f"{name}:{self.digest(child_uri(uri, name)).sha256};".encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.dirty:
            self.store.write_json(HASH_CACHE, self.cache)
            self.dirty = False


def _filesystem(uri: str):
    try:
        return filesystem_for(uri)
    except StoreError as e:
        raise OSError(str(e)) from None


def _io(uri: str, fn, *args):
    """``fn(*args)`` with the store's retries; a permanent failure stays an OSError (the row's)."""
    try:
        return retry_io(fn, *args, what=redact_uri(uri))
    except StoreError as e:
        raise OSError(str(e)) from None


def _hash_file(fs: pafs.FileSystem, path: str) -> tuple[str, int, int | None]:
    """sha256, size and ``tensor_count`` of one file, read once."""
    h, size, head, tail = hashlib.sha256(), 0, b"", b""
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
            head = head or chunk
            tail = chunk[-_TAIL_BYTES:] if len(chunk) >= _TAIL_BYTES else \
                (tail + chunk)[-_TAIL_BYTES:]
    return h.hexdigest(), size, tensor_count(head, tail)


_TAIL_BYTES = 65_536 + 22 + 56 + 20    # a zip's end records, behind a comment of up to 64 KiB
_EOCD, _EOCD64 = b"PK\x05\x06", b"PK\x06\x06"


def tensor_count(head: bytes, tail: bytes) -> int | None:
    """How many entries a ``torch.save`` zip holds (one per storage, plus ~6 records) or how
    many tensors a safetensors file declares, from the file's first and last bytes; None for any
    other format (a legacy pickle, a truncated file)."""
    at = tail.rfind(_EOCD)
    if at >= 0 and len(tail) >= at + 22:
        entries = struct.unpack_from("<H", tail, at + 10)[0]
        if entries != 0xFFFF:
            return entries
        at64 = tail.rfind(_EOCD64, 0, at)              # zip64: the count is in its own record
        return struct.unpack_from("<Q", tail, at64 + 32)[0] if at64 >= 0 else None
    if len(head) >= 8:
        length = struct.unpack_from("<Q", head)[0]
        if 2 <= length <= len(head) - 8 and head[8:9] == b"{":
            try:
                header = json.loads(head[8:8 + length])
            except ValueError:
                return None
            if isinstance(header, dict):
                return sum(1 for key in header if key != "__metadata__")
    return None


# -- the factory's code ---------------------------------------------------------------------

@dataclass(frozen=True)
class FactoryCode:
    """The file defining a factory's module (None: not found here) and its package's version."""

    file: str | None
    sha256: str | None
    package: str | None        # "distribution==version" of the top-level package, if installed

    def key_part(self) -> dict:
        return {"factory_sha256": self.sha256, "factory_package": self.package}


def search_path(zoo_dir: str) -> tuple[str, ...]:
    """Where workers look for a factory's module: the folder of the run, the zoo's folder,
    ``PYTHONPATH``, then this interpreter's ``sys.path`` (site-packages)."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    entries = [os.getcwd(), zoo_dir, *extra, *(p or os.getcwd() for p in sys.path)]
    return tuple(dict.fromkeys(os.path.abspath(p) for p in entries))


def factory_code(factory: str, path: tuple[str, ...]) -> FactoryCode:
    """Locate and hash the module of ``factory`` (``module:callable``); imports nothing."""
    module = factory.partition(":")[0]
    file = locate_module(module, path)
    return FactoryCode(file, _file_sha256(file) if file else None,
                       _package_version(module.split(".")[0], file))


def package_sha256(package: str, path: tuple[str, ...]) -> str | None:
    """One sha256 over the ``.py`` files of a package's folder (found without importing it)."""
    init = locate_module(package, path)
    if init is None:
        return None
    folder = os.path.dirname(init)
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".py")):
        h.update(f"{name}:{_file_sha256(os.path.join(folder, name))};".encode())
    return h.hexdigest()


def locate_module(module: str, path: tuple[str, ...]) -> str | None:
    """The source (or extension) file that ``import module`` would load, or None."""
    parts = module.split(".")
    for base in path:
        found = _find_in(base, parts)
        if found:
            return found
    try:   # a top-level name only: finding it imports nothing (editable installs' finders)
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if len(parts) == 1:
        return spec.origin if spec.origin and os.path.isfile(spec.origin) else None
    for base in spec.submodule_search_locations or ():
        found = _find_in(base, parts[1:])
        if found:
            return found
    return None


def _find_in(base: str, parts: list[str]) -> str | None:
    folder = os.path.join(base, *parts[:-1])
    if not os.path.isdir(folder):
        return None
    package = os.path.join(folder, parts[-1], "__init__.py")
    if os.path.isfile(package):
        return package
    for suffix in importlib.machinery.all_suffixes():
        candidate = os.path.join(folder, parts[-1] + suffix)
        if os.path.isfile(candidate):
            return candidate
    return None


_code_hashes: dict[tuple, str] = {}


def _file_sha256(file: str) -> str:
    st = os.stat(file)
    ident = (file, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if ident not in _code_hashes:      # many models share one factory module
        with open(file, "rb") as f:
            _code_hashes[ident] = hashlib.sha256(f.read()).hexdigest()
    return _code_hashes[ident]


@lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()      # reads every installed dist's metadata


@lru_cache(maxsize=None)
def _package_version(top: str, file: str | None) -> str | None:
    """``dist==version`` of the installed package ``top``, or None for code outside any
    installed distribution (its file's hash covers it). Cheap cases first: a distribution named
    like the package; only a file inside site-packages needs the full scan."""
    try:
        return f"{top}=={metadata.version(top)}"
    except metadata.PackageNotFoundError:
        pass
    if not file or not any(p in ("site-packages", "dist-packages") for p in file.split(os.sep)):
        return None
    for dist in _distributions().get(top, ()):
        try:
            return f"{dist}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def one_file_filesystem(data: bytes) -> pafs.FileSystem:
    """A read-only filesystem serving ``data`` under any name: a loader given it reads exactly
    the bytes that were hash-checked, whatever happens to the file meanwhile."""
    return pafs.PyFileSystem(_OneFile(data))


class _OneFile(pafs.FileSystemHandler):
    """A read-only filesystem serving one file's bytes, already hash-checked, under any name:
    ``quantizer.load_model`` then loads exactly the bytes that were verified."""

    def __init__(self, data: bytes):
        self.data = data

    def get_type_name(self):
        return "verified-bytes"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return [pafs.FileInfo(p, pafs.FileType.File, size=len(self.data)) for p in paths]

    def get_file_info_selector(self, selector):
        return []

    def open_input_stream(self, path):
        return pa.BufferReader(self.data)

    def open_input_file(self, path):
        return pa.BufferReader(self.data)

    def _read_only(self, *args):
        raise OSError("read-only: a verified checkpoint")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only
