"""End to end: the test zoo (6 structurally different models, fp16 + int8) through the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
from urllib.parse import urlsplit

import pytest
import torch
from click.testing import CliRunner

import quantizer
from jobs.cli import main
from jobs.manifest import FIELDS
from tests.jobs.conftest import read_manifest, rows_by_key

CONV_LINEAR = ("residual-cnn", "digits-mlp", "depthwise-cnn", "tuple-output-cnn")


def local_path(uri: str) -> str:
    return urlsplit(uri).path


@pytest.fixture(scope="module")
def converted(ray_local, demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "out"
    result = CliRunner().invoke(main, [str(demo_dir / "zoo-tests.yaml"), "--out", str(out), "--json"])
    return out, result


def test_exit_code_and_summary(converted):
    out, result = converted
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"] == {"ok": 10, "failed": 2, "skipped": 0}
    assert "model" in result.stderr and "precision" in result.stderr  # the table went to stderr


def test_every_row_has_every_field(converted):
    out, _ = converted
    doc = read_manifest(out)
    assert doc["schema_version"] == 1 and doc["updated_at"]
    assert len(doc["rows"]) == 12
    for row in doc["rows"]:
        assert set(FIELDS) <= set(row), set(FIELDS) - set(row)


def test_failed_rows_name_the_problem(converted):
    rows = rows_by_key(converted[0])
    gated = rows[("gated-cnn", "int8")]
    assert gated["status"] == "failed" and gated["error_type"] == "TraceError"
    assert "GatedCNN" in gated["error_message"]
    lstm = rows[("lstm-classifier", "int8")]
    assert lstm["status"] == "failed" and lstm["error_type"] == "NotQuantizedError"
    assert "LSTM" in lstm["error_message"] and lstm["artifact_uri"] is None
    for name in ("gated-cnn", "lstm-classifier"):
        assert rows[(name, "fp16")]["status"] == "ok"
    ok = [k for k, r in rows.items() if r["status"] == "ok"]
    assert len(ok) == 10


def test_artifacts_reload_and_match_the_manifest(converted, demo_dir):
    out, _ = converted
    for (name, precision), row in rows_by_key(out).items():
        if row["status"] != "ok":
            continue
        path = local_path(row["artifact_uri"])
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == row["artifact_sha256"]
        folder = os.path.dirname(path)
        assert sorted(os.listdir(folder)) == sorted(f["path"] for f in row["files"])
        for entry in row["files"]:
            with open(os.path.join(folder, entry["path"]), "rb") as f:
                data = f.read()
            assert (hashlib.sha256(data).hexdigest(), len(data)) == (entry["sha256"], entry["bytes"])
        model = quantizer.load_artifact(path)
        _check_outputs_match_measurement(model, row, demo_dir)
        if precision == "fp16":
            floats = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
            assert floats and all(t.dtype == torch.float16 for t in floats)


def test_only_the_model_that_branches_on_its_data_ships_without_a_torchscript_copy(converted):
    for (name, precision), row in rows_by_key(converted[0]).items():
        if row["status"] != "ok":
            continue
        paths = [f["path"] for f in row["files"]]
        recipe = json.loads(open(os.path.join(os.path.dirname(local_path(row["artifact_uri"])),
                                              "recipe.json")).read())
        if name != "gated-cnn":
            assert "model.torchscript.pt" in paths and "torchscript_error" not in recipe, name
            assert "TorchScript" not in (row["notes"] or ""), name
            continue
        # its first held-out row takes one block; a trace would run that block for every input
        assert "model.torchscript.pt" not in paths
        assert "no TorchScript copy: ArtifactError: the traced copy's outputs differ" in row["notes"]
        assert re.search(r"differ from the module's on check row \d+: the forward branches on "
                         r"tensor values \(models\.py:\d+\)", recipe["torchscript_error"])


def _check_outputs_match_measurement(model, row, demo_dir):
    """Recompute SQNR on the rows the task held out: the reloaded artifact gives the same figure."""
    from quantizer.calibration import read_table

    data = "calib/flat/" if row["name"] == "digits-mlp" else "calib/images/"
    table = read_table(str(demo_dir / data))
    n_cal = row["calibration_batches"] * 16 if row["precision"] == "int8" else 10 * 16
    rows = row["fidelity_rows"]
    x = next(iter(quantizer.CalibrationData.from_table(table.slice(n_cal, rows), rows)))[0]
    fp32 = quantizer.load_model(row["factory"], local_path(row["source_uri"]) if "://" in row["source_uri"]
                                else row["source_uri"], kwargs=_kwargs(demo_dir, row["name"]))
    xc = x.half() if row["precision"] == "fp16" else x
    if row["precision"] == "fp16":
        # as jobs.measure runs fp16 on a CPU (its row's note says so): oneDNN's kernels
        assert "channels_last" in row["notes"]
        model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        sqnr = quantizer.sqnr_db(fp32(x), model(xc))
    assert sqnr == pytest.approx(row["sqnr_db"], abs=1e-3), row["name"]


def _kwargs(demo_dir, name):
    import yaml

    zoo = yaml.safe_load((demo_dir / "zoo-tests.yaml").read_text())
    return next(m.get("kwargs", {}) for m in zoo["models"] if m["name"] == name)


def test_int8_is_small_and_faithful(converted):
    rows = rows_by_key(converted[0])
    for name in CONV_LINEAR:
        row = rows[(name, "int8")]
        assert row["status"] == "ok", row["error_message"]
        assert row["size_ratio"] <= 0.30, (name, row["size_ratio"])
        assert row["quantized_fraction"] >= 0.9
        assert row["sqnr_db"] >= 15 and row["top1_agreement"] >= 0.9
        assert row["calibration_batches"] == 10
        assert row["latency_ms"] > 0 and row["latency_fp32_ms"] > 0 and row["speedup"] > 0


def test_parquet_equals_json(converted):
    from jobs.manifest import read_parquet_rows
    from jobs.store import Store

    out = converted[0]
    assert read_parquet_rows(Store(str(out))) == read_manifest(out)["rows"]


def test_run_record_and_report(converted):
    out = converted[0]
    runs = os.listdir(out / "runs")
    assert len(runs) == 1
    record = json.loads((out / "runs" / runs[0]).read_text())
    assert record["counts"] == {"ok": 10, "failed": 2, "skipped": 0}
    html = (out / "report.html").read_text()
    assert html.count('class="chart"') == 3 or html.count("class='chart'") == 3
