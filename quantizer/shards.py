"""Calibration shards on disk: where the files live, how they are listed, opened and written.

Owns the file side of SPEC.md section 2: which suffixes count as shards (``.arrow``/``.feather``
Arrow IPC, ``.parquet``), how a folder is listed (name order, hidden and ``_``-prefixed files
skipped, so a writer's temporary file is never read), how one shard is opened (a local IPC file is
memory-mapped) and ``write_calibration``, which writes every file atomically with the ``input``
column as a canonical, unpermuted ``arrow.fixed_shape_tensor``. Files and folders are reached
through ``pyarrow.fs`` (plain paths are local, ``scheme://`` URIs go through
``FileSystem.from_uri``). What the columns must hold, and the torch batches, belong to
``quantizer.calibration``, which imports this module: so this one must not import it, nor ray,
click, jobs or torch.ao.
"""

from __future__ import annotations

import math
import os
import uuid
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch

from quantizer.errors import CalibrationError, ConfigError

IPC_SUFFIXES = (".arrow", ".feather")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = IPC_SUFFIXES + PARQUET_SUFFIXES
_FORMATS = {"arrow": ".arrow", "feather": ".feather", "parquet": ".parquet"}


def resolve(source, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for ``source``.

    Raises:
        CalibrationError: a URI that ``pyarrow.fs`` cannot open.
    """
    if filesystem is not None:
        return filesystem, os.fspath(source)
    text = os.fspath(source)
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(text)
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise CalibrationError(f"{text}: cannot open this URI through pyarrow.fs: {exc}") from exc


def _child(source, name: str) -> str:
    """``source``/``name`` for messages and return values, keeping a URI's ``?query`` last."""
    base, sep, query = os.fspath(source).partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


# ----------------------------------------------------------------------------- reading


class Shard:
    """One file of calibration data: where it lives and how to name it in messages."""

    def __init__(self, fs: pafs.FileSystem, path: str, name: str):
        self.fs, self.path, self.name = fs, path, name
        self.is_parquet = path.endswith(PARQUET_SUFFIXES)

    def _open(self):
        # a local IPC file is memory-mapped so record batches point into the page cache
        if isinstance(self.fs, pafs.LocalFileSystem) and not self.is_parquet:
            return pa.memory_map(self.path)
        return self.fs.open_input_file(self.path)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The file's record batches, as stored (unchecked).

        Raises:
            CalibrationError: the file is truncated, corrupt or unreadable (names it).
        """
        try:
            src = self._open()
            if self.is_parquet:
                yield from pq.ParquetFile(src).iter_batches()
                return
            try:
                reader = ipc.open_file(src)
            except pa.ArrowInvalid:             # not the file format: try the stream format
                src.seek(0)
                yield from ipc.open_stream(src)
                return
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        except (pa.ArrowException, OSError) as exc:
            raise CalibrationError(f"{self.name}: cannot read this Arrow/Parquet file "
                                   f"(truncated or corrupt?): {exc}") from exc

    def count_rows(self) -> int:
        """Rows in the file, from its metadata.

        Raises:
            CalibrationError: the metadata cannot be read.
        """
        try:
            if self.is_parquet:
                return pq.ParquetFile(self._open()).metadata.num_rows
            return ipc.open_file(self._open()).count_rows()
        except (pa.ArrowException, OSError) as exc:
            raise CalibrationError(f"{self.name}: cannot read this file's metadata: {exc}") from exc


def list_shards(source, filesystem: pafs.FileSystem | None) -> list[Shard]:
    """The shards of a file, folder or URI, in name order (the data itself is not opened).

    Args:
        source: one shard file, or a folder of them; a local path or a ``scheme://`` URI.
        filesystem: a ``pyarrow.fs.FileSystem``; then ``source`` is a path inside it.

    Returns:
        One ``Shard`` per file, named in messages like ``source``.

    Raises:
        CalibrationError: the path does not exist, is a file of another type, or is a folder
            holding no shards.
    """
    fs, path = resolve(source, filesystem)
    name = os.fspath(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise CalibrationError(f"{name}: calibration data not found (no such file or folder)")
    if info.type == pafs.FileType.File:
        if not path.endswith(SUFFIXES):
            raise CalibrationError(f"{name}: unsupported file type; expected one of {SUFFIXES}")
        return [Shard(fs, path, name)]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    files = sorted((f for f in found if f.type == pafs.FileType.File
                    and not f.base_name.startswith((".", "_")) and f.base_name.endswith(SUFFIXES)),
                   key=lambda f: f.base_name)
    if not files:
        raise CalibrationError(f"{name}: folder holds no {'/'.join(SUFFIXES)} shards")
    return [Shard(fs, f.path, _child(name, f.base_name)) for f in files]


# ----------------------------------------------------------------------------- writing


def _c_order(value, dtype=None) -> np.ndarray:
    """``value`` as a numpy array with canonical C-order strides, copied only when needed.

    ``np.ascontiguousarray`` is not enough: numpy calls an array contiguous whatever the stride
    of a size-1 axis (``x[:, None][idx]`` keeps a 4-byte stride there), and pyarrow derives the
    tensor's permutation from the strides, so such an array would be stored as shape [8, 1, 8]
    with permutation [1, 0, 2] rather than as [1, 8, 8].
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    dtype = array.dtype if dtype is None else np.dtype(dtype)
    canonical = np.empty(array.shape, dtype)
    if array.dtype == dtype and array.strides == canonical.strides:
        return array
    np.copyto(canonical, array, casting="unsafe")
    return canonical


def _to_table(inputs, targets) -> pa.Table:
    x = _c_order(inputs, np.float32)
    if x.ndim < 2 or 0 in x.shape:
        raise CalibrationError(f"inputs must be [N, *shape] with N >= 1 and no empty axis; "
                               f"got shape {list(x.shape)}")
    columns = {"input": pa.FixedShapeTensorArray.from_numpy_ndarray(x)}
    if targets is not None:
        y = _c_order(targets)
        if y.shape[:1] != x.shape[:1]:
            raise CalibrationError(f"targets have {y.shape[:1]} rows but inputs have {x.shape[0]}")
        if y.ndim == 1 and not np.issubdtype(y.dtype, np.integer):
            raise CalibrationError(f"1-D targets must be integer class ids; got dtype {y.dtype}")
        columns["target"] = (pa.array(y.astype(np.int64)) if y.ndim == 1
                             else pa.FixedShapeTensorArray.from_numpy_ndarray(y))
    return pa.table(columns)


def _write_atomic(fs: pafs.FileSystem, path: str, table: pa.Table, fmt: str) -> None:
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"   # hidden: readers skip it
    try:
        with fs.open_output_stream(tmp) as out:
            if fmt == "parquet":
                pq.write_table(table, out)
            else:
                with ipc.new_file(out, table.schema) as writer:
                    writer.write_table(table)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except (OSError, pa.ArrowException):
            pass
        raise


def write_calibration(dest, inputs, targets=None, *, rows_per_shard: int | None = None,
                      fmt: str = "arrow", filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Write calibration tensors as Arrow IPC or Parquet shards, each file atomically.

    Args:
        dest: a folder (shards ``part-00000.arrow``, ...) or one ``.arrow``/``.feather``/``.parquet``
            file; a local path or a ``scheme://`` URI.
        inputs: torch tensor or numpy array ``[N, *shape]`` (any strides); stored as a float32
            ``fixed_shape_tensor`` of shape ``shape``, in C order, without a permutation.
        targets: optional ``[N]`` integer ids (stored int64) or a ``[N, *tshape]`` tensor.
        rows_per_shard: rows per file; None writes one file.
        fmt: ``"arrow"`` (IPC file format), ``"feather"`` or ``"parquet"``; ignored when ``dest``
            names a file (its suffix decides).
        filesystem: a ``pyarrow.fs.FileSystem``; then ``dest`` is a path inside it.

    Returns:
        The written files, spelled like ``dest`` (paths or URIs), in shard order.

    Raises:
        ConfigError: unknown ``fmt``, ``rows_per_shard < 1``, or a single-file ``dest`` that would
            need several shards.
        CalibrationError: empty or mis-shaped inputs/targets.
    """
    if fmt not in _FORMATS:
        raise ConfigError(f"fmt must be one of {sorted(_FORMATS)}; got {fmt!r}")
    if rows_per_shard is not None and rows_per_shard < 1:
        raise ConfigError(f"rows_per_shard must be >= 1; got {rows_per_shard}")
    table = _to_table(inputs, targets)
    per = rows_per_shard or table.num_rows
    n_shards = math.ceil(table.num_rows / per)
    fs, path = resolve(dest, filesystem)
    if path.endswith(SUFFIXES):
        if n_shards > 1:
            raise ConfigError(f"{dest}: names one file but {table.num_rows} rows at "
                              f"rows_per_shard={per} need {n_shards}; give a folder instead")
        fs.create_dir(path.rpartition("/")[0] or "/", recursive=True)
        _write_atomic(fs, path, table, "parquet" if path.endswith(PARQUET_SUFFIXES) else "arrow")
        return [os.fspath(dest)]
    fs.create_dir(path, recursive=True)
    written = []
    for i in range(n_shards):
        name = f"part-{i:05d}{_FORMATS[fmt]}"
        _write_atomic(fs, f"{path.rstrip('/')}/{name}", table.slice(i * per, per), fmt)
        written.append(_child(dest, name))
    return written
