"""A torchvision-style zoo: every listed architecture converts to fp16 and int8 from a
``torch.save(model.state_dict())`` checkpoint, and every artifact reloads bit-exactly."""

from __future__ import annotations

import math

import pytest
import torch

from quantizer.artifacts import load_artifact, save_artifact
from quantizer.checkpoints import import_factory, load_model
from quantizer.fidelity import sqnr_db
from quantizer.fp16 import to_fp16
from quantizer.int8 import to_int8
from tests.quantizer.archs import ARCHS, calibrated

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

# random-init nets on random images: fp16 tracks fp32 closely, int8 less so (measured 41-56 dB
# and 12-20 dB); the floors catch a broken conversion, not a tuned one
FP16_FLOOR_DB, INT8_FLOOR_DB = 35.0, 10.0


@pytest.fixture(scope="module", params=sorted(ARCHS))
def source(request, tmp_path_factory):
    factory, kwargs = ARCHS[request.param]
    torch.manual_seed(0)
    model = calibrated(import_factory(factory)(**kwargs))
    path = tmp_path_factory.mktemp(request.param) / "ckpt.pt"
    torch.save(model.state_dict(), path)            # as torchvision's users save them
    images = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return request.param, factory, kwargs, str(path), images


def _recipe(precision: str, factory: str, kwargs: dict) -> dict:
    return {"precision": precision, "factory": factory, "kwargs": kwargs,
            "input_shape": [3, 32, 32], "input_dtype": "float16" if precision == "fp16" else "float32"}


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_architecture_converts_and_reloads_exactly(source, precision, tmp_path):
    name, factory, kwargs, path, images = source
    model = load_model(factory, path, kwargs=kwargs)
    calib, held_out = images[:32], images[32:]
    if precision == "fp16":        # CPU fp16 convolutions are slow: fewer rows
        held_out = held_out[:4]
        converted, x, floor = to_fp16(model), held_out.half(), FP16_FLOOR_DB
    else:
        converted = to_int8(model, [(calib[i:i + 8], None) for i in range(0, 32, 8)],
                            calibration_batches=4)
        x, floor = held_out, INT8_FLOOR_DB
    with torch.no_grad():
        assert sqnr_db(model(held_out), converted(x)) >= floor, name
    files = save_artifact(converted, tmp_path / "art", _recipe(precision, factory, kwargs), x[:1])
    assert "model.torchscript.pt" in [f["path"] for f in files]
    loaded = load_artifact(tmp_path / "art", factory=factory, kwargs=kwargs)
    assert loaded.fingerprint_sqnr_db == [math.inf]
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))
