"""Bad and hostile input through the real CLI: the named error, the batch goes on, nothing half-written.

One batch (``batch`` fixture) holds a good model beside every kind of bad checkpoint, calibration
table and model, a hostile pickle and a credential-bearing URI, run once on the session Ray; each
test then checks one row. Zoo-file errors and escaping names are refused before anything runs
(exit 2, DEST never created); an unreachable ``--address`` exits 4 quickly.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.feather as feather
import pytest
import torch
from click.testing import CliRunner

from jobs.cli import main
from jobs.driver import CONNECT_TIMEOUT_S
from tests.jobs import fault_models as fm
from tests.jobs.conftest import read_manifest

REPO = Path(__file__).resolve().parents[2]
SECRET_URI = "AKIAFAULTTEST:uri-secret-7f3a9"   # user-info of a checkpoint URI
SECRET_ENV = "env-secret-41c2e"                  # AWS_SECRET_ACCESS_KEY during the run
F = "tests.jobs.fault_models"

# name -> (factory, checkpoint, precisions, calibration data)
BATCH = {
    "good": ("TinyMLP", "ckpt/good.pt", "[fp16, int8]", "calib/good"),
    "ckpt-missing": ("TinyMLP", "ckpt/nope.pt", "[fp16]", "calib/good"),
    "ckpt-empty": ("TinyMLP", "ckpt/empty.pt", "[fp16]", "calib/good"),
    "ckpt-truncated": ("TinyMLP", "ckpt/truncated.pt", "[fp16]", "calib/good"),
    "ckpt-random": ("TinyMLP", "ckpt/random.pt", "[fp16]", "calib/good"),
    "ckpt-wrong-keys": ("TinyMLP", "ckpt/wrong-keys.pt", "[fp16]", "calib/good"),
    "ckpt-wrong-shapes": ("TinyMLP", "ckpt/wrong-shapes.pt", "[fp16]", "calib/good"),
    "ckpt-hostile": ("TinyMLP", "ckpt/hostile.pt", "[fp16]", "calib/good"),
    "ckpt-escapes-zoo": ("TinyMLP", "../outside/good.pt", "[fp16]", "calib/good"),
    "ckpt-credentials": ("TinyMLP", "{S3}", "[fp16]", "calib/good"),
    "factory-not-importable": ("no_such_package.models:Net", "ckpt/good.pt", "[fp16]",
                               "calib/good"),
    "calib-missing": ("TinyMLP", "ckpt/good.pt", "[int8]", "calib/nope"),
    "calib-empty": ("TinyMLP", "ckpt/good.pt", "[int8]", "calib/empty"),
    "calib-wrong-column": ("TinyMLP", "ckpt/good.pt", "[int8]", "calib/wrong-column"),
    "calib-wrong-shape": ("TinyMLP", "ckpt/good.pt", "[int8]", "calib/wrong-shape"),
    "calib-nan": ("TinyMLP", "ckpt/good.pt", "[int8]", "calib/nan"),
    "calib-inf": ("TinyMLP", "ckpt/good.pt", "[int8]", "calib/inf"),
    "model-untraceable": ("Untraceable", "ckpt/good.pt", "[fp16, int8]", "calib/good"),
    "model-lstm": ("SeqLSTM", "ckpt/lstm.pt", "[fp16, int8]", "calib/good"),
    "model-tuple": ("TupleOut", "ckpt/good.pt", "[fp16, int8]", "calib/good"),
    "model-dict": ("DictOut", "ckpt/good.pt", "[fp16, int8]", "calib/good"),
    "model-tuple-unnamed": ("TupleOut", "ckpt/good.pt", "[int8]", "calib/good"),
    "model-output-missing": ("TupleOut", "ckpt/good.pt", "[fp16]", "calib/good"),
}
# zoo keys beyond the columns above: the class-score output of multi-output models
EXTRA = {"model-tuple": "fidelity: {output: 0}",       # (logits, hidden)
         "model-dict": "fidelity: {output: 1}",        # {"hidden", "logits"}: keys sorted
         "model-output-missing": "fidelity: {output: 2}"}


def _entry(name: str, factory: str, ckpt: str, precisions: str, data: str) -> str:
    factory = factory if ":" in factory else f"{F}:{factory}"
    extra = f", {EXTRA[name]}" if name in EXTRA else ""
    return (f'  - {{name: {name}, factory: "{factory}", checkpoint: "{ckpt}", '
            f"precisions: {precisions}, calibration: {{data: {data}}}{extra}}}")


def _write_inputs(zoo: Path) -> None:
    ckpt = zoo / "ckpt"
    ckpt.mkdir(parents=True)
    fm.write_checkpoint(ckpt / "good.pt")
    (zoo.parent / "outside").mkdir()
    fm.write_checkpoint(zoo.parent / "outside" / "good.pt")
    fm.write_checkpoint(ckpt / "lstm.pt", fm.SeqLSTM())
    (ckpt / "empty.pt").write_bytes(b"")
    good = (ckpt / "good.pt").read_bytes()
    (ckpt / "truncated.pt").write_bytes(good[: len(good) // 2])
    (ckpt / "random.pt").write_bytes(np.random.RandomState(0).bytes(4096))
    state = torch.load(ckpt / "good.pt", weights_only=True)
    torch.save({k.replace("fc1", "encoder"): v for k, v in state.items()}, ckpt / "wrong-keys.pt")
    fm.write_checkpoint(ckpt / "wrong-shapes.pt", fm.TinyMLP(width=8))
    fm.hostile_checkpoint(str(ckpt / "hostile.pt"), str(zoo / "PWNED"))
    calib = zoo / "calib"
    fm.write_calib(calib / "good")
    fm.write_calib(calib / "wrong-shape", features=10)
    fm.write_calib(calib / "nan", fill=float("nan"))
    fm.write_calib(calib / "inf", fill=float("inf"))
    shard = next((calib / "good").iterdir())
    table = feather.read_table(shard)
    (calib / "empty").mkdir()
    feather.write_feather(table.slice(0, 0), calib / "empty" / "part-00000.arrow")
    (calib / "wrong-column").mkdir()
    feather.write_feather(table.rename_columns(["pixels"] + table.column_names[1:]),
                          calib / "wrong-column" / "part-00000.arrow")


def _cli(*args, env: dict | None = None):
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--json"], env=env)
    try:
        summary = json.loads(result.stdout)
    except json.JSONDecodeError:
        summary = None
    return result, summary


@pytest.fixture(scope="module")
def batch(ray_local, tmp_path_factory):
    """The whole bad batch, converted once; returns (zoo dir, DEST, CLI result, rows by key)."""
    zoo = tmp_path_factory.mktemp("bad") / "zoo"
    _write_inputs(zoo)
    lines = ["defaults:", "  calibration: {batches: 2, batch_size: 16}", "models:"]
    lines += [_entry(n, *v) for n, v in BATCH.items()]
    (zoo / "zoo.yaml").write_text("\n".join(lines) + "\n")
    out = zoo.parent / "out"
    with _s3_with(zoo / "ckpt" / "good.pt") as uri:
        text = (zoo / "zoo.yaml").read_text().replace("{S3}", uri)
        (zoo / "zoo.yaml").write_text(text)
        t0 = time.monotonic()
        result, summary = _cli(zoo / "zoo.yaml", "--out", out,
                               env={"AWS_SECRET_ACCESS_KEY": SECRET_ENV})
        elapsed = time.monotonic() - t0
    rows = {(r["name"], r["precision"]): r for r in read_manifest(out)["rows"]}
    return zoo, out, result, summary, rows, elapsed


@contextlib.contextmanager
def _s3_with(path: Path):
    """A local S3 (moto) holding ``path`` as bucket/m.pt; yields a URI with credentials in it."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        fs = pafs.S3FileSystem(access_key="setup", secret_key="setup", scheme="http",
                               endpoint_override=f"{host}:{port}", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("bucket")
        with fs.open_output_stream("bucket/m.pt") as f:
            f.write(path.read_bytes())
        yield (f"s3://{SECRET_URI}@bucket/m.pt?endpoint_override={host}:{port}&scheme=http"
               f"&region=us-east-1")
    finally:
        server.stop()


def _failed(rows, name, precision, error_type, *words):
    row = rows[(name, precision)]
    assert row["status"] == "failed", row
    assert row["error_type"] == error_type, (row["error_type"], row["error_message"])
    for word in words:
        assert word in row["error_message"], (word, row["error_message"])
    assert row["artifact_uri"] is None
    return row


def test_batch_goes_on_and_exits_1(batch):
    zoo, out, result, summary, rows, _ = batch
    assert result.exit_code == 1, result.output
    assert len(rows) == sum(v[2].count(",") + 1 for v in BATCH.values())
    for precision in ("fp16", "int8"):
        good = rows[("good", precision)]
        assert good["status"] == "ok", good
        assert good["quantized_fraction"] >= 0.9      # biases of int8 layers stay float
        assert good["sqnr_db"] > 20


def test_nothing_half_written(batch):
    zoo, out, *_ , rows, _ = batch
    assert not list(out.rglob(".tmp-*")) and not list(out.rglob("*.tmp"))
    published = {(p.parts[-2], p.parts[-1]) for p in (out / "artifacts").glob("*/*")}
    ok = {k for k, r in rows.items() if r["status"] == "ok"}
    assert published == ok
    for key in ok:   # every published folder is whole: each listed file present
        folder = Path(rows[key]["artifact_uri"].removeprefix("file://")).parent
        assert sorted(os.listdir(folder)) == sorted(f["path"] for f in rows[key]["files"])
    assert CliRunner().invoke(main, [str(zoo / "zoo.yaml"), "--out", str(out), "--verify"]).exit_code == 0


@pytest.mark.parametrize("name, error_type, words", [
    ("ckpt-missing", "CheckpointError", ["nope.pt", "not found"]),
    ("ckpt-empty", "CheckpointError", ["empty.pt", "empty (0 bytes)"]),
    ("ckpt-truncated", "CheckpointError", ["truncated.pt", "truncated or corrupt"]),
    ("ckpt-random", "CheckpointError", ["random.pt", "truncated or corrupt"]),
    ("ckpt-wrong-keys", "CheckpointKeysError", ["missing keys: fc1.weight", "unexpected keys: encoder"]),
    ("ckpt-wrong-shapes", "CheckpointKeysError", ["shape mismatches", "fc1.weight"]),
    ("factory-not-importable", "FactoryError", ["no_such_package"]),
])
def test_bad_checkpoint_or_factory_is_a_named_failed_row(batch, name, error_type, words):
    _failed(batch[4], name, "fp16", error_type, *words)


@pytest.mark.parametrize("name, error_type, words", [
    ("calib-missing", "CalibrationError", ["nope"]),
    ("calib-empty", "CalibrationError", []),
    ("calib-wrong-column", "CalibrationError", ["input"]),
    ("calib-wrong-shape", "InputShapeError", []),
    ("calib-nan", "CalibrationError", ["NaN"]),
    ("calib-inf", "CalibrationError", ["Inf"]),
])
def test_bad_calibration_is_a_named_failed_row(batch, name, error_type, words):
    _failed(batch[4], name, "int8", error_type, *words)


def test_unsupported_models_fail_int8_and_keep_fp16(batch):
    rows = batch[4]
    _failed(rows, "model-untraceable", "int8", "TraceError", "Untraceable")
    _failed(rows, "model-lstm", "int8", "NotQuantizedError", "LSTM")
    for name in ("model-untraceable", "model-lstm"):
        assert rows[(name, "fp16")]["status"] == "ok"


@pytest.mark.parametrize("name, logits", [("model-tuple", 0), ("model-dict", 1)])
def test_tuple_and_dict_outputs_convert(batch, name, logits):
    for precision in ("fp16", "int8"):
        row = batch[4][(name, precision)]
        assert row["status"] == "ok", row["error_message"]
        assert row["sqnr_db"] > 15 and row["top1_agreement"] >= 0.9
        assert row["top1_output"] == logits              # fidelity: {output: N}
        assert len(row["sqnr_db_outputs"]) == 2 and min(row["sqnr_db_outputs"]) > 15


def test_without_a_class_score_output_top1_is_null_and_the_note_says_why(batch):
    row = batch[4][("model-tuple-unnamed", "int8")]
    assert row["status"] == "ok", row["error_message"]
    assert row["top1_agreement"] is None and row["top1_output"] is None
    assert "top-1 agreement not measured" in row["notes"] and "fidelity: {output: N}" in row["notes"]
    assert len(row["sqnr_db_outputs"]) == 2 and row["sqnr_db"] > 15


def test_a_fidelity_output_the_model_lacks_is_a_named_config_error(batch):
    _failed(batch[4], "model-output-missing", "fp16", "ConfigError", "fidelity.output",
            "model-output-missing", "2")


def test_hostile_pickle_is_refused_and_never_runs(batch):
    zoo, rows = batch[0], batch[4]
    _failed(rows, "ckpt-hostile", "fp16", "UnsafePickleError", "posix.system", "--allow-unsafe-pickle")
    assert not (zoo / "PWNED").exists()


def test_hostile_pickle_opt_in_needs_the_flag(tmp_path):
    zoo = tmp_path / "zoo.yaml"
    fm.hostile_checkpoint(str(tmp_path / "h.pt"), str(tmp_path / "PWNED"))
    zoo.write_text(f'models:\n  - {{name: h, factory: "{F}:TinyMLP", checkpoint: h.pt, '
                   f"allow_pickle: true, precisions: [fp16]}}\n")
    result, _ = _cli(zoo, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--allow-unsafe-pickle" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "PWNED").exists()


def test_checkpoint_outside_the_zoo_lands_under_its_name(batch):
    out, rows = batch[1], batch[4]
    row = rows[("ckpt-escapes-zoo", "fp16")]
    assert row["status"] == "ok"
    path = Path(row["artifact_uri"].removeprefix("file://")).resolve()
    assert path.is_relative_to((out / "artifacts" / "ckpt-escapes-zoo" / "fp16").resolve())
    assert not (out.parent / "outside" / "artifacts").exists()


def test_credentials_never_recorded(batch):
    zoo, out, result, _, rows, _ = batch
    assert rows[("ckpt-credentials", "fp16")]["status"] == "ok"
    secrets = ("uri-secret-7f3a9", "AKIAFAULTTEST", SECRET_ENV)
    texts = {"stdout": result.stdout, "stderr": result.stderr}
    for path in out.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("latin-1")
    session = _ray_session_logs()
    for path in session.rglob("*") if session else ():
        if path.is_file() and path.stat().st_size < 50 << 20:
            texts[str(path)] = path.read_bytes().decode("latin-1")
    assert len(texts) > 5
    leaks = [(where, s) for where, text in texts.items() for s in secrets if s in text]
    assert not leaks
    assert rows[("ckpt-credentials", "fp16")]["source_uri"].startswith("s3://bucket/m.pt")


def _ray_session_logs() -> Path | None:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return Path(node.get_session_dir_path()) / "logs" if node else None


ZOO_ERRORS = {
    "not-yaml": ("models: [unclosed\n  - {name: a", "not valid YAML"),
    "unknown-key": ('models:\n  - {name: a, factory: "m:f", checkpoint: a.pt, precison: [fp16]}\n',
                    "key 'precison': unknown key; did you mean 'precisions'?"),
    "duplicate-name": ('models:\n  - {name: a, factory: "m:f", checkpoint: a.pt}\n'
                       '  - {name: a, factory: "m:f", checkpoint: b.pt}\n', "duplicate"),
    "missing-factory": ("models:\n  - {name: a, checkpoint: a.pt}\n", "key 'factory': missing"),
    "bad-precision": ('models:\n  - {name: a, factory: "m:f", checkpoint: a.pt, precisions: [int4]}\n',
                      "'int4' is not a precision"),
    "bad-backend": ('models:\n  - {name: a, factory: "m:f", checkpoint: a.pt, backend: tpu}\n',
                    "'tpu' is not a backend"),
    "name-dotdot": ('models:\n  - {name: "../evil", factory: "m:f", checkpoint: a.pt}\n',
                    "key 'name'"),
    "name-absolute": ('models:\n  - {name: "/tmp/evil", factory: "m:f", checkpoint: a.pt}\n',
                      "key 'name'"),
    "name-is-dotdot": ('models:\n  - {name: "..", factory: "m:f", checkpoint: a.pt}\n', "key 'name'"),
    "name-dot-tmp": ('models:\n  - {name: ".tmp-x", factory: "m:f", checkpoint: a.pt}\n',
                     "key 'name': '.tmp-x' is not a valid name"),
}


@pytest.mark.parametrize("case", sorted(ZOO_ERRORS))
def test_bad_zoo_exits_2_and_writes_nothing(tmp_path, case):
    text, words = ZOO_ERRORS[case]
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(text)
    result, _ = _cli(zoo, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert str(zoo) in result.output and words in result.output, result.output
    assert sorted(os.listdir(tmp_path)) == ["zoo.yaml"]


# Loopback only: tests send nothing past this machine (nothing listens on port 1).
@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_unreachable_address_exits_4_quickly(tmp_path, address):
    fm.write_checkpoint(tmp_path / "m.pt")
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(f'models:\n  - {{name: m, factory: "{F}:TinyMLP", checkpoint: m.pt, '
                   f"precisions: [fp16]}}\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", str(zoo), "--out", str(tmp_path / "out"),
                           "--address", address], cwd=REPO, capture_output=True, text=True,
                          timeout=CONNECT_TIMEOUT_S + 60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 4, proc.stderr
    assert f"cannot reach the Ray cluster at {address}" in proc.stderr
    # the probe's own bound, plus interpreter and import start-up on a busy 2-core machine
    assert elapsed < CONNECT_TIMEOUT_S + 20
    assert not (tmp_path / "out" / ".lock").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_checkpoint_uri_pyarrow_rejects_is_a_row(ray_local, tmp_path):
    fm.write_checkpoint(tmp_path / "m.pt")
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(f'models:\n  - {{name: m, factory: "{F}:TinyMLP", checkpoint: m.pt, '
                   f'precisions: [fp16]}}\n  - {{name: bad-uri, factory: "{F}:TinyMLP", '
                   f'checkpoint: "s3://b/m.pt?no_such_option=1", precisions: [fp16]}}\n')
    result, summary = _cli(zoo, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert {(r["name"], r["status"]) for r in summary["rows"]} == {("m", "ok"), ("bad-uri", "failed")}
