"""Faults on a real multi-node Ray (``ray.cluster_utils.Cluster``, 3 nodes): nothing is lost.

Each test runs the real CLI as a subprocess joined to the cluster with ``--address`` and then
SIGKILLs a worker, removes a node, SIGKILLs the driver, races two runs on one DEST, fills the
output store's disk, or feeds a model far larger than any node. Workers import
``tests.jobs.fault_models`` because the cluster's processes inherit PYTHONPATH = the repository
root, set by the ``cluster`` fixture. This process never calls ``ray.init``, so it does not touch
a session Ray of other test modules. See docs/reliability.md for the figures and how to rerun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.jobs import fault_models as fm
from tests.jobs.conftest import assert_resumed, read_manifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NODE_MEMORY = 1 << 30            # the `memory` resource of every node
F = "tests.jobs.fault_models"
# Quicker node-death detection than Ray's default (~16 s), so a removed node's tasks move on.
CLUSTER_ENV = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
               "RAY_health_check_initial_delay_ms": "0"}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    saved = dict(os.environ)
    os.environ.update(CLUSTER_ENV, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "memory": NODE_MEMORY, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1, memory=NODE_MEMORY)
    c.wait_for_nodes()
    yield c
    c.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def _zoo(folder: Path, models: dict[str, dict], precisions: str = "[fp16]") -> Path:
    """A zoo of TinyMLP-like models: name -> {factory?, kwargs?, width?} with checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "calib").exists():
        fm.write_calib(folder / "calib")
    lines = ["defaults:", "  calibration: {data: calib, batches: 2, batch_size: 16}", "models:"]
    for name, m in models.items():
        kwargs = dict(m.get("kwargs", {}))
        fm.write_checkpoint(folder / f"{name}.pt", fm.TinyMLP(width=kwargs.get("width", 32)))
        lines.append(f'  - {{name: {name}, factory: "{m.get("factory", F + ":TinyMLP")}", '
                     f"checkpoint: {name}.pt, kwargs: {json.dumps(kwargs)}, "
                     f"precisions: {m.get('precisions', precisions)}}}")
    (folder / "zoo.yaml").write_text("\n".join(lines) + "\n")
    return folder / "zoo.yaml"


def _spawn(zoo: Path, out: Path, cluster, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", str(zoo), "--out", str(out), "--address",
         cluster.address, "--json", *map(str, extra)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, dict | None, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()       # a hung run must not outlive its test
        proc.communicate()
        raise
    try:
        return proc.returncode, json.loads(stdout), stderr
    except json.JSONDecodeError:
        return proc.returncode, None, stderr


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["name"], r["precision"]): r for r in read_manifest(out)["rows"]}


def _assert_whole(out: Path, n_rows: int) -> None:
    """The manifest holds every row (JSON and Parquet agree), and DEST has no half-written file."""
    from jobs.manifest import read_parquet_rows
    from jobs.store import Store

    doc = read_manifest(out)
    assert doc["schema_version"] == 1 and len(doc["rows"]) == n_rows
    assert read_parquet_rows(Store(str(out))) == doc["rows"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    published = {(p.parts[-3], p.parts[-2]) for p in (out / "artifacts").glob("*/*/*") if p.is_dir()}
    assert published == {k for k, r in _rows(out).items() if r["artifact_uri"]}


def test_worker_sigkill_mid_conversion_is_retried(cluster, tmp_path):
    marker = tmp_path / "victim.pid"
    zoo = _zoo(tmp_path / "zoo", {
        "victim": {"kwargs": {"marker": str(marker), "seconds": 120}, "precisions": "[int8]"},
        "bystander-a": {}, "bystander-b": {}})
    out = tmp_path / "out"
    proc = _spawn(zoo, out, cluster)
    _wait_for(marker.exists, proc)            # the victim is inside int8 calibration
    os.kill(int(marker.read_text()), signal.SIGKILL)
    code, summary, stderr = _finish(proc)
    assert code == 0, stderr
    victim = _rows(out)[("victim", "int8")]
    assert victim["status"] == "ok" and victim["attempts"] == 2, victim
    assert victim["quantized_fraction"] >= 0.9 and victim["sqnr_db"] > 20
    assert {r["attempts"] for k, r in _rows(out).items() if k[0] != "victim"} == {1}
    _assert_whole(out, 3)
    assert subprocess.run([sys.executable, "-m", "jobs.cli", str(zoo), "--out", str(out),
                           "--verify"], cwd=REPO, capture_output=True).returncode == 0


def test_node_removed_mid_run_reruns_elsewhere(cluster, tmp_path):
    markers = [tmp_path / f"m{i}.pid" for i in range(4)]
    zoo = _zoo(tmp_path / "zoo", {f"m{i}": {"kwargs": {"marker": str(m), "seconds": 8}}
                                  for i, m in enumerate(markers)})
    out = tmp_path / "out"
    proc = _spawn(zoo, out, cluster)
    _wait_for(lambda: sum(m.exists() for m in markers) >= 3, proc)   # every node is busy
    victim = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
    cluster.remove_node(victim, allow_graceful=False)
    try:
        code, summary, stderr = _finish(proc)
    finally:
        cluster.add_node(num_cpus=1, memory=NODE_MEMORY)
        cluster.wait_for_nodes()
    rows = _rows(out)
    assert len(rows) == 4
    died = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError")
    for row in rows.values():
        assert row["status"] == "ok" or row["error_type"] in died, row
    assert code == (1 if any(r["status"] == "failed" for r in rows.values()) else 0), stderr
    rerun = [r for r in rows.values() if (r["attempts"] or 1) >= 2]
    assert rerun, "no task was running on the removed node"
    for row in rerun:
        assert row["status"] == "ok", row
        assert victim.node_id[:12] not in row["node"]
    _assert_whole(out, 4)


def test_driver_sigkill_then_rerun_converts_nothing_twice(cluster, tmp_path):
    names = [f"d{i}" for i in range(6)]
    zoo = _zoo(tmp_path / "zoo", {n: {"kwargs": {"marker": str(tmp_path / f"{n}.pid"),
                                                 "seconds": 2}} for n in names})
    out = tmp_path / "out"
    proc = _spawn(zoo, out, cluster)
    _wait_for(lambda: list((out / "artifacts").glob("*/*/*.json")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    records = list((out / "artifacts").glob("*/*/*.json"))
    finished = {(p.parts[-3], p.parts[-2]) for p in records}
    assert 1 <= len(finished) < 6
    before = {str(p): (p.stat().st_ino, p.stat().st_mtime_ns)
              for p in (out / "artifacts").rglob("*") if p.is_file()}
    # what the killed driver had recorded is up to date; what finished after its last manifest
    # write is adopted from its completion record
    recorded = set(_rows(out)) if (out / "manifest.json").exists() else set()
    code, summary, stderr = _finish(_spawn(zoo, out, cluster))
    assert code == 0, stderr
    assert_resumed(summary["rows"], finished, recorded, 6)
    after = {str(p): (p.stat().st_ino, p.stat().st_mtime_ns)
             for p in (out / "artifacts").rglob("*") if p.is_file()}
    assert {p: after[p] for p in before if p in after} == before   # nothing rewritten
    assert {r["status"] for r in _rows(out).values()} == {"ok"}
    _assert_whole(out, 6)


def test_two_runs_on_one_dest_one_exits_3(cluster, tmp_path):
    zoo = _zoo(tmp_path / "zoo", {"a": {"kwargs": {"marker": str(tmp_path / "a.pid"),
                                                   "seconds": 3}}, "b": {}})
    out = tmp_path / "out"
    procs = [_spawn(zoo, out, cluster), _spawn(zoo, out, cluster)]
    results = [_finish(p) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 3], [r[2][-2000:] for r in results]
    loser = next(r for r in results if r[0] == 3)
    assert "is locked by run" in loser[2]
    winner = next(r for r in results if r[0] == 0)
    assert winner[1]["counts"]["ok"] == 2
    assert len(read_manifest(out)["rows"]) == 2
    assert len(os.listdir(out / "runs")) == 1
    _assert_whole(out, 2)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test (needs root), unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode:
        pytest.fail("cannot mount a tmpfs (the store-failure test needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_store_disk_full_mid_write(cluster, tmp_path, small_disk):
    # "big": 16 -> 40000 -> 4, ~3.2 MB as fp32 state_dict; its fp16 artifact cannot fit in 2 MiB
    zoo = _zoo(tmp_path / "zoo", {
        "small": {}, "big": {"kwargs": {"width": 40000, "marker": str(tmp_path / "big.pid"),
                                        "seconds": 3}}})
    out = small_disk / "dest"
    code, summary, stderr = _finish(_spawn(zoo, out, cluster))
    assert code == 1, stderr
    rows = _rows(out)
    assert rows[("small", "fp16")]["status"] == "ok"
    big = rows[("big", "fp16")]
    assert big["status"] == "failed" and big["error_type"] == "StoreError", big
    assert "No space left on device" in big["error_message"]
    # at most the empty parent folders: no key folder, no file of the failed artifact
    assert not [p for p in (out / "artifacts" / "big").rglob("*") if p.is_file() or p.name != "fp16"]
    _assert_whole(out, 2)
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True)
    code, summary, stderr = _finish(_spawn(zoo, out, cluster))
    assert code == 0, stderr
    assert {(r["name"], r["status"]) for r in summary["rows"]} == {("small", "skipped"), ("big", "ok")}
    assert _rows(out)[("big", "fp16")]["status"] == "ok"
    _assert_whole(out, 2)


def test_model_larger_than_any_node_fails_clearly(cluster, tmp_path):
    # ~128 MB checkpoint: its task asks for 256 MiB + 8 x 128 MB, more than any node's 1 GiB
    zoo = _zoo(tmp_path / "zoo", {"huge": {"kwargs": {"width": 1_600_000}}, "fine": {}})
    out = tmp_path / "out"
    t0 = time.monotonic()
    code, summary, stderr = _finish(_spawn(zoo, out, cluster), timeout=180)
    elapsed = time.monotonic() - t0
    assert code == 1, stderr
    rows = _rows(out)
    assert rows[("fine", "fp16")]["status"] == "ok"
    huge = rows[("huge", "fp16")]
    assert huge["status"] == "failed" and huge["error_type"] == "OutOfMemory", huge
    assert "MiB" in huge["error_message"] and "largest node" in huge["error_message"]
    assert elapsed < 150
    _assert_whole(out, 2)
