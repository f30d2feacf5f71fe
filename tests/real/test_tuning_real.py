"""Accuracy-gated int8 on the pretrained models: MTCNN's nets meet 20 dB by keeping PReLUs float,
the speaker encoder gets a small dynamic-int8 artifact by keeping one LSTM weight float, and an
unreachable gate names the best model found."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.nn.functional as F

from quantizer import GateNotMetError, load_artifact, save_artifact, tuning
from tests.real import models as real

pytestmark = pytest.mark.real

GATE = tuning.Gate(min_sqnr_db=20.0)


def _pretrained(cls, name: str):
    model = cls()
    state = torch.load(real.asset(name), weights_only=True, map_location="cpu")
    if name == "speaker-encoder":   # nested under model_state, beside the loss's own weights
        state = {k: v for k, v in state["model_state"].items() if not k.startswith("similarity")}
    model.load_state_dict(state)
    return model.eval()


def _tune(model, data, rows, **kwargs):
    loader = [(data[i:i + 16], None) for i in range(0, rows, 16)]
    return tuning.tune_int8(model, loader, data[rows:], calibration_batches=len(loader), **kwargs)


@pytest.mark.parametrize("name, cls, size, plain_below, most_float",
                         [("mtcnn-pnet", real.PNet, 12, 12.0, 2),
                          ("mtcnn-rnet", real.RNet, 24, 3.0, 3),
                          ("mtcnn-onet", real.ONet, 48, 9.0, 3)])
def test_mtcnn_meets_20_db_by_keeping_prelus_float(name, cls, size, plain_below, most_float):
    model = _pretrained(cls, name)
    result = _tune(model, real.mtcnn_crops(128, size, seed=0), 64, gate=GATE)
    plain, chosen = result.trials[0], result.chosen
    assert plain.float_layers == () and plain.sqnr_db < plain_below      # the PReLU kernel
    assert chosen.sqnr_db >= 20.0 and chosen.recipe == "static"
    assert 1 <= len(chosen.float_layers) <= most_float
    assert all(layer.startswith("prelu") for layer in chosen.float_layers)
    assert chosen.quantized_fraction > 0.98
    ranked = [item.name for item in tuning.sensitivity.ranked(result.sensitivity["static"])]
    assert set(chosen.float_layers) <= set(ranked[:most_float + 1])


def test_rnet_fails_an_unreachable_gate_naming_its_best():
    model = _pretrained(real.RNet, "mtcnn-rnet")
    with pytest.raises(GateNotMetError, match=r"best static reached SQNR [2-9]\d\.\d dB with float "
                                              r"layers \[.*prelu4"):
        _tune(model, real.mtcnn_crops(128, 24, seed=0), 64, gate=tuning.Gate(min_sqnr_db=70.0))


def test_speaker_encoder_gets_a_dynamic_artifact_a_third_of_fp32(tmp_path):
    """64 synthetic utterances (voice_mels seed 1) hold out, 32 calibrate; 64 more (seed 2)
    check that the chosen fallback holds on utterances the search never saw."""
    model = _pretrained(real.VoiceEncoder, "speaker-encoder")
    mels = real.voice_mels(96, seed=1)
    result = _tune(model, mels, 32, gate=GATE, config=tuning.TuningConfig(recipe="auto"))
    assert result.chosen.recipe == "dynamic"
    assert result.chosen.float_layers == ("lstm.weight_ih_l0",)
    plain = [t for t in result.trials if t.recipe == "dynamic" and not t.float_layers][0]
    assert plain.sqnr_db < 5.0
    recipe = {"precision": "int8", "factory": "tests.real.models:VoiceEncoder",
              "input_shape": [real.VOICE_FRAMES, real.VOICE_MELS],
              "int8": result.model.int8_settings}
    save_artifact(result.model, tmp_path, recipe, mels[:2])
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)                  # the manifest's fp32 bytes
    ratio = os.path.getsize(tmp_path / "model.pt") / len(buffer.getvalue())
    assert ratio <= 0.35, ratio
    loaded = load_artifact(tmp_path)
    unseen = real.voice_mels(64, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(unseen), result.model(unseen))
        cosine = F.cosine_similarity(model(unseen), loaded(unseen))
    assert cosine.min() >= 0.99, cosine.min()
