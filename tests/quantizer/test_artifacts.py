"""Artifacts that are what was measured: state kept outside state_dicts, output fingerprints,
fp16 adjustments and forward_kwargs replayed on reload, and factories pinned before any import."""

from __future__ import annotations

import json
import math
import random
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantizer.artifacts import load_artifact, save_artifact
from quantizer.errors import ArtifactError
from quantizer.fingerprint import MIN_SQNR_DB, fixed_input
from quantizer.fp16 import KEPT_FLOAT32, to_fp16
from quantizer.int8 import to_int8
from tests.quantizer.test_fp16 import _loud

HERE = "tests.quantizer.test_artifacts"
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


class Zoo(nn.Module):
    """One of each module FX converts into a class that keeps state outside its state_dict
    (PReLU, ELU, Softmax), beside functional ops whose scales live on the graph module."""

    def __init__(self, gain: float = 1.0, act: str = "relu"):
        super().__init__()
        self.gain = gain
        self.act = nn.ReLU() if act == "relu" else nn.Tanh()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.prelu = nn.PReLU(8)
        self.elu = nn.ELU()
        self.lrelu = nn.LeakyReLU(0.1)
        self.hswish = nn.Hardswish()
        self.norm = nn.LayerNorm([8, 6, 6])
        self.w = nn.Parameter(torch.randn(10, 8 * 6 * 6) * 0.05)
        self.b = nn.Parameter(torch.randn(10) * 0.1)
        self.fc = nn.Linear(10, 10)
        self.softmax = nn.Softmax(dim=1)
        with torch.no_grad():
            self.prelu.weight.copy_(torch.linspace(-0.5, 0.9, 8))   # not the 0.25 default

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        y = self.prelu(x) + self.elu(x)
        y = torch.cat([self.lrelu(y), self.hswish(y)], 1)[:, :8]
        y = self.norm(y) * self.gain
        z = F.linear(y.flatten(1), self.w, self.b)
        return self.fc(z), self.softmax(z)


def _zoo(gain: float = 1.0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Zoo(gain).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(48, 3, 6, 6)


def _recipe(precision: str, factory: str = f"{HERE}:Zoo", **extra) -> dict:
    return {"precision": precision, "factory": factory, "kwargs": {}, "input_shape": [3, 6, 6],
            "input_dtype": "float16" if precision == "fp16" else "float32", **extra}


def _int8_artifact(folder, **settings):
    model, x = _zoo()
    converted = to_int8(model, [(x[i:i + 16], None) for i in (0, 16)], calibration_batches=2,
                        **settings)
    save_artifact(converted, folder, _recipe("int8"), x[:1])
    return converted, x[32:], folder


@pytest.fixture
def int8_artifact(tmp_path):
    return _int8_artifact(tmp_path / "art")


@pytest.mark.parametrize("version", [1, 2])
def test_int8_state_outside_the_state_dict_is_saved_and_restored(version, tmp_path):
    converted, x, folder = _int8_artifact(tmp_path / "art", qconfig_version=version)
    prelu = converted.prelu
    assert "QuantizedPReLU" in type(prelu)._get_name(prelu)
    payload = torch.load(folder / "model.pt", weights_only=True)
    kept = payload["module_state"]
    assert {"scale", "zero_point", "weight"} <= set(kept["prelu"])   # none is in the state_dict
    assert not any(k.startswith("prelu.") for k in payload["state_dict"])
    assert {"scale", "zero_point"} <= set(kept["elu"])
    # version 2 keeps softmax float (as pt2e does); version 1's int8 one keeps its qparams outside
    assert ({"scale", "zero_point"} <= set(kept["softmax"])) == (version == 1)
    # F.linear's packed weight is a torchbind object in the state_dict: stored as tensors instead
    assert payload["packed_weights"]["_packed_weight_0"]["kind"] == "linear"
    assert isinstance(converted.state_dict()["_packed_weight_0"], torch.ScriptObject)
    loaded = load_artifact(folder)
    assert loaded.prelu.scale == prelu.scale and loaded.prelu.zero_point == prelu.zero_point
    assert torch.equal(loaded.prelu.weight.int_repr(), prelu.weight.int_repr())
    with torch.no_grad():
        for want, got in zip(converted(x), loaded(x)):
            assert torch.equal(want, got)
    assert loaded.fingerprint_sqnr_db == [math.inf, math.inf]


def test_the_fingerprint_catches_state_lost_on_the_way(int8_artifact, tmp_path):
    converted, x, folder = int8_artifact
    payload = torch.load(folder / "model.pt", weights_only=True)
    torch.save({**payload, "module_state": {}}, tmp_path / "lossy.pt")   # the old artifact format's gap
    with pytest.raises(ArtifactError, match=r"lossy\.pt: the rebuilt model does not reproduce the "
                                            r"outputs stored.*output 0: -?\d+\.\d dB SQNR.*>= 40 dB"):
        load_artifact(tmp_path / "lossy.pt")
    lossy = load_artifact(tmp_path / "lossy.pt", check_fingerprint=False)
    assert lossy.fingerprint_sqnr_db is None
    with torch.no_grad():
        assert not torch.equal(lossy(x)[0], converted(x)[0])


def test_the_fingerprint_catches_a_factory_that_now_computes_otherwise(tmp_path):
    model, x = _zoo()
    half = to_fp16(model)
    save_artifact(half, tmp_path / "art", _recipe("fp16"), x[:1].half())
    payload = torch.load(tmp_path / "art" / "model.pt", weights_only=True)
    recipe = {**payload["recipe"], "kwargs": {"act": "tanh"}}   # same weights, other outputs
    torch.save({**payload, "recipe": recipe}, tmp_path / "changed.pt")
    with pytest.raises(ArtifactError, match="does not reproduce"):
        load_artifact(tmp_path / "changed.pt")
    assert load_artifact(tmp_path / "art").fingerprint_sqnr_db == [math.inf, math.inf]


class Functional(nn.Module):
    """Convolutions called as functions: FX packs their weights into torchbind objects."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(4, 3, 3) * 0.3), nn.Parameter(torch.randn(4))
        self.w2, self.b2 = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.2), nn.Parameter(torch.randn(4))
        self.wt, self.bt = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.2), nn.Parameter(torch.randn(4))
        self.w3, self.b3 = nn.Parameter(torch.randn(2, 4, 1, 1, 1)), nn.Parameter(torch.randn(2))

    def forward(self, x):
        y = F.conv1d(x, self.w1, self.b1, [1], [1], [1], 1)
        y = y.unsqueeze(-1).expand(-1, -1, -1, y.shape[-1]).contiguous()
        y = F.conv2d(y, self.w2, self.b2, [1, 1], [1, 1], [1, 1], 1)
        y = F.conv_transpose2d(y, self.wt, self.bt, [2, 2], [1, 1], [1, 1], 1, [1, 1])
        return F.conv3d(y.unsqueeze(2), self.w3, self.b3, [1, 1, 1], [0, 0, 0], [1, 1, 1], 1)


@pytest.mark.parametrize("backend", ["fbgemm", "x86", "qnnpack"])
def test_functional_convolutions_packed_weights_reload_exactly(tmp_path, backend):
    torch.manual_seed(0)
    model, x = Functional().eval(), torch.randn(24, 3, 6)
    converted = to_int8(model, [(x[:16], None)], calibration_batches=1, backend=backend)
    recipe = {"precision": "int8", "factory": f"{HERE}:Functional", "kwargs": {},
              "input_shape": [3, 6], "input_dtype": "float32"}
    if backend == "qnnpack":     # QNNPACK cannot unpack 3-d convolutions: refused, by name
        with pytest.raises(ArtifactError, match=r"packed weight '_packed_weight_3' cannot be "
                                                r"unpacked.*QNNPACK only supports conv2d_unpack"):
            save_artifact(converted, tmp_path / "art", recipe, x[:1])
        return
    save_artifact(converted, tmp_path / "art", recipe, x[:1])
    stored = torch.load(tmp_path / "art" / "model.pt", weights_only=True)["packed_weights"]
    assert [(e["kind"], e["dims"], e["transpose"]) for e in stored.values()] == \
        [("conv", 2, False), ("conv", 2, False), ("conv", 2, True), ("conv", 3, False)]
    loaded = load_artifact(tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(loaded(x[16:]), converted(x[16:]))
    assert loaded.fingerprint_sqnr_db == [math.inf]


def test_fixed_input_is_the_same_everywhere():
    x = fixed_input([2, 3], torch.float32)
    assert x.shape == (2, 2, 3) and x.dtype == torch.float32
    first = random.Random(0).random() * 2 - 1                  # Python keeps this sequence stable
    assert float(x[0, 0, 0]) == pytest.approx(first) == pytest.approx(0.6888437030500962)
    assert torch.equal(x, fixed_input([2, 3], torch.float32))
    assert float(x.min()) >= -1.0 and float(x.max()) < 1.0 and MIN_SQNR_DB == 40.0


def test_fp16_adjustments_replay_on_reload(tmp_path):
    model, x = _loud(affine=False)                  # a BatchNorm kept float32
    half = to_fp16(model)
    recipe = {"precision": "fp16", "factory": "tests.quantizer.test_fp16:_ReluThenBN",
              "kwargs": {"affine": False}, "input_shape": [1, 8, 8], "input_dtype": "float16"}
    save_artifact(half, tmp_path / "art", recipe, x[:1].half())
    stored = json.loads((tmp_path / "art" / "recipe.json").read_text())
    assert [a["action"] for a in stored["fp16_adjustments"]] == [KEPT_FLOAT32]
    loaded = load_artifact(tmp_path / "art")
    assert loaded.bn.running_var.dtype == torch.float32
    assert torch.equal(loaded.bn.running_var, model.bn.running_var)
    with torch.no_grad():
        assert torch.equal(loaded(x.half()), half(x.half()))


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
        self.head = nn.Linear(12, 4)

    def forward(self, x, embed: bool = False):
        x = self.body(x)
        if embed:
            return x
        return self.head(x)


def test_forward_kwargs_travel_with_the_artifact(tmp_path):
    torch.manual_seed(0)
    model, x = Embedder().eval(), torch.randn(40, 6)
    fixed = {"embed": True}
    converted = to_int8(model, [(x[:32], None)], calibration_batches=1, forward_kwargs=fixed)
    recipe = {"precision": "int8", "factory": f"{HERE}:Embedder", "kwargs": {},
              "input_shape": [6], "input_dtype": "float32"}
    files = save_artifact(converted, tmp_path / "art", recipe, x[:1])
    assert [f["path"] for f in files] == ["model.pt", "recipe.json", "model.torchscript.pt"]
    stored = json.loads((tmp_path / "art" / "recipe.json").read_text())
    assert stored["int8"]["forward_kwargs"] == fixed
    loaded = load_artifact(tmp_path / "art")
    scripted = torch.jit.load(tmp_path / "art" / "model.torchscript.pt")
    with torch.no_grad():
        assert loaded(x[32:], **fixed).shape == (8, 12)            # the embedding branch
        assert torch.equal(loaded(x[32:], **fixed), converted(x[32:], **fixed))
        assert torch.equal(scripted(x[32:]), converted(x[32:], **fixed))


def test_recipe_that_contradicts_the_model_is_refused(int8_artifact, tmp_path):
    converted, x, _ = int8_artifact
    with pytest.raises(ArtifactError, match=r"backend disagree.*'fbgemm'"):
        save_artifact(converted, tmp_path / "bad", _recipe("int8", backend="qnnpack"), x[:1])


def test_format_version_1_loads_only_without_the_fingerprint_check(tmp_path):
    # format 1 was written by quantize-all 0.1, whose int8 graphs are qconfig version 1's
    converted, x, folder = _int8_artifact(tmp_path / "art", qconfig_version=1)
    payload = torch.load(folder / "model.pt", weights_only=True)
    old = {k: payload[k] for k in ("format", "recipe", "state_dict")}
    old["format_version"] = 1
    old["recipe"] = {k: v for k, v in old["recipe"].items() if k != "int8"}
    torch.save(old, tmp_path / "v1.pt")
    with pytest.raises(ArtifactError, match=r"v1\.pt: artifact format_version 1 has no output "
                                            r"fingerprint.*check_fingerprint=False"):
        load_artifact(tmp_path / "v1.pt")
    assert load_artifact(tmp_path / "v1.pt", check_fingerprint=False).fingerprint_sqnr_db is None


# ----------------------------------------------------------------------------- pinning

TRAP = textwrap.dedent('''
    import pathlib, torch
    pathlib.Path({marker!r}).write_text("imported")       # runs on import

    def Net():
        return torch.nn.Linear(3, 2)
''')


@pytest.fixture
def trap(tmp_path):
    """An artifact whose recipe names a module that leaves a marker file when imported."""
    marker = tmp_path / "imported"
    (tmp_path / "qa_trap_factory.py").write_text(TRAP.format(marker=str(marker)))
    sys.path.insert(0, str(tmp_path))
    torch.manual_seed(0)
    model = nn.Linear(3, 2).eval()
    recipe = {"precision": "fp16", "factory": "qa_trap_factory:Net", "kwargs": {},
              "input_shape": [3], "input_dtype": "float16"}
    save_artifact(to_fp16(model), tmp_path / "art", recipe, None)
    try:
        yield tmp_path / "art", marker
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("qa_trap_factory", None)


def test_a_pinned_factory_refuses_any_other_before_importing_it(trap):
    folder, marker = trap
    for pin in ("torch.nn:Linear", ["torch.nn:Linear", "mypkg:Net"]):
        with pytest.raises(ArtifactError, match=r"names factory 'qa_trap_factory:Net', not "
                                                r"'mypkg:Net' or 'torch.nn:Linear'|not 'torch.nn:Linear'"):
            load_artifact(folder, factory=pin)
    with pytest.raises(ArtifactError, match=r"kwargs \{\} are not the pinned \{'in_features': 3\}"):
        load_artifact(folder, factory="qa_trap_factory:Net", kwargs={"in_features": 3})
    assert not marker.exists()
    load_artifact(folder, factory="qa_trap_factory:Net", kwargs={})   # the pinned one loads
    assert marker.exists()


def test_an_unpinned_load_trusts_the_recipe_and_imports_what_it_names(trap):
    folder, marker = trap
    load_artifact(folder)
    assert marker.read_text() == "imported"
