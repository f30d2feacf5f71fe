"""Calibration data held in Apache Arrow: the column contract, an eager reader, lazy batches.

Owns the column side of SPEC.md section 2: column ``input`` is the canonical
``arrow.fixed_shape_tensor`` (a plain fixed-size list plus a per-row ``shape`` is also accepted),
optional column ``target`` is an integer or a tensor. Local Arrow IPC files are memory-mapped and
batches are ``torch.from_numpy`` views of the mapped bytes; a copy happens only when a batch
straddles two record batches, when the values are not float32, or for Parquet (which decodes).
Listing, opening and writing the shard files is ``quantizer.shards`` (``write_calibration`` is
re-exported here). Non-finite values are the consumer's business (int8 checks).
Must not import ray, click, jobs or torch.ao.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from quantizer.errors import CalibrationError, ConfigError
from quantizer.shards import Shard, list_shards, write_calibration

__all__ = ["CalibrationData", "read_calibration", "read_table", "write_calibration"]

_SHAPE_HINT = "add `calibration: {shape: [...]}` (the per-row shape) to this model in the zoo"


def _unpermuted(typ: pa.FixedShapeTensorType, name: str, column: str) -> pa.FixedShapeTensorType:
    """The type to read a tensor column as: its logical shape, no permutation.

    A permutation that moves only size-1 axes leaves every row's values in C order of the
    logical shape (earlier writers stored ``x[:, None]`` that way), so the storage is re-labelled
    as is. Any other permutation would need a transposing copy of each batch: refused.
    """
    perm = list(typ.permutation or range(len(typ.shape)))
    if perm == sorted(perm):
        return typ
    logical = [0] * len(perm)
    for physical_axis, logical_axis in enumerate(perm):
        logical[logical_axis] = typ.shape[physical_axis]
    moved = [axis for axis, size in zip(perm, typ.shape) if size != 1]
    if moved != sorted(moved):
        raise CalibrationError(
            f"{name}: column {column!r} stores tensors of shape {logical} with dimension "
            f"permutation {perm} (not row-major); rewrite it in C order, e.g. with "
            f"quantizer.write_calibration")
    return pa.fixed_shape_tensor(typ.value_type, logical)


def _input_type(typ: pa.DataType, shape, name: str) -> pa.FixedShapeTensorType:
    if isinstance(typ, pa.FixedShapeTensorType):
        typ = _unpermuted(typ, name, "input")
        if shape is not None and tuple(shape) != tuple(typ.shape):
            raise CalibrationError(f"{name}: column 'input' holds tensors of shape "
                                   f"{list(typ.shape)} but calibration shape {list(shape)} was given")
    elif pa.types.is_fixed_size_list(typ):
        if shape is None:
            raise CalibrationError(f"{name}: column 'input' is a plain {typ}; {_SHAPE_HINT}")
        if math.prod(shape) != typ.list_size:
            raise CalibrationError(f"{name}: column 'input' has {typ.list_size} values per row "
                                   f"but calibration shape {list(shape)} holds {math.prod(shape)}")
        typ = pa.fixed_shape_tensor(typ.value_type, list(shape))
    else:
        raise CalibrationError(f"{name}: column 'input' has type {typ}; expected "
                               f"arrow.fixed_shape_tensor or a fixed-size list with {_SHAPE_HINT}")
    if not pa.types.is_floating(typ.value_type):
        raise CalibrationError(f"{name}: column 'input' holds {typ.value_type} values; "
                               f"expected float32")
    return typ


def _read_types(schema: pa.Schema, shape, name: str) -> dict[str, pa.DataType]:
    """Check the ``input`` and ``target`` columns; return the type to read each as."""
    if "input" not in schema.names:
        raise CalibrationError(f"{name}: no column 'input' (found columns: {schema.names})")
    types = {"input": _input_type(schema.field("input").type, shape, name)}
    if "target" in schema.names:
        ttype = schema.field("target").type
        if isinstance(ttype, pa.FixedShapeTensorType):
            ttype = _unpermuted(ttype, name, "target")
        elif not pa.types.is_integer(ttype):
            raise CalibrationError(f"{name}: column 'target' has type {ttype}; expected an "
                                   f"integer class id or an arrow.fixed_shape_tensor")
        types["target"] = ttype
    return types


def _relabel(col, typ: pa.ExtensionType):
    """``col``'s storage under extension type ``typ``, zero-copy (chunk by chunk if chunked)."""
    def one(array):
        return pa.ExtensionArray.from_storage(
            typ, array.storage if isinstance(array, pa.ExtensionArray) else array)
    if isinstance(col, pa.ChunkedArray):
        return pa.chunked_array([one(c) for c in col.chunks], typ)
    return one(col)


def _normalize(batch, shape: Sequence[int] | None, name: str):
    """Check a RecordBatch/Table and return only its ``input`` (+ ``target``) columns, tensors
    as unpermuted fixed_shape_tensor (a plain fixed-size list is re-wrapped, zero-copy)."""
    types = _read_types(batch.schema, shape, name)
    batch = batch.select(list(types))
    for i, (column, typ) in enumerate(types.items()):
        if batch.column(column).null_count:
            raise CalibrationError(f"{name}: column {column!r} has "
                                   f"{batch.column(column).null_count} null row(s)")
        if batch.schema.field(column).type != typ:
            batch = batch.set_column(i, pa.field(column, typ), _relabel(batch.column(column), typ))
    return batch


def _stream(shards: list[Shard], shape) -> Iterator[pa.RecordBatch]:
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
        A table with ``input`` as an unpermuted ``arrow.fixed_shape_tensor`` and ``target`` if
        the data has one.

    Raises:
        CalibrationError: missing path, no rows, unreadable file or a bad schema (names the file,
            the column and what was found).
        ConfigError: ``max_rows`` is not a positive integer.
    """
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ConfigError(f"max_rows must be an integer >= 1 or None; got {max_rows!r}")
    batches = list(CalibrationData._window(_stream(list_shards(source, filesystem), shape),
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
    shards = list_shards(source, filesystem)
    return CalibrationData(lambda: _stream(shards, shape),
                           lambda: sum(s.count_rows() for s in shards),
                           source=os.fspath(source), batch_size=batch_size)
