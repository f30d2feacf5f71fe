"""The manifest never holds a non-finite number: a NaN result is a failed row naming the field,
a stored NaN (from an older version) loads as one, and the writer refuses what slips past."""

from __future__ import annotations

import json
import math

import pytest

from jobs.manifest import (MANIFEST_JSON, Manifest, ManifestError, blank_row,
                           read_parquet_rows)
from jobs.store import Store


def strict_json(text: str):
    """json.loads as strict parsers read it: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def ok_row(name: str, **values) -> dict:
    fields = {"precision": "fp16", "status": "ok", "key": f"k-{name}", "run_id": "run-1",
              "artifact_uri": f"file:///dest/artifacts/{name}/fp16/k/model.pt",
              "artifact_sha256": "ab" * 32, "artifact_bytes": 1000, "sqnr_db": 41.5}
    return blank_row(name=name, **{**fields, **values})


def test_a_nan_result_is_a_failed_row_and_the_manifest_stays_strict_json(tmp_path):
    store, manifest = Store(str(tmp_path)), Manifest()
    row = manifest.record(ok_row("nan-fp16", sqnr_db=math.nan, speedup=math.inf))
    assert row["status"] == "failed" and row["error_type"] == "NonFiniteValue"
    assert "sqnr_db = nan" in row["error_message"] and "speedup = inf" in row["error_message"]
    assert row["sqnr_db"] is None and row["speedup"] is None
    assert row["artifact_uri"] is None                  # the artifact that measured NaN is not kept
    manifest.write(store)
    stored = strict_json((tmp_path / MANIFEST_JSON).read_text())["rows"]
    assert [(r["name"], r["status"], r["sqnr_db"]) for r in stored] == [("nan-fp16", "failed", None)]
    assert read_parquet_rows(store)[0]["sqnr_db"] is None


def test_a_nan_result_keeps_the_last_good_artifact(tmp_path):
    manifest = Manifest([ok_row("m")])
    row = manifest.record(dict(ok_row("m", sqnr_db=math.nan), run_id="run-2", key="k-new"))
    assert (row["status"], row["key"], row["error_type"]) == ("failed", "k-new", "NonFiniteValue")
    assert (row["artifact_uri"], row["sqnr_db"]) == (ok_row("m")["artifact_uri"], 41.5)
    assert "artifact fields are from run run-1" in row["notes"]


def test_a_stored_nan_loads_as_a_failed_row(tmp_path):
    store = Store(str(tmp_path))
    # what an older version wrote: Python's json emits a bare NaN
    (tmp_path / MANIFEST_JSON).write_text(json.dumps(
        {"schema_version": 1, "updated_at": "2026-01-01", "rows": [
            ok_row("good"), ok_row("bad", top1_agreement=math.nan)]}))
    manifest = Manifest.load(store)
    assert manifest.get("good", "fp16")["status"] == "ok"
    bad = manifest.get("bad", "fp16")
    assert bad["status"] == "failed" and "top1_agreement = nan" in bad["error_message"]
    manifest.write(store)
    assert len(strict_json((tmp_path / MANIFEST_JSON).read_text())["rows"]) == 2


def test_the_writer_refuses_a_non_finite_value_and_writes_nothing(tmp_path):
    store, manifest = Store(str(tmp_path)), Manifest([ok_row("m")])
    manifest.rows[("m", "fp16")]["latency_ms"] = -math.inf   # set behind record's back
    with pytest.raises(ManifestError, match=r"m \(fp16\): latency_ms; the manifest never"):
        manifest.write(store)
    assert not list(tmp_path.iterdir())


def test_cli_reports_a_refused_manifest_write_as_exit_1(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from jobs import driver
    from jobs.cli import main

    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models:\n  - {name: m, factory: 'pkg.mod:Net', checkpoint: m.pt, "
                   "precisions: [fp16]}\n")

    def refuse(spec, opts, **_):
        manifest = Manifest([ok_row("m")])
        manifest.rows[("m", "fp16")]["speedup"] = math.nan
        manifest.write(Store(str(tmp_path / "out")))

    monkeypatch.setattr(driver, "run", refuse)
    result = CliRunner().invoke(main, [str(zoo), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "manifest.json not written: non-finite numbers in m (fp16): speedup" in result.output
