"""to_fp16: an independent, eval-mode, float16 copy that leaves the original alone and turns no
finite tensor into inf (BatchNorm statistics rewritten, normalization layers kept float32, the
rest refused by name); rebuild_fp16 gives a skeleton the same dtypes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from quantizer.errors import ConfigError, ConversionError
from quantizer.fidelity import sqnr_db, top1_agreement
from quantizer.fp16 import BATCHNORM_TO_AFFINE, KEPT_FLOAT32, rebuild_fp16, to_fp16
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


# ----------------------------------------------------------------------------- fp16 range


class _ReluThenBN(nn.Module):
    """CREPE's layer order: conv, ReLU, then BatchNorm (no conv to fold the BN into)."""

    def __init__(self, affine: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, affine=affine)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.head(torch.flatten(self.bn(torch.relu(self.conv(x))), 1))


def _loud(affine: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """A net whose activations are large (x 3000) so its BN statistics exceed float16's range."""
    torch.manual_seed(0)
    model = _ReluThenBN(affine).eval()
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        model.conv.weight.mul_(3000.0)
        model.conv.bias.mul_(3000.0)
        act = torch.relu(model.conv(x))
        model.bn.running_mean.copy_(act.mean((0, 2, 3)))
        model.bn.running_var.copy_(act.var((0, 2, 3)))
        if affine:
            model.bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0, 2.0]))
            model.bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    assert float(model.bn.running_var.max()) > 65504          # the premise
    return model, x


def _finite_state(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())


def test_batchnorm_statistics_beyond_fp16_become_an_equivalent_affine():
    model, x = _loud()
    before = snapshot(model)
    assert not _finite_state(copy.deepcopy(model).half())     # what a plain .half() did
    half = to_fp16(model)
    assert _finite_state(half) and same_state(model, before)
    assert all(t.dtype == torch.float16 for t in half.state_dict().values() if t.is_floating_point())
    [entry] = half.fp16_adjustments
    assert entry["action"] == BATCHNORM_TO_AFFINE and entry["module"] == "bn"
    assert entry["tensors"] == ["bn.running_var"] and entry["max_abs"] == pytest.approx(
        float(model.bn.running_var.max()))
    assert json.loads(json.dumps(half.fp16_adjustments, allow_nan=False)) == half.fp16_adjustments
    assert torch.equal(half.bn.running_mean, torch.zeros(4, dtype=torch.float16))
    assert torch.equal(half.bn.running_var, torch.ones(4, dtype=torch.float16))
    with torch.no_grad():
        assert sqnr_db(model(x), half(x.half())) >= 50.0


def test_statistics_without_an_affine_to_absorb_them_stay_float32():
    model, x = _loud(affine=False)
    half = to_fp16(model)
    [entry] = half.fp16_adjustments
    assert entry["action"] == KEPT_FLOAT32 and entry["module"] == "bn"
    assert {t.dtype for t in half.bn.state_dict().values() if t.is_floating_point()} == {torch.float32}
    assert half.conv.weight.dtype == torch.float16 and _finite_state(half)
    with torch.no_grad():
        out = half(x.half())
        assert out.dtype == torch.float16
        assert sqnr_db(model(x), out) >= 50.0


def test_instancenorm_statistics_beyond_fp16_are_refused():
    # its mixed-dtype kernel is inaccurate on such inputs, and a plain half() would give inf
    model, _ = _loud(affine=False)
    stats, model.bn = model.bn, nn.InstanceNorm2d(4, track_running_stats=True).eval()
    model.bn.load_state_dict(stats.state_dict())
    with pytest.raises(ConversionError, match=r"'bn\.running_var' \(InstanceNorm2d\)"):
        to_fp16(model)


def test_a_weight_beyond_fp16_elsewhere_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[2].weight[0, 1] = 7e4
    with pytest.raises(ConversionError, match=r"tensor '2\.weight' \(Linear\) holds 1 of 8 values "
                                              r"beyond float16's range \(max \|x\| 7e\+04 > 65504\)"):
        to_fp16(model)


def test_rebuild_fp16_gives_the_same_dtypes_so_the_state_loads_exactly():
    model, x = _loud(affine=False)
    half = to_fp16(model)
    torch.manual_seed(5)
    skeleton = rebuild_fp16(_ReluThenBN(affine=False), half.fp16_adjustments)
    skeleton.load_state_dict(half.state_dict())
    assert skeleton.bn.running_var.dtype == torch.float32
    assert torch.equal(skeleton.bn.running_var, model.bn.running_var)   # not through fp16
    with torch.no_grad():
        assert torch.equal(skeleton(x.half()), half(x.half()))
    with pytest.raises(ConfigError, match="unknown action 'cast'"):
        rebuild_fp16(_ReluThenBN(), [{"module": "bn", "action": "cast"}])
    with pytest.raises(ConfigError, match="no module 'nope'"):
        rebuild_fp16(_ReluThenBN(), [{"module": "nope", "action": KEPT_FLOAT32}])


def test_models_within_range_are_plain_half_copies(cnn):
    half = to_fp16(cnn)
    assert half.fp16_adjustments == []
    assert same_state(half, snapshot(copy.deepcopy(cnn).half()))
