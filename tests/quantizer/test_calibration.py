"""Calibration data in Arrow: writer/reader round trips, schema errors, zero-copy and laziness."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import torch

from quantizer.calibration import CalibrationData, read_calibration, read_table, write_calibration
from quantizer.errors import CalibrationError, ConfigError


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 3, 4, 4)).astype(np.float32)
    y = rng.integers(0, 10, size=23)
    return x, y


def _collect(calibration):
    batches = list(calibration)
    xs = torch.cat([b[0] for b in batches])
    ys = None if batches[0][1] is None else torch.cat([b[1] for b in batches])
    return batches, xs, ys


def _write_ipc(path, table):
    with ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return str(path)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_sharded_round_trip_is_exact_in_order(tmp_path, data, fmt):
    x, y = data
    paths = write_calibration(tmp_path / "calib", x, y, rows_per_shard=5, fmt=fmt)
    assert [os.path.basename(p) for p in paths] == [f"part-0000{i}.{fmt}" for i in range(5)]
    assert sorted(os.listdir(tmp_path / "calib")) == [os.path.basename(p) for p in paths]  # no temp files
    calibration = read_calibration(tmp_path / "calib", batch_size=4)
    batches, xs, ys = _collect(calibration)
    assert [len(b[0]) for b in batches] == [4, 4, 4, 4, 4, 3]
    assert all(b[0].dtype == torch.float32 and b[1].dtype == torch.int64 for b in batches)
    assert torch.equal(xs, torch.from_numpy(x)) and torch.equal(ys, torch.from_numpy(y))
    assert calibration.num_rows == 23 and calibration.shape == (3, 4, 4)
    table = read_table(tmp_path / "calib")
    assert table.num_rows == 23 and isinstance(table.schema.field("input").type, pa.FixedShapeTensorType)


@pytest.mark.parametrize("name", ["one.arrow", "one.feather", "one.parquet"])
def test_single_file_dest_and_file_uri(tmp_path, data, name):
    x, _ = data
    uri = (tmp_path / name).as_uri()
    assert write_calibration(uri, torch.from_numpy(x)) == [uri]
    assert os.listdir(tmp_path) == [name]
    batches, xs, ys = _collect(read_calibration(uri, batch_size=10))
    assert [len(b[0]) for b in batches] == [10, 10, 3] and ys is None
    assert all(b[1] is None for b in batches)
    assert torch.equal(xs, torch.from_numpy(x))
    assert read_table(uri, max_rows=7).num_rows == 7


def test_folder_uri_and_filesystem_argument(tmp_path, data):
    x, y = data
    uris = write_calibration((tmp_path / "c").as_uri(), x, y, rows_per_shard=10, fmt="parquet")
    assert uris == [f"{(tmp_path / 'c').as_uri()}/part-0000{i}.parquet" for i in range(3)]
    # a SubTreeFileSystem is not local: this takes the open_input_file (non-mmap) path
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    write_calibration("d", x, y, rows_per_shard=8, filesystem=sub)
    _, xs, ys = _collect(read_calibration("d", batch_size=6, filesystem=sub))
    assert torch.equal(xs, torch.from_numpy(x)) and torch.equal(ys, torch.from_numpy(y))


def test_single_file_dest_refuses_several_shards(tmp_path, data):
    with pytest.raises(ConfigError, match="need 3"):
        write_calibration(tmp_path / "one.arrow", data[0], rows_per_shard=10)
    assert not (tmp_path / "one.arrow").exists()


def test_tensor_targets_and_hidden_files_ignored(tmp_path, data):
    x, _ = data
    t = np.arange(46, dtype=np.float32).reshape(23, 2)
    write_calibration(tmp_path / "c", x, torch.from_numpy(t), rows_per_shard=12)
    (tmp_path / "c" / ".part-00009.arrow.tmp-dead").write_bytes(b"half a file")
    (tmp_path / "c" / "_SUCCESS").write_bytes(b"")
    batches, _, ys = _collect(read_calibration(tmp_path / "c", batch_size=8))
    assert batches[0][1].shape == (8, 2) and torch.equal(ys, torch.from_numpy(t))


def test_fixed_size_list_needs_and_uses_shape(tmp_path, data):
    x, y = data
    flat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 48)
    pq.write_table(pa.table({"input": flat, "target": pa.array(y, pa.int32())}), tmp_path / "f.parquet")
    with pytest.raises(CalibrationError, match=r"f\.parquet.*'input'.*calibration: \{shape"):
        list(read_calibration(tmp_path / "f.parquet"))
    _, xs, ys = _collect(read_calibration(tmp_path / "f.parquet", shape=[3, 4, 4], batch_size=5))
    assert torch.equal(xs, torch.from_numpy(x)) and ys.dtype == torch.int64
    assert torch.equal(ys, torch.from_numpy(y))
    table = read_table(tmp_path / "f.parquet", shape=(3, 16))
    assert table.schema.field("input").type.shape == [3, 16]


def test_float64_tensors_become_float32(tmp_path):
    x = np.linspace(-1, 1, 5 * 6).reshape(5, 6)
    _write_ipc(tmp_path / "f64.arrow", pa.table({"input": pa.FixedShapeTensorArray.from_numpy_ndarray(x)}))
    _, xs, _ = _collect(read_calibration(tmp_path / "f64.arrow", batch_size=2))
    assert xs.dtype == torch.float32 and torch.equal(xs, torch.from_numpy(x).float())


def test_take_and_skip_windows(tmp_path, data):
    x, y = data
    calibration = read_calibration(write_calibration(tmp_path / "c", x, y, rows_per_shard=7)[0]
                                   .rsplit("/", 1)[0], batch_size=4)
    head, rest = calibration.take(10), calibration.skip(10)
    assert head.num_rows == 10 and rest.num_rows == 13 and rest.take(5).num_rows == 5
    assert torch.equal(_collect(head)[2], torch.from_numpy(y[:10]))
    assert torch.equal(_collect(rest.take(5))[1], torch.from_numpy(x[10:15]))
    assert torch.equal(_collect(rest.skip(2).take(100))[2], torch.from_numpy(y[12:]))
    assert list(calibration.skip(100)) == [] and calibration.take(0).num_rows == 0
    with pytest.raises(ConfigError):
        calibration.take(-1)


def test_size_one_axis_with_odd_strides_is_written_unpermuted(tmp_path):
    from sklearn.datasets import load_digits
    x = (load_digits().images / 16).astype(np.float32)[:, None][np.arange(5)]
    assert x.flags.c_contiguous and x.strides == (256, 4, 32, 4)   # the trap: "contiguous" yet odd
    for source in (x, torch.from_numpy(x)):
        path = write_calibration(tmp_path / "digits.arrow", source)[0]
        stored = ipc.open_file(path).schema.field("input").type
        assert stored.shape == [1, 8, 8] and stored.permutation in (None, [0, 1, 2])
        calibration = read_calibration(path, batch_size=5)
        assert calibration.shape == (1, 8, 8)
        assert read_table(path, shape=[1, 8, 8]).schema.field("input").type.shape == [1, 8, 8]
        assert torch.equal(next(iter(calibration))[0], torch.from_numpy(x))


def test_reader_relabels_a_permutation_of_size_one_axes_zero_copy(tmp_path):
    x = np.arange(5 * 64, dtype=np.float32).reshape(5, 8, 8)[:, None][np.arange(5)]
    stored = pa.FixedShapeTensorArray.from_numpy_ndarray(x)       # what the old writer stored
    assert stored.type.shape == [8, 1, 8] and stored.type.permutation == [1, 0, 2]
    path = _write_ipc(tmp_path / "old.arrow", pa.table({"input": stored, "target": stored}))
    table = read_table(path)
    for column in ("input", "target"):
        typ = table.schema.field(column).type
        assert typ.shape == [1, 8, 8] and typ.permutation is None
    calibration = read_calibration(path, batch_size=2)
    assert calibration.shape == (1, 8, 8)
    _, xs, ys = _collect(calibration)
    assert torch.equal(xs, torch.from_numpy(x)) and torch.equal(ys, torch.from_numpy(x))
    batches = [b for b, _ in read_calibration(path, batch_size=2)]
    assert [b.data_ptr() - batches[0].data_ptr() for b in batches] == [0, 2 * 256, 4 * 256]


def test_writer_refuses_bad_inputs(tmp_path):
    with pytest.raises(CalibrationError, match="N >= 1"):
        write_calibration(tmp_path / "a", np.zeros((0, 4), np.float32))
    with pytest.raises(CalibrationError, match="rows"):
        write_calibration(tmp_path / "a", np.zeros((4, 4), np.float32), np.arange(3))
    with pytest.raises(CalibrationError, match="integer"):
        write_calibration(tmp_path / "a", np.zeros((4, 4), np.float32), np.zeros(4))
    with pytest.raises(ConfigError, match="fmt"):
        write_calibration(tmp_path / "a", np.zeros((4, 4), np.float32), fmt="csv")


# ----------------------------------------------------------------------------- schema errors


def _tensor(n, shape=(2, 3), dtype=np.float32):
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ones((n, *shape), dtype))


def _transposed():
    """Rows stored column-major: pyarrow records shape [2, 3] with permutation [1, 0]."""
    x = np.arange(24, dtype=np.float32).reshape(4, 2, 3).transpose(0, 2, 1)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(x)


SCHEMA_CASES = {
    "no_input": (pa.table({"pixels": _tensor(4)}), None, r"no column 'input'.*pixels"),
    "var_list": (pa.table({"input": pa.array([[1.0, 2.0]] * 4)}), None, r"column 'input' has type list"),
    "int_values": (pa.table({"input": _tensor(4, dtype=np.int32)}), None, r"column 'input' holds int32"),
    "float_target": (pa.table({"input": _tensor(4), "target": pa.array([0.5] * 4)}), None,
                     r"column 'target' has type double"),
    "bad_product": (pa.table({"input": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(24, np.float32)), 6)}),
                    [2, 2], r"column 'input' has 6 values per row.*\[2, 2\] holds 4"),
    "shape_conflict": (pa.table({"input": _tensor(4)}), [3, 2], r"column 'input' holds tensors of shape \[2, 3\]"),
    "empty": (pa.table({"input": _tensor(2).slice(0, 0)}), None, r"no rows"),
    "permuted": (pa.table({"input": _transposed()}), None,
                 r"column 'input' stores tensors of shape \[3, 2\] with dimension permutation \[1, 0\]"),
    "permuted_target": (pa.table({"input": _tensor(4), "target": _transposed()}), None,
                        r"column 'target' stores tensors of shape \[3, 2\].*permutation \[1, 0\]"),
    "null_rows": (pa.table({"input": pa.ExtensionArray.from_storage(
        pa.fixed_shape_tensor(pa.float32(), [2]), pa.array([[1.0, 2.0], None], pa.list_(pa.float32(), 2)))}),
        None, r"column 'input' has 1 null"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_schema_errors_name_file_and_column(tmp_path, case):
    table, shape, pattern = SCHEMA_CASES[case]
    path = _write_ipc(tmp_path / f"{case}.arrow", table)
    for read in (lambda: list(read_calibration(path, shape=shape)),
                 lambda: read_table(tmp_path, shape=shape)):
        with pytest.raises(CalibrationError, match=pattern) as info:
            read()
        assert f"{case}.arrow" in str(info.value) or case == "empty"   # empty names the folder


def test_missing_path_and_empty_folder_and_mixed_shards(tmp_path, data):
    with pytest.raises(CalibrationError, match=r"nowhere.*not found"):
        read_calibration(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match=r"empty: folder holds no"):
        read_table(tmp_path / "empty")
    write_calibration(tmp_path / "mix" / "part-00000.arrow", data[0])
    write_calibration(tmp_path / "mix" / "part-00001.arrow", np.zeros((3, 5), np.float32))
    with pytest.raises(CalibrationError, match=r"part-00001\.arrow: columns"):
        list(read_calibration(tmp_path / "mix", batch_size=64))


def test_from_table_rejects_bad_schema_and_batch_size():
    with pytest.raises(CalibrationError, match=r"<table>: no column 'input'"):
        CalibrationData.from_table(pa.table({"x": [1]}))
    with pytest.raises(ConfigError, match="batch_size"):
        CalibrationData.from_table(pa.table({"input": _tensor(2)}), batch_size=0)


# ----------------------------------------------------------------------------- zero copy, laziness


def _mapped_ranges(path):
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def test_batches_are_views_of_the_memory_mapped_file(tmp_path):
    rows, shape, batch_size = 256, (3, 16, 16), 32
    x = np.random.default_rng(1).standard_normal((rows, *shape)).astype(np.float32)
    path = write_calibration(tmp_path / "big.arrow", x)[0]
    before = pa.total_allocated_bytes()
    batches = [b for b, _ in read_calibration(path, batch_size=batch_size)]   # hold them all
    grown = pa.total_allocated_bytes() - before
    assert grown < x.nbytes / 100, f"Arrow allocated {grown} bytes for {x.nbytes} of data"
    row_bytes = int(np.prod(shape)) * 4
    steps = {b2.data_ptr() - b1.data_ptr() for b1, b2 in zip(batches, batches[1:])}
    assert steps == {batch_size * row_bytes}        # consecutive slices of one buffer
    if os.path.exists("/proc/self/maps"):
        ranges = _mapped_ranges(os.path.realpath(path))
        assert ranges, "the file is not memory-mapped"
        assert all(any(lo <= b.data_ptr() and b.data_ptr() + b.nbytes <= hi for lo, hi in ranges)
                   for b in batches)
    assert torch.equal(torch.cat(batches), torch.from_numpy(x))


def test_from_table_batches_share_the_arrow_buffer():
    x = np.arange(40 * 6, dtype=np.float32).reshape(40, 2, 3)
    table = pa.table({"input": pa.FixedShapeTensorArray.from_numpy_ndarray(x)})
    address = table.column("input").chunk(0).storage.values.buffers()[1].address
    batches = [b for b, _ in CalibrationData.from_table(table, batch_size=16)]
    assert [b.data_ptr() - address for b in batches] == [0, 16 * 24, 32 * 24]
    assert torch.equal(torch.cat(batches), torch.from_numpy(x))


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_consumer_stopping_early_opens_only_the_first_shards(tmp_path, fmt):
    x = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    paths = write_calibration(tmp_path / "c", x, np.arange(40), rows_per_shard=4, fmt=fmt)
    for p in paths[2:]:                 # every shard after the second is garbage
        with open(p, "wb") as f:
            f.write(os.urandom(512))
    calibration = read_calibration(tmp_path / "c", batch_size=4)
    first_two = list(itertools.islice(calibration, 2))
    assert torch.equal(torch.cat([b for b, _ in first_two]), torch.from_numpy(x[:8]))
    assert torch.equal(_collect(calibration.take(8))[1], torch.from_numpy(x[:8]))
    with pytest.raises(CalibrationError, match=rf"part-00002\.{fmt}: cannot read"):
        list(calibration)
