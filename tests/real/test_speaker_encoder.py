"""Resemblyzer 0.1.4's speaker encoder: its packaged checkpoint nests the weights under
``model_state`` beside training state and loss parameters, and holds CUDA storages; fp16 is
measured on the cosine similarity of embeddings of synthetic voices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantizer.checkpoints import load_model
from quantizer.errors import CheckpointError, CheckpointKeysError
from quantizer.fp16 import to_fp16
from quantizer.int8 import quantized_fraction, to_int8
from tests.real.conftest import report, round_trip, same_outputs
from tests.real.models import VOICE_FRAMES, VOICE_MELS, asset, voice_mels

pytestmark = [pytest.mark.real,   # oneDNN's flags() notes TF32 for Intel GPUs, irrelevant here
              pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")]
FACTORY = "tests.real.models:VoiceEncoder"
LAYOUT = {"checkpoint_key": "model_state", "ignore_keys": ["similarity_*"]}
UTTERANCES = 8
MIN_QUANTIZED_FRACTION = 0.5       # the zoo's default min_quantized_fraction gate


@pytest.fixture(scope="module")
def encoder():
    return load_model(FACTORY, asset("speaker-encoder"), **LAYOUT)


@pytest.fixture(autouse=True)
def _native_lstm():
    """oneDNN's LSTM spends its first few calls in a process compiling kernels (measured 15, 12
    and 2 s on a loaded 2-core machine, then 0.1 s); torch's own kernel needs none of that. Both
    the reference and the converted models run on the same kernel, so the comparison is fair."""
    with torch.backends.mkldnn.flags(enabled=False):
        yield


def test_the_packaged_checkpoint_needs_and_takes_the_layout_settings():
    raw = open(asset("speaker-encoder"), "rb").read()
    assert b"cuda" in raw            # saved from GPU tensors: loads on this CPU-only machine too
    with pytest.raises(CheckpointError, match=r"'step', 'model_state', 'optimizer_state'.*"
                                              r"`checkpoint_key: model_state`"):
        load_model(FACTORY, asset("speaker-encoder"))
    with pytest.raises(CheckpointKeysError, match=r"`ignore_keys: \[similarity_\*\]`"):
        load_model(FACTORY, asset("speaker-encoder"), checkpoint_key="model_state")


def test_fp16_embeddings_keep_their_direction(encoder, tmp_path):
    mels = voice_mels(UTTERANCES, seed=3)
    loaded = round_trip(to_fp16(encoder), tmp_path / "art", "fp16", FACTORY,
                        [VOICE_FRAMES, VOICE_MELS], example=mels[:1].half())
    with torch.no_grad():
        cosines = F.cosine_similarity(encoder(mels), loaded(mels.half()).float())
    report(f"speaker encoder fp16: embedding cosine min {float(cosines.min()):.5f} over "
           f"{UTTERANCES} utterances")
    assert float(cosines.min()) >= 0.999


def test_static_int8_leaves_the_lstm_in_float_and_says_so(encoder, tmp_path):
    mels = voice_mels(UTTERANCES, seed=4)
    converted = to_int8(encoder, [(mels[:4], None)], calibration_batches=1)
    fraction = quantized_fraction(converted, encoder)
    assert any(isinstance(m, torch.nn.LSTM) for m in converted.modules())
    loaded = round_trip(converted, tmp_path / "art", "int8", FACTORY, [VOICE_FRAMES, VOICE_MELS])
    with torch.no_grad():
        assert same_outputs(loaded(mels), converted(mels))
    report(f"speaker encoder int8 (static): quantized fraction {fraction:.3f} (LSTM stays float): "
           f"below min_quantized_fraction {MIN_QUANTIZED_FRACTION}, a NotQuantizedError row; "
           f"recipe dynamic or auto converts it (test_cli_real)")
    assert fraction < 0.05 < MIN_QUANTIZED_FRACTION   # only the 256x256 head: 65,792 of 1.4M
