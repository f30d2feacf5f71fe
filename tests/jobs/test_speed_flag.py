"""The int8 speed gate and flag: ``min_speedup`` fails a row, slower int8 rows are flagged.

Two demo models through the real CLI on the session Ray: one with a ``min_speedup`` no int8 model
can reach (its int8 row must fail with SpeedupError, the rest of the batch still converts, exit
1), one with a gate every model passes. The table and the HTML report must flag exactly the int8
rows whose measured speedup is below 1.0, whatever the machine measured.
"""

from __future__ import annotations

import json

import yaml

from click.testing import CliRunner

from jobs.cli import main
from jobs.report import render_report
from jobs.summary import format_table, note_of
from tests.jobs.conftest import read_manifest, rows_by_key

GATES = {"residual-cnn": 1e6, "depthwise-cnn": 1e-6}   # unreachable / always met


def write_zoo(demo_dir, path) -> None:
    """Two entries of the demo zoo (its factories, kwargs, checkpoints), each with a speed gate."""
    demo = yaml.safe_load((demo_dir / "zoo.yaml").read_text())
    models = []
    for entry in demo["models"]:
        if entry["name"] in GATES:
            models.append(dict(entry, checkpoint=str(demo_dir / entry["checkpoint"]),
                               min_speedup=GATES[entry["name"]]))
    calibration = dict(demo["defaults"]["calibration"], batches=2,
                       data=str(demo_dir / demo["defaults"]["calibration"]["data"]))
    path.write_text(yaml.safe_dump({"defaults": {"calibration": calibration}, "models": models}))


def test_min_speedup_fails_the_row_and_slow_rows_are_flagged(ray_local, demo_dir, tmp_path):
    zoo = tmp_path / "zoo.yaml"
    write_zoo(demo_dir, zoo)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(zoo), "--out", str(out), "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"] == {"ok": 3, "failed": 1, "skipped": 0}, [
        (r["name"], r["precision"], r["error_message"]) for r in summary["rows"]]

    rows = rows_by_key(out)
    failed = rows[("residual-cnn", "int8")]
    assert failed["status"] == "failed" and failed["error_type"] == "SpeedupError"
    assert "min_speedup 1000000.0" in failed["error_message"]
    assert "ms fp32" in failed["error_message"]          # the measured latencies are named
    assert failed["artifact_uri"] is None                 # nothing shipped for a failed gate
    assert rows[("residual-cnn", "fp16")]["status"] == "ok"      # the gate is int8-only
    lenient = rows[("depthwise-cnn", "int8")]
    assert lenient["status"] == "ok" and lenient["speedup"] > 0
    assert lenient["latency_ms"] > 0 and lenient["latency_fp32_ms"] > 0
    assert abs(lenient["speedup"] - lenient["latency_fp32_ms"] / lenient["latency_ms"]) \
        <= 0.01 * lenient["speedup"] + 1e-3

    table = format_table(summary["rows"])
    assert "SpeedupError" in table
    manifest_rows = read_manifest(out)["rows"]
    html = render_report(manifest_rows)
    for row in manifest_rows:
        if row["precision"] != "int8" or row["status"] != "ok":
            continue
        slow = row["speedup"] < 1.0
        assert ("SLOWER than fp32" in note_of(row)) == slow, row
        assert ("<tr class=\"status-ok slow\"" in html) == slow, row["speedup"]
    assert (out / "report.html").read_text().count("SpeedupError") >= 1
