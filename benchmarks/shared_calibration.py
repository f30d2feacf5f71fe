"""Benchmark: a 200 MB calibration table put in Ray's object store once, read by 2 tasks, zero-copy.

Each task maps the shared table (``ray.get`` of an Arrow table is zero-copy from plasma), builds
torch batches from it with ``quantizer.CalibrationData.from_table`` and touches every value, then
reports how much its *private* memory (``Private_Clean + Private_Dirty`` of
``/proc/self/smaps_rollup``) grew. Shared plasma pages count as shared, so a zero-copy read keeps
the growth far below the table's size. Run it in a network namespace with only loopback:

    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/shared_calibration.py'

The last lines are ``name: value`` pairs; ``private_growth_ratio_taskN`` must be <= 0.10.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

TABLE_MB = 200
ROW_SHAPE = (3, 32, 32)          # 12 KiB of float32 per row
BATCH_SIZE = 64


def private_bytes() -> int:
    """Private (unshared) resident bytes of this process, from /proc/self/smaps_rollup."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def make_table(mb: int) -> pa.Table:
    rows = mb * 2**20 // (4 * int(np.prod(ROW_SHAPE)))
    x = np.random.default_rng(0).random((rows, *ROW_SHAPE), dtype=np.float32)
    return pa.table({"input": pa.FixedShapeTensorArray.from_numpy_ndarray(x),
                     "target": pa.array(np.arange(rows) % 10)})


@ray.remote(num_cpus=1)
def read_shared(table_ref_holder: list) -> dict:
    import torch

    import quantizer

    before = private_bytes()
    table = ray.get(table_ref_holder[0])     # nested ref: the task maps it itself
    total, rows = 0.0, 0
    for inputs, _ in quantizer.CalibrationData.from_table(table, BATCH_SIZE):
        total += float(torch.sum(inputs))    # touch every value
        rows += inputs.shape[0]
    after = private_bytes()
    # control: a private copy of the same values must show up as ~1.0 of the table
    copy = table.column("input").combine_chunks().to_numpy_ndarray().copy()
    copied = private_bytes() - after
    del copy
    return {"rows": rows, "growth": after - before, "table_bytes": table.nbytes, "sum": total,
            "copy_growth": copied}


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=600 * 2**20)
    try:
        table = make_table(TABLE_MB)
        ref = ray.put(table)
        del table
        ray.get([read_shared.remote([ref]) for _ in range(2)])      # warm workers and imports
        results = ray.get([read_shared.remote([ref]) for _ in range(2)])
    finally:
        ray.shutdown()
    size = results[0]["table_bytes"]
    assert results[0]["sum"] == results[1]["sum"], "the two tasks read different data"
    print(f"table_bytes: {size}")
    for i, r in enumerate(results, 1):
        print(f"rows_task{i}: {r['rows']}")
        print(f"private_growth_mb_task{i}: {r['growth'] / 2**20:.2f}")
        print(f"private_growth_ratio_task{i}: {r['growth'] / size:.4f}")
        print(f"control_copy_growth_ratio_task{i}: {r['copy_growth'] / size:.4f}")
    print(f"max_private_growth_ratio: {max(r['growth'] for r in results) / size:.4f}")


if __name__ == "__main__":
    main()
