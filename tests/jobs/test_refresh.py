"""Scheduled refresh: content keys, skips, resume after SIGKILL, the lock, --verify, retirement."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from jobs import driver
from jobs.cli import main
from jobs.zoo import load_zoo
from tests.jobs.conftest import assert_resumed, read_manifest, rows_by_key
from tests.jobs.lock_race import crash_holding
from tests.jobs.test_integrity import REPO, make_zoo

# Six models whose every row converts: a refresh of it must skip everything.
HEADER = """\
defaults:
  calibration: {data: calib/images/, batches: 4, batch_size: 16}
models:
"""
def _entry(name: str, cls: str, extra: str = "") -> str:
    from jobs.demo.models import DEMO_MODELS, TEST_MODELS

    kwargs = json.dumps({**DEMO_MODELS, **TEST_MODELS}[name][1])
    return (f'  - {{name: {name}, factory: "jobs.demo.models:{cls}", kwargs: {kwargs}, '
            f'checkpoint: ckpt/{name}.pt{extra}}}')


ENTRIES = [
    _entry("residual-cnn", "ResidualCNN"),
    _entry("digits-mlp", "DigitsMLP", ", calibration: {data: calib/flat/}"),
    _entry("depthwise-cnn", "DepthwiseCNN"),
    _entry("tuple-output-cnn", "TupleOutputCNN"),
    _entry("gated-cnn", "GatedCNN", ", precisions: [fp16]"),
    _entry("lstm-classifier", "LSTMClassifier", ", precisions: [fp16]"),
]
SIX = HEADER + "\n".join(ENTRIES) + "\n"


@pytest.fixture
def six(demo_copy):
    zoo = demo_copy / "six.yaml"
    zoo.write_text(SIX)
    return zoo


def cli(*args) -> tuple[int, dict | None, str]:
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    try:
        summary = json.loads(result.stdout)
    except json.JSONDecodeError:
        summary = None
    return result.exit_code, summary, result.stderr


def statuses(summary) -> dict[tuple[str, str], str]:
    return {(r["name"], r["precision"]): r["status"] for r in summary["rows"]}


def artifact_mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (out / "artifacts").rglob("*") if p.is_file()}


def test_unchanged_zoo_is_skipped_without_ray(ray_local, six, tmp_path):
    out = tmp_path / "out"
    code, first, _ = cli(six, "--out", out)
    assert code == 0 and first["counts"]["ok"] == 10
    before = artifact_mtimes(out)
    result = driver.run(load_zoo(six), driver.RunOptions(out=str(out)))
    assert result.counts == {"ok": 0, "failed": 0, "skipped": 10}
    assert result.ray_used is False
    assert all("up to date" in r["reason"] for r in result.rows)
    assert artifact_mtimes(out) == before
    assert all(r["status"] == "ok" for r in read_manifest(out)["rows"])
    assert len(os.listdir(out / "runs")) == 2


def test_changed_checkpoint_reconverts_exactly_its_rows(ray_local, six, tmp_path):
    out = tmp_path / "out"
    assert cli(six, "--out", out)[0] == 0
    ckpt = six.parent / "ckpt" / "digits-mlp.pt"
    state = torch.load(ckpt, weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] * 1.01
    torch.save(state, ckpt)
    code, summary, _ = cli(six, "--out", out)
    assert code == 0
    converted = {k for k, s in statuses(summary).items() if s != "skipped"}
    assert converted == {("digits-mlp", "fp16"), ("digits-mlp", "int8")}
    reasons = {r["reason"] for r in summary["rows"] if r["name"] == "digits-mlp"}
    assert reasons == {"checkpoint changed"}


def test_changed_backend_reconverts_int8_rows_only(ray_local, six, tmp_path):
    out = tmp_path / "out"
    assert cli(six, "--out", out)[0] == 0
    code, summary, _ = cli(six, "--out", out, "--backend", "qnnpack")
    assert code == 0
    converted = {k for k, s in statuses(summary).items() if s != "skipped"}
    assert converted == {(n, "int8") for n in ("residual-cnn", "digits-mlp", "depthwise-cnn",
                                               "tuple-output-cnn")}
    assert {r["backend"] for r in read_manifest(out)["rows"] if r["precision"] == "int8"} == {"qnnpack"}


def test_same_size_rewrite_with_reset_mtime_is_noticed(ray_local, six, tmp_path):
    """The hash cache keys on ctime too, which `touch -d` / os.utime cannot reset."""
    out = tmp_path / "out"
    assert cli(six, "--out", out)[0] == 0
    ckpt = six.parent / "ckpt" / "depthwise-cnn.pt"
    st = ckpt.stat()
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = -state[key]                     # same size, different bytes
    torch.save(state, ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ckpt.stat().st_size == st.st_size and ckpt.stat().st_mtime_ns == st.st_mtime_ns
    code, summary, _ = cli(six, "--out", out, "--dry-run")
    plan = {(p["name"], p["precision"]): p["action"] for p in summary["plan"]}
    assert plan[("depthwise-cnn", "fp16")] == "convert"
    assert sum(a == "convert" for a in plan.values()) == 2


def test_dry_run_changes_nothing(six, tmp_path):
    out = tmp_path / "out"
    code, summary, stderr = cli(six, "--out", out, "--dry-run")
    assert code == 0 and not out.exists()
    assert {p["action"] for p in summary["plan"]} == {"convert"}
    assert {p["reason"] for p in summary["plan"]} == {"new"}
    assert "dry run: 10 to convert, 0 to skip" in stderr


def test_verify_catches_flipped_and_deleted_artifacts(ray_local, six, tmp_path):
    out = tmp_path / "out"
    assert cli(six, "--out", out)[0] == 0
    code, report, _ = cli(six, "--out", out, "--verify")
    assert code == 0 and report["problems"] == 0 and len(report["verify"]) == 10
    rows = rows_by_key(out)
    flipped = Path(rows[("residual-cnn", "int8")]["artifact_uri"].removeprefix("file://"))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    deleted = Path(rows[("digits-mlp", "fp16")]["artifact_uri"].removeprefix("file://"))
    deleted.parent.joinpath("recipe.json").unlink()
    code, report, stderr = cli(six, "--out", out, "--verify")
    assert code == 1 and report["problems"] == 2
    bad = {(r["name"], r["precision"]): r["problem"] for r in report["verify"] if not r["ok"]}
    assert "sha256" in bad[("residual-cnn", "int8")]
    assert "missing" in bad[("digits-mlp", "fp16")]
    assert "residual-cnn" in stderr and "digits-mlp" in stderr


def test_retired_model_is_marked_and_kept(ray_local, six, tmp_path):
    out = tmp_path / "out"
    assert cli(six, "--out", out)[0] == 0
    six.write_text(HEADER + "\n".join(ENTRIES[:-1]) + "\n")   # lstm-classifier leaves the zoo
    code, summary, _ = cli(six, "--out", out)
    assert code == 0 and summary["counts"]["ok"] == 0
    row = rows_by_key(out)[("lstm-classifier", "fp16")]
    assert row["retired"] is True and row["status"] == "ok"
    assert Path(row["artifact_uri"].removeprefix("file://")).exists()


def _spawn(zoo, out, address) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", str(zoo), "--out", str(out), "--address", address,
         "--json"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_driver_then_resume(ray_local, six, tmp_path):
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    proc = _spawn(six, out, address)
    deadline = time.monotonic() + 120
    while not list((out / "artifacts").glob("*/*/*.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {(p.parts[-3], p.parts[-2]) for p in (out / "artifacts").glob("*/*/*.json")}
    assert 1 <= len(finished) < 10
    # rows the killed driver recorded are up to date; the rest of what finished is adopted
    recorded = {(r["name"], r["precision"]) for r in _manifest_rows(out)}
    code, summary, _ = cli(six, "--out", out)
    assert code == 0
    assert_resumed(summary["rows"], finished, recorded, 10)
    assert cli(six, "--out", out, "--verify")[0] == 0
    assert not list(out.rglob(".tmp-*"))
    assert len(read_manifest(out)["rows"]) == 10


def test_second_concurrent_run_exits_3(ray_local, six, tmp_path):
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    proc = _spawn(six, out, address)
    deadline = time.monotonic() + 60
    while not (out / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    code, _, stderr = cli(six, "--out", out)
    assert code == 3
    holder = json.loads((out / ".lock").read_text())
    assert holder["run_id"] in stderr and socket.gethostname() in stderr
    assert holder["started_at"] in stderr
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads(stdout)["counts"]["ok"] == 10
    assert len(read_manifest(out)["rows"]) == 10


def test_dead_holders_lock_is_taken_over(ray_local, six, tmp_path):
    out = tmp_path / "out"
    crash_holding([str(out)], tmp_path)          # took the lock, then was SIGKILLed
    assert json.loads((out / ".lock").read_text())["run_id"].startswith("crashed-")
    code, summary, _ = cli(six, "--out", out, "--only", "digits-mlp")
    assert code == 0 and summary["counts"]["ok"] == 2
    assert not (out / ".lock").exists()


def test_foreign_lock_blocks_until_seen_unchanged_for_the_expiry(ray_local, six, tmp_path,
                                                                  monkeypatch):
    from jobs import lock as lock_mod

    out = tmp_path / "out"
    out.mkdir()
    holder = {"run_id": "elsewhere", "host": "another-host", "pid": 1,
              "boot_id": "boot-of-another-host", "started_at": "2026-01-01T00:00:00Z",
              "heartbeat": time.time(), "beat": 0}
    (out / ".lock").write_text(json.dumps(holder))
    args = (six, "--out", out, "--only", "digits-mlp", "--precision", "fp16")
    assert cli(*args, "--dry-run")[0] == 0  # a dry run changes nothing and needs no lock
    code, _, stderr = cli(*args)
    assert code == 3 and "elsewhere" in stderr and "another-host" in stderr
    # Its heartbeat looks old by our clock, which proves nothing across hosts: the run watches
    # the lock for the expiry (shortened here) and takes it over because it never changed.
    holder["heartbeat"] = time.time() - 400
    (out / ".lock").write_text(json.dumps(holder))
    monkeypatch.setattr(lock_mod, "LOCK_EXPIRY_S", 1.0)
    code, summary, _ = cli(*args)
    assert code == 0 and summary["counts"]["ok"] == 1


def _manifest_rows(out: Path) -> list:
    try:
        return read_manifest(out)["rows"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_keeps_what_finished_and_releases_the_lock(ray_local, tmp_path):
    # "slow" waits 120 s at its gate, so Ctrl-C always lands while it converts (on a slow machine
    # a zoo of quick models could finish before the signal)
    marker = tmp_path / "slow.pid"
    zoo = make_zoo(tmp_path / "zoo", {"a": {}, "b": {}, "slow": {
        "kwargs": {"marker": str(marker), "seconds": 120}, "precisions": "[fp16]"}})
    out = tmp_path / "out"
    proc = _spawn(zoo, out, ray_local.get_runtime_context().gcs_address)
    deadline = time.monotonic() + 120
    # Interrupt once the driver has collected a row (its periodic manifest write shows it): a
    # completion record on disk alone may not have reached the driver yet.
    while not (_manifest_rows(out) and marker.exists()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again" in err
    assert not (out / ".lock").exists()
    recorded = {(r["name"], r["precision"]) for r in read_manifest(out)["rows"]}
    assert recorded, "the rows that finished before Ctrl-C are in the manifest"
    assert ("slow", "fp16") not in recorded
    # the task still running stops with the command (README): its worker is gone
    worker = int(marker.read_text())
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the interrupted run's task is still running"
    code, summary, _ = cli(zoo, "--out", out)
    assert code == 0
    again = {(r["name"], r["precision"]) for r in summary["rows"] if r["status"] == "ok"}
    # finished by the interrupted run after its last manifest write: adopted, not reconverted
    adopted = {(r["name"], r["precision"]) for r in summary["rows"]
               if r["status"] == "skipped" and "interrupted" in r["reason"]}
    assert not again & (recorded | adopted)                      # nothing converted twice
    assert ("slow", "fp16") in again
    assert len(again | recorded | adopted) == 5
