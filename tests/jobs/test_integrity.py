"""The store tells the truth: no key without its hashes, no adoption of damaged files, keys on what
the worker ran, a run that lost its lock stops, honest rows (issue 10: items 1, 2, 6, 7, 8c, 15,
16, 17). Each test drives the real CLI (in-process on the session Ray, or a subprocess joined to
it) on tiny models from ``tests.jobs.fault_models``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import jobs.plan
from jobs.cli import main
from tests.jobs import fault_models as fm
from tests.jobs.conftest import read_manifest, rows_by_key

REPO = Path(__file__).resolve().parents[2]
F = "tests.jobs.fault_models"


def make_zoo(folder: Path, models: dict[str, dict], defaults: str = "") -> Path:
    """name -> {factory?, kwargs?, precisions?, model?}: checkpoints, one calibration folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "calib").exists():
        fm.write_calib(folder / "calib")
    lines = ["defaults:", "  calibration: {data: calib, batches: 2, batch_size: 16}"]
    lines += [f"  {line}" for line in defaults.splitlines()] + ["models:"]
    for name, m in models.items():
        fm.write_checkpoint(folder / f"{name}.pt", m.get("model"))
        lines.append(f'  - {{name: {name}, factory: "{m.get("factory", F + ":TinyMLP")}", '
                     f'checkpoint: {name}.pt, kwargs: {json.dumps(m.get("kwargs", {}))}, '
                     f'precisions: {m.get("precisions", "[fp16, int8]")}}}')
    (folder / "zoo.yaml").write_text("\n".join(lines) + "\n")
    return folder / "zoo.yaml"


def cli(*args) -> tuple[int, dict | None, str]:
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    try:
        summary = json.loads(result.stdout)
    except json.JSONDecodeError:
        summary = None
    return result.exit_code, summary, result.output


def verify(zoo, out) -> dict:
    return cli(zoo, "--out", out, "--verify")[1]


def local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


# -- item 1: no key without the source's hash; the task checks the bytes it loads ---------------
def test_unhashable_checkpoint_fails_its_rows_and_publishes_nothing(ray_local, tmp_path,
                                                                   monkeypatch):
    zoo = make_zoo(tmp_path / "zoo", {"a": {}, "b": {}})
    out = tmp_path / "out"
    real = jobs.plan.SourceHasher.digest

    def throttled(self, uri):       # S3 throttling that outlasts the retries, for b only
        if uri.endswith("b.pt"):
            raise OSError(f"{uri}: AWS Error SLOW_DOWN during HeadObject operation")
        return real(self, uri)

    monkeypatch.setattr(jobs.plan.SourceHasher, "digest", throttled)
    code, summary, output = cli(zoo, "--out", out)
    assert code == 1, output
    rows = rows_by_key(out)
    for precision in ("fp16", "int8"):
        assert rows[("a", precision)]["status"] == "ok"
        b = rows[("b", precision)]
        assert (b["status"], b["error_type"], b["key"]) == ("failed", "CheckpointError", None), b
        assert "b.pt" in b["error_message"] and "SLOW_DOWN" in b["error_message"]
    assert not (out / "artifacts" / "b").exists()
    monkeypatch.setattr(jobs.plan.SourceHasher, "digest", real)
    code, summary, _ = cli(zoo, "--out", out)          # the next run retries b, keyed properly
    assert code == 0
    assert all(r["source_sha256"] and r["status"] == "ok" for r in read_manifest(out)["rows"])


def test_checkpoint_changed_since_the_plan_is_not_published_under_the_old_key(
        ray_local, tmp_path, monkeypatch):
    zoo = make_zoo(tmp_path / "zoo", {"a": {"precisions": "[fp16]"}})
    out = tmp_path / "out"
    real = jobs.plan.SourceHasher.digest

    def planned_before_a_rewrite(self, uri):
        source = real(self, uri)
        return type(source)(source.uri, "0" * 64, source.bytes)

    monkeypatch.setattr(jobs.plan.SourceHasher, "digest", planned_before_a_rewrite)
    code, summary, output = cli(zoo, "--out", out)
    assert code == 1, output
    row = rows_by_key(out)[("a", "fp16")]
    assert (row["status"], row["error_type"]) == ("failed", "SourceChangedError"), row
    assert "changed since this run planned it" in row["error_message"]
    assert not list((out / "artifacts").rglob("model.pt"))


# -- item 2: adopt only what checks out; --force repairs ----------------------------------------
def test_deleted_artifact_folder_is_converted_again_not_adopted(ray_local, tmp_path):
    zoo = make_zoo(tmp_path / "zoo", {"a": {}})
    out = tmp_path / "out"
    assert cli(zoo, "--out", out)[0] == 0
    row = rows_by_key(out)[("a", "int8")]
    folder = local(row["artifact_uri"]).parent
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()                     # the completion record beside it stays
    code, summary, _ = cli(zoo, "--out", out)
    assert code == 0
    done = {(r["name"], r["precision"]): r for r in summary["rows"]}
    assert done[("a", "int8")]["status"] == "ok", done[("a", "int8")]
    assert done[("a", "fp16")]["status"] == "skipped"
    assert verify(zoo, out)["problems"] == 0


def test_a_completion_record_the_manifest_never_got_is_adopted(ray_local, tmp_path):
    """A driver killed between a task's completion record and its next manifest write: the
    rerun adopts the record (files intact) instead of converting again."""
    zoo = make_zoo(tmp_path / "zoo", {"a": {}})
    out = tmp_path / "out"
    assert cli(zoo, "--out", out)[0] == 0
    files = {p: p.stat().st_mtime_ns for p in (out / "artifacts").rglob("*") if p.is_file()}
    for name in ("manifest.json", "manifest.parquet"):
        (out / name).unlink(missing_ok=True)
    code, summary, _ = cli(zoo, "--out", out)
    assert code == 0
    assert {(r["status"], "interrupted" in r["reason"]) for r in summary["rows"]} == {
        ("skipped", True)}
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert {r["status"] for r in read_manifest(out)["rows"]} == {"ok"}


def test_force_replaces_a_damaged_artifact(ray_local, tmp_path):
    zoo = make_zoo(tmp_path / "zoo", {"a": {}})
    out = tmp_path / "out"
    assert cli(zoo, "--out", out)[0] == 0
    path = local(rows_by_key(out)[("a", "fp16")]["artifact_uri"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert verify(zoo, out)["problems"] == 1
    code, summary, _ = cli(zoo, "--out", out, "--force")
    assert code == 0 and summary["counts"]["ok"] == 2
    assert verify(zoo, out)["problems"] == 0
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


# -- item 6: the factory's code is part of the key ----------------------------------------------
def test_editing_the_factory_module_changes_the_key_without_importing_it(tmp_path):
    zoo = make_zoo(tmp_path / "zoo", {"a": {"factory": "zoo_nets:Net", "precisions": "[fp16]"}})
    module = tmp_path / "zoo" / "zoo_nets.py"
    module.write_text("from tests.jobs.fault_models import TinyMLP as Net\n")
    out = tmp_path / "out"
    first = cli(zoo, "--out", out, "--dry-run")[1]["plan"][0]["key"]
    assert cli(zoo, "--out", out, "--dry-run")[1]["plan"][0]["key"] == first
    module.write_text("from tests.jobs.fault_models import TinyMLP as Net  # forward() edited\n")
    assert cli(zoo, "--out", out, "--dry-run")[1]["plan"][0]["key"] != first
    assert "zoo_nets" not in sys.modules


# -- item 7: keys on what the worker ran ----------------------------------------------------------
def test_rows_are_keyed_on_the_workers_facts_not_the_drivers_belief(ray_local, tmp_path,
                                                                   monkeypatch):
    import torch

    zoo = make_zoo(tmp_path / "zoo", {"a": {}})
    out = tmp_path / "out"
    # A driver whose own torch differs from its workers' (a ray:// client): the code this
    # replaced keyed rows on the driver's versions, so its next run converted everything again.
    monkeypatch.setattr(jobs.plan, "versions", lambda: {"torch": "0.0.0-driver",
                                                        "quantizer": "0.0.0-driver"},
                        raising=False)
    assert cli(zoo, "--out", out)[0] == 0
    monkeypatch.undo()
    code, summary, _ = cli(zoo, "--out", out)
    assert code == 0 and summary["counts"] == {"ok": 0, "failed": 0, "skipped": 2}
    # The driver's belief here is the facts cache: make it stale, and force a conversion.
    from jobs.keys import local_environment
    from jobs.sources import search_path

    wrong = {"torch": "0.0.0-driver", "quantizer": "0.0.0-driver", "activation_range": {}}
    env = local_environment(search_path(str(zoo.parent)))
    (out / ".cache" / "worker-facts.json").write_text(json.dumps({env: wrong}))
    assert cli(zoo, "--out", out, "--force")[0] == 0
    rows = read_manifest(out)["rows"]
    assert {r["torch_version"] for r in rows} == {torch.__version__}
    assert all("keyed on this worker's torch" in (r["notes"] or "") for r in rows)
    code, summary, _ = cli(zoo, "--out", out)       # what was converted is what is up to date
    assert code == 0 and summary["counts"] == {"ok": 0, "failed": 0, "skipped": 2}


# -- item 8c: a run that lost its lock stops; the sweep spares live writers -----------------------
def test_a_run_that_lost_its_lock_stops_before_writing_the_manifest(ray_local, tmp_path):
    marker = tmp_path / "slow.pid"
    zoo = make_zoo(tmp_path / "zoo", {
        "slow": {"kwargs": {"marker": str(marker), "seconds": 4}, "precisions": "[fp16]"}})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", str(zoo), "--out", str(out), "--address",
         ray_local.get_runtime_context().gcs_address, "--json"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    thief = {"run_id": "took-over", "host": "elsewhere", "pid": 1,
             "started_at": "2026-01-01T00:00:00Z", "heartbeat": time.time()}
    (out / ".lock").write_text(json.dumps(thief))      # another run took the lock over
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "lost the lock" in err
    assert not (out / "manifest.json").exists() and not (out / "runs").exists()
    assert json.loads((out / ".lock").read_text())["run_id"] == "took-over"


def test_the_sweep_spares_a_live_writers_temporaries(ray_local, tmp_path):
    zoo = make_zoo(tmp_path / "zoo", {"a": {"precisions": "[fp16]"}})
    out = tmp_path / "out"
    live = out / "artifacts" / "b" / "fp16" / ".tmp-0123-live"
    dead = out / "artifacts" / "b" / "fp16" / ".tmp-4567-dead"
    for folder in (live, dead):
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"half-written")
    old = time.time() - 3600
    os.utime(dead / "model.pt", (old, old))
    os.utime(dead, (old, old))
    assert cli(zoo, "--out", out)[0] == 0
    assert (live / "model.pt").exists() and not dead.exists()


# -- items 15, 16, 17: honest rows --------------------------------------------------------------
def test_fp16_outputs_that_overflow_fail_the_row_named(ray_local, tmp_path):
    zoo = make_zoo(tmp_path / "zoo", {"hot": {"factory": F + ":Overflows", "model": fm.Overflows(),
                                              "precisions": "[fp16]"}})
    out = tmp_path / "out"
    code, _, output = cli(zoo, "--out", out)
    assert code == 1, output
    row = rows_by_key(out)[("hot", "fp16")]
    assert (row["status"], row["error_type"]) == ("failed", "NonFiniteOutputError"), row
    assert "hot" in row["error_message"] and "inf/NaN" in row["error_message"]
    assert row["sqnr_db"] is None and row["artifact_uri"] is None
    json.loads((out / "manifest.json").read_text(), parse_constant=pytest.fail)


def test_min_sqnr_db_gates_int8_only(ray_local, tmp_path):
    zoo = make_zoo(tmp_path / "zoo", {"a": {}}, defaults="min_sqnr_db: 1000")
    out = tmp_path / "out"
    assert cli(zoo, "--out", out)[0] == 1
    rows = rows_by_key(out)
    assert rows[("a", "fp16")]["status"] == "ok" and rows[("a", "fp16")]["sqnr_db"] > 40
    assert rows[("a", "int8")]["error_type"] == "GateNotMetError"   # tuned, then named its best
    assert "min_sqnr_db 1000" in rows[("a", "int8")]["error_message"]


def test_attempts_count_the_attempts_that_ran(ray_local, tmp_path):
    zoo = make_zoo(tmp_path / "zoo", {"a": {"precisions": "[fp16]"}, "boom": {
        "factory": F + ":raises_base_exception", "precisions": "[fp16]"}})
    out = tmp_path / "out"
    assert cli(zoo, "--out", out, "--max-retries", "2")[0] == 1
    boom = rows_by_key(out)[("boom", "fp16")]
    assert boom["status"] == "failed" and boom["error_type"] == "NotAnException", boom
    assert boom["attempts"] == 1          # never retried: not 3 = max_retries + 1
    assert rows_by_key(out)[("a", "fp16")]["attempts"] == 1


# -- item 4 (the driver's side): retirement is decided from the whole file ----------------------
def test_only_does_not_retire_the_models_it_leaves_out(ray_local, tmp_path):
    zoo = make_zoo(tmp_path / "zoo", {"a": {"precisions": "[fp16]"},
                                      "b": {"precisions": "[fp16]"}})
    out = tmp_path / "out"
    assert cli(zoo, "--out", out)[0] == 0
    assert cli(zoo, "--out", out, "--only", "b", "--force")[0] == 0
    assert {k: r["retired"] for k, r in rows_by_key(out).items()} == {
        ("a", "fp16"): False, ("b", "fp16"): False}


# -- the no-op refresh --------------------------------------------------------------------------
PROBE = ("import atexit, json, sys\n"
         "atexit.register(lambda: print('HEAVY=' + json.dumps(sorted({m.split('.')[0] for m in "
         "sys.modules if m.split('.')[0] in ('torch', 'ray')})), file=sys.stderr))\n"
         "from jobs.cli import main\nmain()\n")


def test_a_no_op_refresh_imports_neither_torch_nor_ray(ray_local, tmp_path):
    zoo = make_zoo(tmp_path / "zoo", {"a": {}, "b": {"precisions": "[fp16]"}})
    out = tmp_path / "out"
    assert cli(zoo, "--out", out)[0] == 0
    done = subprocess.run([sys.executable, "-c", PROBE, str(zoo), "--out", str(out), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"] == {"ok": 0, "failed": 0, "skipped": 3}
    assert "HEAVY=[]" in done.stderr


def test_a_converting_driver_never_imports_torch(ray_local, tmp_path):
    """What the tasks return (rows, worker facts) unpickles without torch: a ``TorchVersion``
    among them made the driver import torch at the first result (~1 s with every CPU idle)."""
    zoo = make_zoo(tmp_path / "zoo", {"a": {}})
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(zoo), "--out", str(tmp_path / "out"), "--json",
         "--address", ray_local.get_runtime_context().gcs_address],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"] == {"ok": 2, "failed": 0, "skipped": 0}
    assert 'HEAVY=["ray"]' in done.stderr


OWN_RAY_PROBE = (
    "import json, os, sys\n"
    "import jobs.fanout as fanout\n"
    "real = fanout.shutdown\n"
    "def shutdown():\n"
    "    from ray._private import worker\n"
    "    pids = [i.process.pid for infos in worker._global_node.all_processes.values()\n"
    "            for i in infos]\n"
    "    real()\n"
    "    def alive(pid):\n"
    "        try:\n"
    "            os.kill(pid, 0)\n"
    "        except ProcessLookupError:\n"
    "            return False\n"
    "        return True\n"
    "    print('RAY=' + json.dumps({'started': len(pids), 'left': [p for p in pids if alive(p)]}),\n"
    "          file=sys.stderr)\n"
    "fanout.shutdown = shutdown\n"
    "from jobs.cli import main\nmain()\n")


def test_a_run_that_starts_its_own_ray_stops_every_process_of_it(tmp_path):
    """No --address, no RAY_ADDRESS: the run starts a local Ray and, at the end, stops it whole
    (its autoscaler monitor is killed first rather than waited on)."""
    zoo = make_zoo(tmp_path / "zoo", {"a": {"precisions": "[fp16]"}})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", OWN_RAY_PROBE, str(zoo), "--out", str(tmp_path / "out"), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["ray_mode"] == "local" and summary["counts"]["ok"] == 1
    line = next(x for x in done.stderr.splitlines() if x.startswith("RAY="))
    ray_processes = json.loads(line[len("RAY="):])
    assert ray_processes["started"] >= 4 and ray_processes["left"] == []
