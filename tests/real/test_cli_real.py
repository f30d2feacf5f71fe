"""``quantize-all`` itself over the six pretrained models and two digit classifiers
(``tests.real.cli_zoo``), joined to the session's Ray: every int8 row gated at 20 dB, the figures
read back from the manifest and re-measured on the artifacts with ``load_artifact``.

The library-level tests (test_tuning_real, test_crepe, test_speaker_encoder, test_mtcnn) show what
each conversion can reach; these show that the command line gets the same from a zoo file (the
layout keys, ``forward_kwargs``, ``fidelity.output``, ``recipe: auto``), records it, and that what
it records is what its artifacts do.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import torch
import torch.nn.functional as F

from quantizer import load_artifact, load_model
from quantizer.fidelity import sqnr_db
from tests.real import cli_zoo
from tests.real import models as real
from tests.real.conftest import report

pytestmark = [pytest.mark.real,
              pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = ("prelu-cnn", "lstm-2layer")    # static with fallback, dynamic: the rest are library tests
BUDGET_S = 60.0
PRECISIONS = {**{name: {"fp16", "int8"} for name in cli_zoo.PRETRAINED},
              **{name: {"int8"} for name in ARCHS}}


def _cli(ray_local, *args) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *map(str, args), "--json",
         "--address", ray_local.get_runtime_context().gcs_address],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    return proc.returncode, json.loads(proc.stdout or "{}"), proc.stderr


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-real")
    zoo = cli_zoo.write_zoo(folder, archs=ARCHS, budget_s=BUDGET_S)
    out = folder / "out"
    code, summary, err = _cli(ray_local, zoo, "--out", out)
    assert (out / "manifest.json").is_file(), f"exit {code}: {err[-4000:]}"
    doc = json.loads((out / "manifest.json").read_text())
    rows = {(r["name"], r["precision"]): r for r in doc["rows"]}
    return zoo, out, code, summary, err, rows


def _fp32(name: str, x: torch.Tensor) -> torch.Tensor:
    """The fp32 model's outputs on ``x``, its checkpoint loaded with the zoo's layout keys.

    On torch's own LSTM kernel: oneDNN's compiles for seconds on its first calls (see
    test_speaker_encoder). Only the reference: an artifact runs on the kernels its fingerprint
    was taken with (the worker's defaults): the speaker encoder's dynamic-int8 artifact, loaded
    with oneDNN off, missed its 40 dB fingerprint check (36.3 dB measured).
    """
    factory, kwargs, _, extra = cli_zoo.PRETRAINED[name]
    layout = {k: extra[k] for k in ("checkpoint_key", "ignore_keys") if k in extra}
    model = load_model(f"tests.real.models:{factory}", real.asset(name), kwargs=kwargs, **layout)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        return model(x)


def _artifact(row: dict):
    factory, kwargs, _, _ = cli_zoo.PRETRAINED[row["name"]]
    return load_artifact(urlsplit(row["artifact_uri"]).path,
                         factory=f"tests.real.models:{factory}", kwargs=kwargs)


def _held_out(name: str) -> torch.Tensor:
    """The shard's rows after the calibration rows: what the worker measured fidelity on."""
    _, _, (batches, size), _ = cli_zoo.PRETRAINED[name]
    rows = batches * size
    return cli_zoo.pretrained_inputs(name, rows + cli_zoo.HELD_OUT, seed=1)[rows:]


def test_every_row_is_converted_and_every_int8_row_meets_20_db_or_fails_named(run):
    _, _, code, summary, err, rows = run
    assert {(n, p) for n, ps in PRECISIONS.items() for p in ps} == set(rows), err
    failed = {k: r for k, r in rows.items() if r["status"] != "ok"}
    assert code == (1 if failed else 0) and summary["counts"]["failed"] == len(failed), err
    for (name, precision), row in rows.items():
        if row["status"] == "ok" and precision == "int8":
            assert row["sqnr_db"] >= cli_zoo.MIN_SQNR_DB, row
            assert row["recipe"] in ("static", "dynamic") and row["tuning_s"] >= 0
            assert row["tuning_trials"] >= 1 and row["recipe_reason"]
        elif row["status"] != "ok":   # only a gate may fail a row here, and it names its best
            assert row["error_type"] == "GateNotMetError" and "best" in row["error_message"], row
    for name in cli_zoo.PRETRAINED:
        assert rows[(name, "fp16")]["status"] == "ok" and rows[(name, "fp16")]["recipe"] == "fp16"
    report("quantize-all over the real zoo: " + ", ".join(
        f"{n} {p} {r['status']} {r['sqnr_db']:.1f} dB" for (n, p), r in sorted(rows.items())))


def test_weak_outputs_are_flagged_where_the_pooled_gate_passes(run):
    """The gate pools every output (MTCNN: box offsets beside probabilities); an output alone
    below the threshold is named in notes, so a pooled pass never hides it."""
    rows, flagged = run[-1], []
    for (name, precision), row in rows.items():
        if row["status"] != "ok":
            continue
        outputs, notes = row["sqnr_db_outputs"], row["notes"] or ""
        worst = min(range(len(outputs)), key=outputs.__getitem__)
        floor = {"int8": cli_zoo.MIN_SQNR_DB, "fp16": 40.0}[precision]
        if len(outputs) > 1 and outputs[worst] < floor:
            assert (f"LOW FIDELITY: output {worst} {outputs[worst]:.1f} dB < {floor:g} dB "
                    f"({precision})") in notes, row
            flagged.append(name)
        else:
            assert "LOW FIDELITY" not in notes, row
    assert "mtcnn-rnet" in flagged      # box offsets ~10 dB beside face probabilities ~30 dB
    assert rows[("mtcnn-rnet", "int8")]["top1_output"] == 1        # fidelity: {output: 1}
    assert rows[("mtcnn-pnet", "int8")]["top1_output"] is None     # no class-score output
    assert rows[("mtcnn-pnet", "int8")]["top1_agreement"] is None


def test_rnet_meets_20_db_by_keeping_layers_float(run):
    row = run[-1][("mtcnn-rnet", "int8")]
    assert row["status"] == "ok" and row["recipe"] == "static"
    assert row["float_layers"] and all(n.startswith("prelu") for n in row["float_layers"])
    assert "kept float" in row["recipe_reason"] and row["tuning_trials"] >= 2
    assert 0.98 < row["quantized_fraction"] < 1.0
    loaded = _artifact(row)
    assert loaded.int8_settings["float_layers"] == row["float_layers"]
    x = _held_out("mtcnn-rnet")
    with torch.no_grad():
        measured = sqnr_db(_fp32("mtcnn-rnet", x), loaded(x))
    report(f"CLI mtcnn-rnet int8: float layers {row['float_layers']}, manifest "
           f"{row['sqnr_db']:.2f} dB, artifact re-measured {measured:.2f} dB")
    assert measured == pytest.approx(row["sqnr_db"], abs=0.01) and measured >= 20.0


def test_speaker_encoder_auto_picks_a_small_dynamic_artifact(run):
    row = run[-1][("speaker-encoder", "int8")]
    assert row["status"] == "ok" and row["recipe"] == "dynamic", row
    assert row["recipe_reason"].startswith("auto chose dynamic")
    assert row["size_ratio"] <= 0.35
    assert row["size_ratio"] == pytest.approx(row["artifact_bytes"] / row["fp32_bytes"], abs=1e-4)
    loaded = _artifact(row)
    assert loaded.int8_settings["recipe"] == "dynamic"
    x = torch.cat([_held_out("speaker-encoder"), real.voice_mels(32, seed=2)])  # one shape:
    with torch.no_grad():                            # oneDNN compiles its LSTM kernel once
        both = F.cosine_similarity(_fp32("speaker-encoder", x), loaded(x))
    cosines = both[:cli_zoo.HELD_OUT], both[cli_zoo.HELD_OUT:]
    report(f"CLI speaker-encoder int8 (auto -> dynamic, float {row['float_layers']}): size ratio "
           f"{row['size_ratio']:.3f}, cosine min {float(cosines[0].min()):.4f} held-out / "
           f"{float(cosines[1].min()):.4f} unseen")
    assert float(cosines[0].min()) >= 0.99 and float(cosines[1].min()) >= 0.99


def test_speaker_encoder_fp16_keeps_every_embedding(run):
    row = run[-1][("speaker-encoder", "fp16")]
    loaded, x = _artifact(row), _held_out("speaker-encoder")[:16]
    with torch.no_grad():
        cosines = F.cosine_similarity(_fp32("speaker-encoder", x), loaded(x.half()).float())
    report(f"CLI speaker-encoder fp16: cosine min {float(cosines.min()):.5f} on {len(x)} rows")
    assert float(cosines.min()) >= 0.999


@pytest.mark.parametrize("size", ["full", "tiny"])
def test_crepe_fp16_pitch_accuracy_within_half_a_point(run, size):
    """16 frames of known f0 (within 0.5 pt: no frame may change its verdict); channels_last, as
    the worker measures fp16 on a CPU, keeps CREPE-full's fp16 convolutions to seconds."""
    row = run[-1][(f"crepe-{size}", "fp16")]
    recipe = json.loads(_read(row, "recipe.json"))
    if size == "full":        # conv2_BN.running_var (4.97e5) would overflow fp16: folded instead
        assert [a["module"] for a in recipe["fp16_adjustments"]] == ["conv2_BN"]
    loaded, (frames, f0) = _artifact(row), real.crepe_frames(16, seed=5)
    reference = _fp32(f"crepe-{size}", frames)
    with torch.no_grad():
        got = loaded.to(memory_format=torch.channels_last)(frames.half()).float()
    accuracy = [float((real.cents_error(real.crepe_pitch_hz(p), f0) <= 50).float().mean())
                for p in (reference, got)]
    report(f"CLI crepe-{size} fp16: raw pitch accuracy {accuracy[1]:.3f} vs fp32 "
           f"{accuracy[0]:.3f} on {len(f0)} frames")
    assert accuracy[0] >= 0.95 and abs(accuracy[1] - accuracy[0]) <= 0.005


def _read(row: dict, name: str) -> bytes:
    entry = next(f for f in row["files"] if f["path"] == name)
    data = open(os.path.join(os.path.dirname(urlsplit(row["artifact_uri"]).path), name),
                "rb").read()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    return data


def test_tuned_rows_list_a_readable_sensitivity_file(run):
    tuned = {k: r for k, r in run[-1].items() if r["status"] == "ok" and r["float_layers"]}
    assert {"mtcnn-rnet", "speaker-encoder", "prelu-cnn"} <= {name for name, _ in tuned}
    for (name, _), row in tuned.items():
        sensitivity = json.loads(_read(row, "sensitivity.json"))
        layers = sensitivity[row["recipe"]]
        assert {layer["name"] for layer in layers} >= set(row["float_layers"]), name
        worst = min(layers, key=lambda layer: layer["sqnr_db"])
        assert row["sensitivity_top"][0] == {"name": worst["name"], "sqnr_db": worst["sqnr_db"]}
        assert worst["name"] in row["float_layers"], (name, worst)


def test_prelu_cnn_meets_its_top1_gate_too(run):
    row = run[-1][("prelu-cnn", "int8")]
    assert row["status"] == "ok" and row["top1_drop"] is not None
    assert row["top1_drop"] <= cli_zoo.TOP1_GATED["prelu-cnn"]
    assert "max_top1_drop 0.05" in row["recipe_reason"]


def test_verify_passes_on_the_output(ray_local, run):
    zoo, out = run[0], run[1]
    code, summary, err = _cli(ray_local, zoo, "--out", out, "--verify")
    assert code == 0 and summary["problems"] == 0, err
    assert len(summary["verify"]) == sum(len(p) for p in PRECISIONS.values())
