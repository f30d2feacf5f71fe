"""to_fp16: an independent, eval-mode, all-float16 copy that leaves the original alone."""

from __future__ import annotations

import torch

from quantizer.fidelity import sqnr_db, top1_agreement
from quantizer.fp16 import to_fp16
from tests.quantizer.conftest import snapshot, same_state, state_bytes


def test_copy_is_half_eval_and_independent(cnn):
    cnn.train()  # the conversion must switch the copy to eval, whatever the source's mode
    before = snapshot(cnn)
    half = to_fp16(cnn)

    assert half is not cnn
    assert not half.training and all(not m.training for m in half.modules())
    floating = [t for t in [*half.parameters(), *half.buffers()] if t.is_floating_point()]
    assert len(floating) == 14  # 3 layers x (weight, bias) + 2 BNs x (weight, bias, mean, var)
    assert all(t.dtype == torch.float16 for t in floating)
    assert {b.dtype for b in half.buffers() if not b.is_floating_point()} == {torch.int64}
    # no storage shared with the source
    source_ptrs = {t.data_ptr() for t in [*cnn.parameters(), *cnn.buffers()]}
    assert not source_ptrs & {t.data_ptr() for t in [*half.parameters(), *half.buffers()]}

    assert same_state(cnn, before)
    assert cnn.training
    assert all(p.dtype == torch.float32 for p in cnn.parameters())


def test_original_untouched_after_using_the_copy(mlp):
    before = snapshot(mlp)
    half = to_fp16(mlp)
    with torch.no_grad():
        half.net[0].weight.add_(1.0)
    assert same_state(mlp, before)


def test_fp16_outputs_track_fp32(cnn, digits):
    x = digits["x_test"][:64]
    half = to_fp16(cnn)
    with torch.no_grad():
        reference, test = cnn.eval()(x), half(x.half())
    assert test.dtype == torch.float16
    assert sqnr_db(reference, test) >= 40.0
    assert top1_agreement(reference, test) >= 0.98


def test_fp16_state_dict_is_about_half_the_bytes(cnn, mlp):
    for model in (cnn, mlp):
        assert sum(p.numel() for p in model.parameters()) >= 50_000
        ratio = state_bytes(to_fp16(model)) / state_bytes(model)
        assert 0.45 <= ratio <= 0.52, (type(model).__name__, ratio)
