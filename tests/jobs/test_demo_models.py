"""Tests of the bundled demo zoo: the models' shapes and traceability, and a real build."""

from __future__ import annotations

import contextlib
import importlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
import torch.fx
import yaml

from jobs.demo import models
from jobs.demo.__main__ import main
from jobs.demo.build import digits_split, logits_of, model_input

IMAGE_MODELS = [models.ResidualCNN, models.DepthwiseCNN, models.GatedCNN, models.LSTMClassifier,
                models.TupleOutputCNN]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One demo build, through the command line, over a folder holding a stale shard."""
    dest = tmp_path_factory.mktemp("demo")
    (dest / "calib" / "images").mkdir(parents=True)
    (dest / "calib" / "images" / "part-00099.arrow").write_bytes(b"stale shard of an old build")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["build", str(dest), "--quiet"]) == 0
    assert out.getvalue().strip() == str(dest / "zoo.yaml")
    return dest


@pytest.mark.parametrize("cls", IMAGE_MODELS, ids=lambda c: c.__name__)
def test_image_models_map_digit_images_to_ten_logits(cls):
    torch.manual_seed(0)
    model = cls(num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.rand(5, 1, 8, 8))
    logits = logits_of(out)
    assert logits.shape == (5, 10) and logits.dtype == torch.float32
    assert bool(torch.isfinite(logits).all())
    if cls is models.TupleOutputCNN:
        assert isinstance(out, tuple) and out[1].shape == (5, 16)


def test_mlp_takes_flat_rows():
    model = models.DigitsMLP(num_classes=10, hidden=32).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 64)).shape == (3, 10)
    with pytest.raises(RuntimeError):
        model(torch.rand(3, 1, 8, 8))


def test_gated_cnn_cannot_be_traced_by_fx_but_the_others_can():
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(models.GatedCNN())
    for cls in (models.ResidualCNN, models.DepthwiseCNN, models.DigitsMLP, models.LSTMClassifier,
                models.TupleOutputCNN):
        assert isinstance(torch.fx.symbolic_trace(cls()), torch.fx.GraphModule)


def test_gated_cnn_branch_follows_the_data():
    model = models.GatedCNN(threshold=0.3).eval()
    taken = []
    model.bright.register_forward_hook(lambda *_: taken.append("bright"))
    model.dark.register_forward_hook(lambda *_: taken.append("dark"))
    with torch.no_grad():
        model(torch.full((2, 1, 8, 8), 0.9))
        model(torch.full((2, 1, 8, 8), 0.1))
    assert taken == ["bright", "dark"]


def test_zoo_yaml_follows_the_spec_and_offers_gated_cnn_fp16_only(built):
    text = (built / "zoo.yaml").read_text()
    zoo = yaml.safe_load(text)
    assert zoo["defaults"] == {"precisions": ["fp16", "int8"], "backend": "fbgemm",
                               "calibration": {"data": "calib/images/", "batches": 10, "batch_size": 16},
                               "min_sqnr_db": 15}
    by_name = {m["name"]: m for m in zoo["models"]}
    assert set(by_name) == set(models.DEMO_MODELS)
    assert by_name["gated-cnn"]["precisions"] == ["fp16"]
    assert by_name["digits-mlp"]["calibration"] == {"data": "calib/flat/"}
    assert "torch.fx cannot" in text and "int8" in text.split("gated-cnn")[0].rsplit("\n\n", 1)[1]
    for spec in zoo["models"]:
        assert spec["factory"].startswith("jobs.demo.models:")
        assert (built / spec["checkpoint"]).is_file()


def test_tests_zoo_adds_models_whose_int8_rows_fail(built):
    zoo = yaml.safe_load((built / "zoo-tests.yaml").read_text())
    by_name = {m["name"]: m for m in zoo["models"]}
    assert set(by_name) == set(models.DEMO_MODELS) | set(models.TEST_MODELS)
    assert by_name["gated-cnn"]["precisions"] == ["fp16", "int8"]
    assert "precisions" not in by_name["lstm-classifier"]     # the defaults: fp16 and int8


def _load(built, spec: dict) -> torch.nn.Module:
    module, _, attr = spec["factory"].partition(":")
    model = getattr(importlib.import_module(module), attr)(**spec.get("kwargs", {}))
    state = torch.load(built / spec["checkpoint"], weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def test_checkpoints_load_safely_and_score_at_least_90_percent_on_held_out_digits(built):
    split = digits_split(0)
    assert len(split.train_y) == 1500 and len(split.held_y) == 297
    images, labels = torch.from_numpy(split.held_x), torch.from_numpy(split.held_y)
    for spec in yaml.safe_load((built / "zoo-tests.yaml").read_text())["models"]:
        model = _load(built, spec)
        with torch.no_grad():
            logits = logits_of(model(model_input(spec["name"], images)))
        accuracy = float((logits.argmax(1) == labels).float().mean())
        assert accuracy >= 0.90, f"{spec['name']}: {accuracy:.3f}"


@pytest.mark.parametrize("folder,shape", [("images", [1, 8, 8]), ("flat", [64])])
def test_calibration_shards_hold_the_held_out_digits(built, folder, shape):
    shards = sorted((built / "calib" / folder).iterdir())
    assert [p.name for p in shards] == ["part-00000.arrow", "part-00001.arrow", "part-00002.arrow"]
    tables = [ipc.open_file(pa.memory_map(str(p))).read_all() for p in shards]
    assert [t.num_rows for t in tables] == [128, 128, 41]
    column = pa.concat_tables(tables).column("input").combine_chunks()
    assert isinstance(column.type, pa.FixedShapeTensorType) and list(column.type.shape) == shape
    split = digits_split(0)
    inputs = column.to_numpy_ndarray()
    np.testing.assert_array_equal(inputs.reshape(len(inputs), -1), split.held_x.reshape(297, -1))
    targets = pa.concat_tables(tables).column("target").to_numpy()
    np.testing.assert_array_equal(targets, split.held_y)
    assert 0.0 <= inputs.min() and inputs.max() <= 1.0
