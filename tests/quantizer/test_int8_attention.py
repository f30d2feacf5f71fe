"""int8 on attention and LayerNorm models (issue 14): SQNR floors on trained ViT / ConvNeXt / Swin
models, CNNs no worse than quantize-all 0.1's mapping, the activation-range rule checked against
this CPU's kernels, the recorded ``int8_settings`` and exact rebuilds from them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from benchmarks import attention_models, fidelity_zoo
from jobs.demo.models import DepthwiseCNN, ResidualCNN
from quantizer import int8_qconfig
from quantizer.artifacts import load_artifact, save_artifact
from quantizer.errors import ConfigError
from quantizer.fidelity import sqnr_db
from quantizer.int8 import (
    BACKENDS, QCONFIG_VERSION, SETTINGS_FIELDS, activation_range, rebuild_int8, set_engine,
    to_int8,
)
from quantizer.int8_float_outputs import FloatOutputConv, FloatOutputLinear
from tests.quantizer.conftest import batches, train

# small copies of the benchmark zoo's attention models, trained for 3 epochs on digit photos
SMALL = {
    "vit-qkv": {"dim": 64, "depth": 2},
    "vit-mha": {"dim": 64, "depth": 2},
    "convnext": {"dims": (24, 48, 96, 192), "depths": (1, 1, 2, 1)},
    "swin": {"dim": 32, "depths": (2, 2), "heads": (2, 4)},
}
# held-out SQNR floors (dB): version 2 measured 36.6 / 35.4 / 43.8 / 34.8 here, version 1 (the
# mapping of quantize-all 0.1) 24.6 / 22.8 / 32.5 / 26.2
FLOOR = {"vit-qkv": 33.5, "vit-mha": 32.5, "convnext": 40.5, "swin": 32.0}
CALIBRATION_BATCHES = 10


@pytest.fixture(scope="session")
def photos() -> dict[str, torch.Tensor]:
    x, _ = fidelity_zoo.data("photo32")
    return {"calibration": x[:160], "held_out": x[fidelity_zoo.N_TRAIN:fidelity_zoo.N_TRAIN + 128]}


@pytest.fixture(scope="session")
def attention(photos) -> dict[str, dict]:
    """Each small model, trained, with its fp32 held-out outputs and both conversions."""
    loader = [(b, None) for b in photos["calibration"].split(16)]
    found = {}
    for name, kwargs in SMALL.items():
        torch.manual_seed(0)
        model = fidelity_zoo.train(attention_models.build(name, **kwargs), "photo32", epochs=3)
        with torch.no_grad():
            reference = model(photos["held_out"])
        found[name] = {"model": model, "kwargs": kwargs, "reference": reference,
                       "today": to_int8(model, loader, CALIBRATION_BATCHES, qconfig_version=1),
                       "new": to_int8(model, loader, CALIBRATION_BATCHES)}
    return found


def _sqnr(entry: dict, which: str, x: torch.Tensor) -> float:
    set_engine(entry[which].int8_settings["backend"])
    with torch.no_grad():
        return sqnr_db(entry["reference"], entry[which](x))


@pytest.mark.parametrize("name", list(SMALL))
def test_attention_models_reach_their_floor(name, attention, photos):
    new = _sqnr(attention[name], "new", photos["held_out"])
    today = _sqnr(attention[name], "today", photos["held_out"])
    assert new >= FLOOR[name], (new, today)
    assert new >= today + 6.0, (new, today)


def test_minmax_observer_keeps_most_of_it(attention, photos):
    entry = attention["vit-qkv"]
    loader = [(b, None) for b in photos["calibration"].split(16)]
    converted = to_int8(entry["model"], loader, CALIBRATION_BATCHES, observer="minmax")
    assert converted.int8_settings["observer"] == "minmax"
    with torch.no_grad():
        assert sqnr_db(entry["reference"], converted(photos["held_out"])) >= FLOOR["vit-qkv"] - 1.0


def test_float_ops_stay_float_and_linear_outputs_too(attention):
    converted = attention["vit-qkv"]["new"]
    modules = dict(converted.named_modules())
    called = [modules[n.target] if n.op == "call_module" else n.target
              for n in converted.graph.nodes if n.op in ("call_module", "call_function")]
    assert not [c for c in called if isinstance(c, (nnq.LayerNorm, nnq.Softmax))]
    int8_ops = {torch.ops.quantized.add, torch.ops.quantized.mul, torch.ops.quantized.layer_norm,
                torch.ops.quantized.matmul}
    assert not [c for c in called if c in int8_ops]
    linears = [name for name, m in attention["vit-qkv"]["model"].named_modules()
               if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(modules[name], FloatOutputLinear) for name in linears)
    assert isinstance(modules["embed"], FloatOutputConv)      # the patch embedding


def _digits_cnn(cls, digits, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return train(cls(**kwargs), digits["x_train"], digits["y_train"], epochs=3)


@pytest.mark.parametrize("which", ["small-cnn", "residual-cnn", "depthwise-cnn"])
def test_cnns_are_no_worse_than_quantize_all_0_1(which, digits, cnn):
    model = {"small-cnn": lambda: cnn,
             "residual-cnn": lambda: _digits_cnn(ResidualCNN, digits, width=32),
             "depthwise-cnn": lambda: _digits_cnn(DepthwiseCNN, digits, width=96)}[which]()
    loader = batches(digits["x_train"], digits["y_train"], 32, 10)
    x = digits["x_test"]
    with torch.no_grad():
        reference = model(x)
        today = sqnr_db(reference, to_int8(model, loader, qconfig_version=1)(x))
        new = sqnr_db(reference, to_int8(model, loader)(x))
    assert new >= today - 0.5, (new, today)


def test_cnn_residual_adds_stay_int8(digits):
    model = _digits_cnn(ResidualCNN, digits, width=16, blocks=2)
    converted = to_int8(model, batches(digits["x_train"], digits["y_train"], 32, 2), 2)
    called = [n.target for n in converted.graph.nodes if n.op == "call_function"]
    assert called.count(torch.ops.quantized.add_relu) == 2          # no float add between convs
    assert not [m for m in converted.modules() if isinstance(m, FloatOutputConv)]
    assert isinstance(converted.head, FloatOutputLinear)            # float logits


def _cpu_has_avx512_vnni() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any("avx512_vnni" in line.split() for line in f if line.startswith("flags"))
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU flags from")


@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_range_follows_the_backend_and_the_cpu(backend):
    full = backend == "qnnpack" or _cpu_has_avx512_vnni()
    assert activation_range(backend) == ("full" if full else "reduced")


def _worst_case(layer: nn.Module, shape: tuple, top: int, weight: int) -> int:
    """Largest gap, in output steps, between ``layer``'s int8 kernel and exact arithmetic on the
    same quantized values, with every input at ``top`` and every weight at ``weight``."""
    w = layer.weight().dequantize()
    weights = torch.quantize_per_channel(torch.full_like(w, weight * 0.01),
                                         torch.full((w.shape[0],), 0.01, dtype=torch.double),
                                         torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    layer.set_weight_bias(weights, torch.zeros(w.shape[0]))
    x = torch._make_per_tensor_quantized_tensor(torch.full(shape, top, dtype=torch.uint8), 0.02, 0)
    if isinstance(layer, nnq.Linear):
        exact = nn.functional.linear(x.dequantize(), weights.dequantize())
    else:
        exact = nn.functional.conv2d(x.dequantize(), weights.dequantize(), None, layer.stride,
                                     layer.padding, 1, layer.groups)
    layer.scale, layer.zero_point = float(exact.abs().max()) / 120 + 1e-6, 128
    expected = torch.clamp(torch.round(exact / layer.scale) + 128, 0, 255)
    return int((layer(x).int_repr().float() - expected).abs().max())


@pytest.mark.parametrize("backend", [b for b in BACKENDS
                                     if b in torch.backends.quantized.supported_engines])
def test_the_chosen_range_is_exact_on_this_cpu(backend):
    set_engine(backend)
    top = 255 if activation_range(backend) == "full" else 127
    low, _ = int8_qconfig.DEPTHWISE_WEIGHT_RANGE if top == 255 and backend != "qnnpack" \
        else (-128, 127)
    layers = {"linear": (nnq.Linear(256, 64), (4, 256), -128),
              "conv": (nnq.Conv2d(64, 32, 3, padding=1), (1, 64, 8, 8), -128),
              "grouped": (nnq.Conv2d(64, 64, 3, padding=1, groups=8), (1, 64, 8, 8), -128),
              "depthwise": (nnq.Conv2d(384, 384, 3, padding=1, groups=384), (1, 384, 8, 8), low)}
    gaps = {name: _worst_case(layer, shape, top, weight)
            for name, (layer, shape, weight) in layers.items()}
    assert max(gaps.values()) <= 1, gaps


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                    reason="no fbgemm kernels in this torch build")
def test_fbgemm_depthwise_saturates_with_8_bit_weights_and_full_range():
    set_engine("fbgemm")      # why full range gives depthwise weights 7 bits
    layer = nnq.Conv2d(384, 384, 3, padding=1, groups=384)
    assert _worst_case(layer, (1, 384, 8, 8), 255, -128) > 10


def test_int8_settings_are_recorded(attention):
    settings = attention["swin"]["new"].int8_settings
    assert settings == {"recipe": "static", "backend": "fbgemm", "observer": "default",
                        "activation_range": activation_range("fbgemm"),
                        "qconfig_version": QCONFIG_VERSION, "float_layers": [],
                        "forward_kwargs": {}}
    assert tuple(settings) == SETTINGS_FIELDS
    assert json.loads(json.dumps(settings, allow_nan=False)) == settings
    assert attention["swin"]["today"].int8_settings["qconfig_version"] == 1


@pytest.mark.parametrize("name", list(SMALL))
def test_rebuild_from_the_settings_is_bit_exact(name, attention, photos):
    entry = attention[name]
    x = photos["held_out"]
    for which in ("new", "today"):
        torch.manual_seed(99)     # a fresh, differently initialised model, as load_artifact builds
        fresh = attention_models.build(name, **entry["kwargs"])
        skeleton = rebuild_int8(fresh, x[:1], entry[which].int8_settings)
        skeleton.load_state_dict(entry[which].state_dict())
        with torch.no_grad():
            assert torch.equal(skeleton(x), entry[which](x)), which


def test_settings_without_a_version_rebuild_quantize_all_0_1(attention, photos):
    entry = attention["convnext"]
    old = {"backend": "fbgemm", "observer": "default"}      # what 0.1's recipes said
    skeleton = rebuild_int8(attention_models.build("convnext", **entry["kwargs"]),
                            photos["held_out"][:1], old)
    assert skeleton.int8_settings["qconfig_version"] == 1
    skeleton.load_state_dict(entry["today"].state_dict())
    with torch.no_grad():
        assert torch.equal(skeleton(photos["held_out"]), entry["today"](photos["held_out"]))


def test_artifact_round_trip_is_bit_exact(attention, photos, tmp_path):
    entry = attention["swin"]
    x = photos["held_out"]
    recipe = {"precision": "int8", "factory": "benchmarks.attention_models:build",
              "kwargs": {"arch": "swin", **{k: list(v) if isinstance(v, tuple) else v
                                            for k, v in entry["kwargs"].items()}},
              "backend": "fbgemm", "observer": "default", "input_shape": [3, 32, 32],
              "input_dtype": "float32"}
    save_artifact(entry["new"], tmp_path, recipe, x[:1])
    assert json.loads((tmp_path / "recipe.json").read_text())["int8"] == entry["new"].int8_settings
    loaded = load_artifact(tmp_path)
    scripted = torch.jit.load(tmp_path / "model.torchscript.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), entry["new"](x))
        assert torch.equal(scripted(x), entry["new"](x))


@pytest.mark.parametrize("bad, match", [
    ({"backend": "fbgemm", "float_layers_v9": []}, "unknown fields float_layers_v9"),
    ({"backend": "fbgemm", "qconfig_version": 7}, "unknown qconfig_version 7"),
    ({"backend": "fbgemm", "activation_range": "wide", "qconfig_version": 2}, "'wide'"),
    ({"backend": "tpu"}, "unknown backend 'tpu'"),
])
def test_bad_settings_are_refused(bad, match, attention, photos):
    with pytest.raises(ConfigError, match=match):
        rebuild_int8(attention_models.build("vit-qkv", **SMALL["vit-qkv"]), photos["held_out"][:1], bad)


def test_full_range_is_refused_where_fbgemm_would_saturate(monkeypatch, attention, photos):
    monkeypatch.setattr(int8_qconfig, "_has_avx512_vnni", lambda: False)   # a CPU without VNNI
    assert activation_range("fbgemm") == "reduced" and activation_range("qnnpack") == "full"
    loader = [(photos["calibration"][:16], None)]
    with pytest.raises(ConfigError, match="full is not exact with backend 'fbgemm'.*VNNI"):
        to_int8(attention["vit-qkv"]["model"], loader, 1, activation_range="full")
    converted = to_int8(attention["vit-qkv"]["model"], loader, 1)
    assert converted.int8_settings["activation_range"] == "reduced"

