"""Calibration data held in Apache Arrow: a shard writer, an eager reader, a lazy batch iterator.

Owns the on-disk contract of SPEC.md section 2: column ``input`` is the canonical
``arrow.fixed_shape_tensor`` (a plain fixed-size list plus a per-row ``shape`` is also accepted),
optional column ``target`` is an integer or a tensor. Local Arrow IPC files are memory-mapped and
batches are ``torch.from_numpy`` views of the mapped bytes; a copy happens only when a batch
straddles two record batches, when the values are not float32, or for Parquet (which decodes).
Files and folders are reached through ``pyarrow.fs`` (plain paths are local, ``scheme://`` URIs
go through ``FileSystem.from_uri``). Non-finite values are the consumer's business (int8 checks).
Must not import ray, click, jobs or torch.ao.
"""

from __future__ import annotations

import math
import os
import uuid
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch

from quantizer.errors import CalibrationError, ConfigError

IPC_SUFFIXES = (".arrow", ".feather")
PARQUET_SUFFIXES = (".parquet",)
_SUFFIXES = IPC_SUFFIXES + PARQUET_SUFFIXES
_FORMATS = {"arrow": ".arrow", "feather": ".feather", "parquet": ".parquet"}
_SHAPE_HINT = "add `calibration: {shape: [...]}` (the per-row shape) to this model in the zoo"


def _resolve(source, filesystem) -> tuple[pafs.FileSystem, str]:
    if filesystem is not None:
        return filesystem, os.fspath(source)
    text = os.fspath(source)
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(text)
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise CalibrationError(f"{text}: cannot open this URI through pyarrow.fs: {exc}") from exc


def _child(source: str, name: str) -> str:
    """``source``/``name`` for messages and return values, keeping a URI's ``?query`` last."""
    base, sep, query = os.fspath(source).partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


# ----------------------------------------------------------------------------- writing


def _as_numpy(value, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value))


def _to_table(inputs, targets) -> pa.Table:
    x = _as_numpy(inputs, "inputs").astype(np.float32, copy=False)
    if x.ndim < 2 or x.shape[0] == 0:
        raise CalibrationError(f"inputs must be [N, *shape] with N >= 1; got shape {list(x.shape)}")
    columns = {"input": pa.FixedShapeTensorArray.from_numpy_ndarray(x)}
    if targets is not None:
        y = _as_numpy(targets, "targets")
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
        inputs: torch tensor or numpy array ``[N, *shape]``; stored as float32 fixed_shape_tensor.
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
    fs, path = _resolve(dest, filesystem)
    if path.endswith(_SUFFIXES):
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


# ----------------------------------------------------------------------------- reading


class _Shard:
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
        try:
            if self.is_parquet:
                return pq.ParquetFile(self._open()).metadata.num_rows
            return ipc.open_file(self._open()).count_rows()
        except (pa.ArrowException, OSError) as exc:
            raise CalibrationError(f"{self.name}: cannot read this file's metadata: {exc}") from exc


def _list_shards(source, filesystem) -> list[_Shard]:
    fs, path = _resolve(source, filesystem)
    name = os.fspath(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise CalibrationError(f"{name}: calibration data not found (no such file or folder)")
    if info.type == pafs.FileType.File:
        if not path.endswith(_SUFFIXES):
            raise CalibrationError(f"{name}: unsupported file type; expected one of {_SUFFIXES}")
        return [_Shard(fs, path, name)]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    files = sorted((f for f in found if f.type == pafs.FileType.File
                    and not f.base_name.startswith((".", "_")) and f.base_name.endswith(_SUFFIXES)),
                   key=lambda f: f.base_name)
    if not files:
        raise CalibrationError(f"{name}: folder holds no {'/'.join(_SUFFIXES)} shards")
    return [_Shard(fs, f.path, _child(name, f.base_name)) for f in files]


def _input_value_type(schema: pa.Schema, shape, name: str) -> pa.DataType:
    """Check the ``input`` and ``target`` columns; return the input's value type."""
    if "input" not in schema.names:
        raise CalibrationError(f"{name}: no column 'input' (found columns: {schema.names})")
    typ = schema.field("input").type
    if isinstance(typ, pa.FixedShapeTensorType):
        if shape is not None and tuple(shape) != tuple(typ.shape):
            raise CalibrationError(f"{name}: column 'input' holds tensors of shape "
                                   f"{list(typ.shape)} but calibration shape {list(shape)} was given")
    elif pa.types.is_fixed_size_list(typ):
        if shape is None:
            raise CalibrationError(f"{name}: column 'input' is a plain {typ}; {_SHAPE_HINT}")
        if math.prod(shape) != typ.list_size:
            raise CalibrationError(f"{name}: column 'input' has {typ.list_size} values per row "
                                   f"but calibration shape {list(shape)} holds {math.prod(shape)}")
    else:
        raise CalibrationError(f"{name}: column 'input' has type {typ}; expected "
                               f"arrow.fixed_shape_tensor or a fixed-size list with {_SHAPE_HINT}")
    if not pa.types.is_floating(typ.value_type):
        raise CalibrationError(f"{name}: column 'input' holds {typ.value_type} values; "
                               f"expected float32")
    ttype = schema.field("target").type if "target" in schema.names else None
    if ttype is not None and not (pa.types.is_integer(ttype)
                                  or isinstance(ttype, pa.FixedShapeTensorType)):
        raise CalibrationError(f"{name}: column 'target' has type {ttype}; expected an integer "
                               f"class id or an arrow.fixed_shape_tensor")
    return typ.value_type


def _normalize(batch, shape: Sequence[int] | None, name: str):
    """Check a RecordBatch/Table and return only its ``input`` (+ ``target``) columns, ``input``
    as fixed_shape_tensor (a plain fixed-size list is re-wrapped, zero-copy)."""
    value_type = _input_value_type(batch.schema, shape, name)
    batch = batch.select([c for c in ("input", "target") if c in batch.schema.names])
    for column in batch.column_names:
        if batch.column(column).null_count:
            raise CalibrationError(f"{name}: column {column!r} has "
                                   f"{batch.column(column).null_count} null row(s)")
    col = batch.column("input")
    if isinstance(col.type, pa.FixedShapeTensorType):
        return batch
    tensor_type = pa.fixed_shape_tensor(value_type, list(shape))
    if isinstance(col, pa.ChunkedArray):
        new = pa.chunked_array([pa.ExtensionArray.from_storage(tensor_type, c) for c in col.chunks],
                               tensor_type)
    else:
        new = pa.ExtensionArray.from_storage(tensor_type, col)
    return batch.set_column(0, pa.field("input", tensor_type), new)


def _stream(shards: list[_Shard], shape) -> Iterator[pa.RecordBatch]:
    """Normalized record batches of every shard in order; one shard opened at a time."""
    expected = None
    for shard in shards:
        for batch in shard.batches():
            batch = _normalize(batch, shape, shard.name)
            if expected is None:
                expected = batch.schema
            elif not batch.schema.equals(expected):
                raise CalibrationError(f"{shard.name}: columns {batch.schema} do not match the "
                                       f"first shard's {expected}")
            yield batch


def read_table(source, *, shape: Sequence[int] | None = None,
               filesystem: pafs.FileSystem | None = None, max_rows: int | None = None) -> pa.Table:
    """Read calibration data eagerly into one Arrow table (memory-mapped, not copied, for local IPC).

    Args:
        source: an ``.arrow``/``.feather``/``.parquet`` file, a folder of such shards (read in name
            order; hidden and ``_``-prefixed files ignored), or a ``scheme://`` URI of either.
        shape: per-row shape for a plain fixed-size-list ``input`` column.
        filesystem: a ``pyarrow.fs.FileSystem``; then ``source`` is a path inside it.
        max_rows: stop after this many rows (later shards are not opened).

    Returns:
        A table with ``input`` as ``arrow.fixed_shape_tensor`` and ``target`` if the data has one.

    Raises:
        CalibrationError: missing path, no rows, unreadable file or a bad schema (names the file,
            the column and what was found).
    """
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ConfigError(f"max_rows must be an integer >= 1 or None; got {max_rows!r}")
    batches = list(CalibrationData._window(_stream(_list_shards(source, filesystem), shape),
                                           0, max_rows, os.fspath(source)))
    return pa.Table.from_batches(batches)


def _column_numpy(col) -> np.ndarray:
    if isinstance(col.type, pa.FixedShapeTensorType):
        return col.to_numpy_ndarray()
    return col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    # one piece: a read-only view of Arrow memory, never written to; several: one concatenated copy
    array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(array)


class CalibrationData:
    """An iterable of ``(inputs, targets)`` torch batches over Arrow calibration data.

    ``inputs`` is float32 ``[B, *shape]``; ``targets`` is int64 ``[B]`` (or the target tensor
    ``[B, *tshape]``), or None when there is no ``target`` column; the last batch may be smaller.
    Re-iterable: each ``iter()`` streams the shards again, one at a time, so a consumer that stops
    early reads only what it used. Row windows: ``take(n)`` keeps the first n rows and ``skip(n)``
    drops them, so ``data.take(80)`` calibrates and ``data.skip(80).take(64)`` holds rows out for
    fidelity. Batches are read-only views of Arrow memory where possible: do not write to them.
    """

    def __init__(self, open_batches: Callable[[], Iterator[pa.RecordBatch]],
                 count_rows: Callable[[], int], *, source: str, batch_size: int = 8,
                 offset: int = 0, limit: int | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        self._open, self._count = open_batches, count_rows
        self.source, self.batch_size = source, batch_size
        self._offset, self._limit = offset, limit

    @classmethod
    def from_table(cls, table: pa.Table, batch_size: int = 8, *, source: str = "<table>",
                   shape: Sequence[int] | None = None) -> CalibrationData:
        """Batches over an in-memory table (zero-copy views of its chunks).

        Raises:
            CalibrationError: bad schema or no rows.  ConfigError: ``batch_size < 1``.
        """
        table = _normalize(table, shape, source)
        if table.num_rows == 0:
            raise CalibrationError(f"{source}: calibration table has no rows")
        return cls(lambda: iter(table.to_batches()), lambda: table.num_rows, source=source,
                   batch_size=batch_size)

    def _replace(self, offset: int, limit: int | None) -> CalibrationData:
        return CalibrationData(self._open, self._count, source=self.source,
                               batch_size=self.batch_size, offset=offset, limit=limit)

    def take(self, n_rows: int) -> CalibrationData:
        """The first ``n_rows`` rows of this data (fewer if it has fewer)."""
        _check_rows(n_rows)
        return self._replace(self._offset, n_rows if self._limit is None else min(self._limit, n_rows))

    def skip(self, n_rows: int) -> CalibrationData:
        """This data without its first ``n_rows`` rows (skipped rows are sliced, not copied)."""
        _check_rows(n_rows)
        limit = None if self._limit is None else max(0, self._limit - n_rows)
        return self._replace(self._offset + n_rows, limit)

    @property
    def num_rows(self) -> int:
        """Rows in this window (reads file metadata, not the data)."""
        available = max(0, self._count() - self._offset)
        return available if self._limit is None else min(available, self._limit)

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-row input shape (opens the first shard only)."""
        try:
            first = next(iter(self._open()))
        except StopIteration:
            raise CalibrationError(f"{self.source}: calibration data has no rows") from None
        return tuple(first.schema.field("input").type.shape)

    @staticmethod
    def _window(batches: Iterator[pa.RecordBatch], offset: int, limit: int | None,
                source: str) -> Iterator[pa.RecordBatch]:
        if limit == 0:
            return
        seen = emitted = 0
        for batch in batches:
            start, seen = max(0, offset - seen), seen + batch.num_rows
            if start >= batch.num_rows:
                continue
            batch = batch.slice(start) if limit is None else batch.slice(start, limit - emitted)
            emitted += batch.num_rows
            yield batch
            if limit is not None and emitted >= limit:
                return                      # before the next shard is opened
        if seen == 0:
            raise CalibrationError(f"{source}: calibration data has no rows")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        pieces, filled = [], 0
        for batch in self._window(self._open(), self._offset, self._limit, self.source):
            start = 0
            while start < batch.num_rows:
                take = min(self.batch_size - filled, batch.num_rows - start)
                pieces.append(batch.slice(start, take))
                filled, start = filled + take, start + take
                if filled == self.batch_size:
                    yield self._collate(pieces)
                    pieces, filled = [], 0
        if pieces:
            yield self._collate(pieces)

    def _collate(self, pieces: list[pa.RecordBatch]):
        inputs = _to_tensor([_column_numpy(p.column("input")) for p in pieces])
        if inputs.dtype != torch.float32:
            inputs = inputs.float()
        if "target" not in pieces[0].schema.names:
            return inputs, None
        return inputs, _to_tensor([_column_numpy(p.column("target"))
                                   for p in pieces])

    def __repr__(self) -> str:
        window = f", offset={self._offset}" if self._offset else ""
        window += f", limit={self._limit}" if self._limit is not None else ""
        return f"CalibrationData({self.source!r}, batch_size={self.batch_size}{window})"


def _check_rows(n_rows) -> None:
    if not isinstance(n_rows, int) or n_rows < 0:
        raise ConfigError(f"row count must be an integer >= 0; got {n_rows!r}")


def read_calibration(source, *, batch_size: int = 8, shape: Sequence[int] | None = None,
                     filesystem: pafs.FileSystem | None = None) -> CalibrationData:
    """Lazy batches over a calibration file, folder of shards or URI (see ``read_table``).

    Only the listing happens here; shards are opened one at a time while iterating, so schema
    and read errors surface on iteration.

    Args:
        source: file, folder or ``scheme://`` URI of ``.arrow``/``.feather``/``.parquet`` data.
        batch_size: rows per batch (the last batch may be smaller).
        shape: per-row shape for a plain fixed-size-list ``input`` column.
        filesystem: a ``pyarrow.fs.FileSystem``; then ``source`` is a path inside it.

    Returns:
        A re-iterable ``CalibrationData``.

    Raises:
        CalibrationError: the path does not exist or holds no shards (at once); bad schema,
            no rows or an unreadable shard (while iterating).
        ConfigError: ``batch_size < 1``.
    """
    shards = _list_shards(source, filesystem)
    return CalibrationData(lambda: _stream(shards, shape),
                           lambda: sum(s.count_rows() for s in shards),
                           source=os.fspath(source), batch_size=batch_size)
