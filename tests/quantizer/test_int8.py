"""to_int8 / rebuild_int8 / quantized_fraction on trained tiny nets, and every refusal's message."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from quantizer.errors import CalibrationError, ConfigError, InputShapeError, TraceError
from quantizer.fidelity import sqnr_db
from quantizer.int8_float_outputs import FloatOutputLinear
from quantizer.int8 import (
    BACKENDS, OBSERVERS, CalibrationWarning, quantized_fraction, rebuild_int8, set_engine, to_int8,
)
from tests.quantizer.conftest import (
    LSTMClassifier, SmallCNN, batches, same_state, snapshot, state_bytes,
)



def _quantized_layers(converted: nn.Module) -> list[nn.Module]:
    # the intrinsic fused classes (ConvReLU2d, LinearReLU) subclass these two; a Linear whose
    # output feeds float ops (the logits here) has an int8 GEMM with a float output
    return [m for m in converted.modules()
            if isinstance(m, (nnq.Conv2d, nnq.Linear, FloatOutputLinear))]


def _held_out(digits, flat: bool) -> torch.Tensor:
    x = digits["x_test"]
    return x.flatten(1) if flat else x


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_int8_is_a_quantized_graph_module(kind, request):
    model = request.getfixturevalue(kind)
    loader = request.getfixturevalue(f"{kind}_loader")
    before = snapshot(model)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = to_int8(model, loader, calibration_batches=10)

    assert [str(w.message)[:80] for w in caught] == []  # torch.ao's deprecation chatter stays inside
    assert isinstance(converted, torch.fx.GraphModule)
    float_layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(_quantized_layers(converted)) == len(float_layers) == 3
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in converted.modules())
    assert (converted.calibration_batches_used, converted.backend, converted.observer) == \
        (10, "fbgemm", "default")
    assert same_state(model, before)
    assert quantized_fraction(converted, model) > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_int8_sqnr_on_held_out_inputs(kind, backend, request, digits):
    model = request.getfixturevalue(kind)
    converted = to_int8(model, request.getfixturevalue(f"{kind}_loader"), backend=backend)
    x = _held_out(digits, flat=kind == "mlp")
    set_engine(backend)
    with torch.no_grad():
        assert sqnr_db(model(x), converted(x)) >= 20.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_minmax_observer_sqnr(backend, cnn, cnn_loader, digits):
    converted = to_int8(cnn, cnn_loader, backend=backend, observer="minmax")
    assert converted.observer == "minmax"
    x = digits["x_test"]
    with torch.no_grad():
        assert sqnr_db(cnn(x), converted(x)) >= 20.0


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_int8_state_dict_is_under_30_percent_of_fp32(kind, request):
    model = request.getfixturevalue(kind)
    assert sum(p.numel() for p in model.parameters()) >= 50_000
    converted = to_int8(model, request.getfixturevalue(f"{kind}_loader"))
    ratio = state_bytes(converted) / state_bytes(model)
    assert 0.2 <= ratio <= 0.30, ratio


@pytest.mark.parametrize("observer", OBSERVERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rebuild_then_load_state_dict_is_bit_exact(backend, observer, cnn, cnn_loader, digits):
    converted = to_int8(cnn, cnn_loader, calibration_batches=3, backend=backend, observer=observer)
    torch.manual_seed(99)  # a fresh, differently initialised model, as load_artifact would build
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skeleton = rebuild_int8(SmallCNN(), digits["x_train"][:2], converted.int8_settings)
    assert [str(w.message)[:80] for w in caught] == []  # no "must run observer" noise
    assert skeleton.calibration_batches_used == 0
    skeleton.load_state_dict(converted.state_dict())
    x = digits["x_test"]
    with torch.no_grad():
        assert torch.equal(skeleton(x), converted(x))


def test_lstm_stays_float_and_the_fraction_says_so():
    torch.manual_seed(0)
    model = LSTMClassifier().eval()
    x = torch.randn(64, 12, 8)
    converted = to_int8(model, batches(x, torch.zeros(64), 16, 4), calibration_batches=4)
    assert any(isinstance(m, nn.LSTM) for m in converted.modules())
    assert 0.0 < quantized_fraction(converted, model) < 0.05  # only the 640-weight head


def test_loader_is_iterated_once_and_not_past_the_asked_batches(cnn, cnn_loader):
    consumed = []

    def one_shot():
        for index, batch in enumerate(cnn_loader):
            consumed.append(index)
            yield batch

    converted = to_int8(cnn, one_shot(), calibration_batches=4)
    assert converted.calibration_batches_used == 4
    assert consumed == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- refusals


def test_empty_loader(cnn):
    with pytest.raises(CalibrationError, match="empty"):
        to_int8(cnn, [])


@pytest.mark.parametrize("bad", [0, -3])
def test_calibration_batches_below_one(bad, cnn, cnn_loader):
    with pytest.raises(ConfigError, match=rf"calibration_batches.*>= 1.*got {bad}"):
        to_int8(cnn, cnn_loader, calibration_batches=bad)


def test_unknown_backend_lists_the_allowed(cnn, cnn_loader):
    with pytest.raises(ConfigError, match="'tpu'.*fbgemm, qnnpack, x86"):
        to_int8(cnn, cnn_loader, backend="tpu")


def test_unknown_observer_lists_the_allowed(cnn, cnn_loader):
    with pytest.raises(ConfigError, match="'bogus'.*default, minmax"):
        to_int8(cnn, cnn_loader, observer="bogus")


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace this
            return x
        return -x


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.gate = _Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(x))


def test_untraceable_model_names_class_module_and_line(mlp_loader):
    with pytest.raises(TraceError) as info:
        to_int8(_Gated().eval(), mlp_loader)
    message = str(info.value)
    assert "_Gated" in message
    assert "module 'gate' (_Gate)" in message
    assert "test_int8.py:" in message and "if x.sum() > 0:" in message
    assert "fp16" in message and "control flow" in message


def test_wrong_input_shape_names_got_and_expected(cnn):
    wrong = [(torch.rand(8, 3, 8, 8), torch.zeros(8))]
    with pytest.raises(InputShapeError) as info:
        to_int8(cnn, wrong)
    assert "(8, 3, 8, 8)" in str(info.value) and "in_channels=1" in str(info.value)


def test_nan_inputs(cnn, cnn_loader):
    poisoned = cnn_loader[1][0].clone()
    poisoned[3, 0, 2, 2] = float("nan")
    loader = [cnn_loader[0], (poisoned, cnn_loader[1][1])]
    with pytest.raises(CalibrationError, match="batch 2 holds NaN or Inf"):
        to_int8(cnn, loader)


def test_overflowing_activations_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e38)  # finite weights, finite inputs, non-finite activations
    loader = [(torch.full((8, 4), 10.0), None)]
    for observer in OBSERVERS:
        with pytest.raises(CalibrationError, match="NaN/Inf"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            to_int8(model, loader, calibration_batches=1, observer=observer)


def test_fewer_batches_than_asked_warns_and_converts(mlp, mlp_loader):
    with pytest.warns(CalibrationWarning, match="3 of 10"):
        converted = to_int8(mlp, mlp_loader[:3], calibration_batches=10)
    assert converted.calibration_batches_used == 3


def test_set_engine_rejects_unknown_backend():
    with pytest.raises(ConfigError, match="'tpu'"):
        set_engine("tpu")
    set_engine("qnnpack")
    assert torch.backends.quantized.engine == "qnnpack"
    set_engine("fbgemm")
