"""What a task measures and gates, on tiny real models: non-finite outputs fail named, SQNR never
leaves the finite range, min_sqnr_db gates int8 only, fp16 is measured where the GPU is. No Ray."""

from __future__ import annotations

import pytest
import torch

import quantizer
from jobs import measure
from jobs.zoo import ModelSpec
from tests.jobs import fault_models as fm


def _ref(model, rows=16):
    torch.manual_seed(0)
    return measure.reference("m", model.eval(), torch.randn(rows, fm.IN_FEATURES))


def test_fp16_overflow_fails_named_and_a_finite_copy_measures():
    hot = fm.Overflows()
    ref = _ref(hot)
    assert ref.finite and ref.latency_ms > 0
    with pytest.raises(measure.NonFiniteOutputError, match=r"model m fp16: output 0 is inf/NaN"):
        measure.measure_fp16("m", ref, hot, quantizer.to_fp16(hot), "cpu")
    cool = fm.TinyMLP()
    ref = _ref(cool)
    out = measure.measure_fp16("m", ref, cool, quantizer.to_fp16(cool), "cpu")
    assert out["fidelity_rows"] == measure.FP16_CPU_ROWS and 40 < out["sqnr_db"] <= 300
    assert out["latency_ms"] is None and "accelerator" in out["latency_note"]


def test_identical_outputs_cap_at_300_db_and_non_finite_references_are_not_scored():
    model = fm.TinyMLP()
    ref = _ref(model)
    got = [t.clone() for t in ref.outputs]
    assert measure.fidelity("m", "int8", ref, got, 16)["sqnr_db"] == measure.SQNR_CAP_DB
    ref.finite = False
    out = measure.fidelity("m", "int8", ref, got, 16)
    assert out["sqnr_db"] is None and "not finite" in out["fidelity_note"]


def test_a_forward_that_rejects_the_rows_is_an_input_shape_error():
    with pytest.raises(quantizer.InputShapeError, match=r"model m: .* shape \[10\]"):
        measure.reference("m", fm.TinyMLP().eval(), torch.randn(4, 10))


def test_min_sqnr_db_gates_int8_only():
    spec = ModelSpec(name="m", factory="f:g", checkpoint="c", min_sqnr_db=50.0)
    out = {"quantized_fraction": 1.0, "sqnr_db": 30.0, "fidelity_rows": 64}
    measure.check_gates("m", spec, "fp16", out)
    with pytest.raises(quantizer.FidelityError, match="below min_sqnr_db 50.0"):
        measure.check_gates("m", spec, "int8", out)


@pytest.mark.parametrize("gpu_ids, cuda, device", [
    ([], False, "cpu"), ([], True, "cpu"), ([0], False, "cpu"), ([0], True, "cuda")])
def test_fp16_is_measured_on_the_gpu_ray_assigned(gpu_ids, cuda, device):
    assert measure.fp16_device(gpu_ids, cuda) == device
