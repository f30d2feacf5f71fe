"""forward_kwargs: fixed non-tensor arguments of forward, as FX concrete_args and on every call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantizer.errors import ConfigError, TraceError
from quantizer.fidelity import sqnr_db
from quantizer.int8 import QCONFIG_VERSION, activation_range, rebuild_int8, to_int8


class Embedder(nn.Module):
    """CREPE's shape of forward: ``forward(x, embed=False)`` branches on a Python bool."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor, embed: bool = False, scale: float = 1.0) -> torch.Tensor:
        x = self.body(x) * scale
        if embed:
            return x
        return self.head(x)


class GatedWithFlag(nn.Module):
    """A scalar argument that is NOT the cause: the branch is on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, flag: bool = True) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


@pytest.fixture
def data():
    torch.manual_seed(0)
    return Embedder().eval(), torch.randn(64, 16)


def _loader(x: torch.Tensor) -> list[tuple]:
    return [(x[i:i + 16], None) for i in range(0, 48, 16)]


def test_untraceable_scalar_argument_names_the_forward_kwargs_setting(data):
    model, x = data
    with pytest.raises(TraceError) as info:
        to_int8(model, _loader(x), calibration_batches=3)
    message = str(info.value)
    assert "`forward_kwargs: {embed: false, scale: 1.0}`" in message
    assert "if embed:" in message and "non-tensor argument" in message
    assert "fp16" not in message          # converting to fp16 does not fix a tracing setting


def test_control_flow_on_tensors_keeps_the_old_advice():
    with pytest.raises(TraceError) as info:
        to_int8(GatedWithFlag().eval(), _loader(torch.randn(64, 16)), calibration_batches=1)
    assert "`forward_kwargs:" not in str(info.value)
    assert "control flow" in str(info.value) and "fp16" in str(info.value)


@pytest.mark.parametrize("embed", [False, True])
def test_fixed_kwargs_trace_calibrate_and_are_accepted_on_calls(data, embed):
    model, x = data
    fixed = {"embed": embed, "scale": 3.0}        # scale != its default: calibration passes it
    converted = to_int8(model, _loader(x), calibration_batches=3, forward_kwargs=fixed)
    assert converted.int8_settings == {"recipe": "static", "backend": "fbgemm",
                                       "observer": "default",
                                       "activation_range": activation_range("fbgemm"),
                                       "qconfig_version": QCONFIG_VERSION, "float_layers": [],
                                       "forward_kwargs": fixed}
    held_out = x[48:]
    with torch.no_grad():
        got = converted(held_out, **fixed)
        assert torch.equal(got, converted(held_out, embed=embed, scale=3.0))
        assert torch.equal(got, converted(held_out))        # the fixed values are the defaults
        assert got.shape == model(held_out, **fixed).shape          # the branch it was asked for
        assert sqnr_db(model(held_out, **fixed), got) >= 20.0
        with pytest.raises(AssertionError, match="specialized to have value"):
            converted(held_out, embed=not embed, scale=3.0)


def test_a_scalar_left_unfixed_is_named_too(data):
    model, x = data     # scale feeds a multiplication, which version 1 quantizes: FX observes a float
    with pytest.raises(TraceError, match=r"argument\(s\) scale:.*`forward_kwargs: "
                                         r"\{embed: false, scale: 1\.0\}`"):
        to_int8(model, _loader(x), forward_kwargs={"embed": False}, qconfig_version=1)


def test_a_scalar_feeding_a_float_op_may_stay_free(data):
    model, x = data     # version 2 keeps mul in float: scale stays an argument of the int8 graph
    converted = to_int8(model, _loader(x), calibration_batches=3, forward_kwargs={"embed": False})
    held_out = x[48:]
    with torch.no_grad():
        assert sqnr_db(model(held_out, scale=0.5), converted(held_out, scale=0.5)) >= 20.0
        assert not torch.equal(converted(held_out, scale=0.5), converted(held_out))


def test_rebuild_with_the_settings_is_bit_exact(data):
    model, x = data
    converted = to_int8(model, _loader(x), calibration_batches=3,
                        forward_kwargs={"embed": False, "scale": 1.0})
    torch.manual_seed(7)
    skeleton = rebuild_int8(Embedder(), x[:1], converted.int8_settings)
    skeleton.load_state_dict(converted.state_dict())
    with torch.no_grad():
        assert torch.equal(skeleton(x[48:]), converted(x[48:]))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"embedding": True}, r"'embedding': Embedder\.forward has no such argument \(it takes x, "
                          r"embed, scale\)"),
    ({"embed": [True]}, r"'embed': \[True\] is a list; only JSON scalars"),
])
def test_bad_forward_kwargs_are_config_errors(data, kwargs, pattern):
    model, x = data
    with pytest.raises(ConfigError, match=pattern):
        to_int8(model, _loader(x), forward_kwargs=kwargs)


def test_settings_from_a_newer_tool_are_refused(data):
    model, x = data
    with pytest.raises(ConfigError, match="unknown fields sparsity"):
        rebuild_int8(model, x[:1], {"backend": "fbgemm", "sparsity": 0.5})
