"""Safe checkpoint loading, factories, and artifacts that reload without trusting pickles."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch

from quantizer.artifacts import load_artifact, save_artifact
from quantizer.calibration import read_calibration, write_calibration
from quantizer.checkpoints import file_digest, import_factory, load_model, load_state_dict, read_bytes
from quantizer.errors import (ArtifactError, CheckpointError, CheckpointKeysError, FactoryError,
                              UnsafePickleError)
from quantizer.fp16 import to_fp16

MODULE = "qa_ckpt_models"
SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    class TinyCNN(nn.Module):
        def __init__(self, width=8, classes=4):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(width * 4 * 4, classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))
''')


@pytest.fixture(scope="module")
def models_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pkg")
    (folder / f"{MODULE}.py").write_text(SOURCE)
    sys.path.insert(0, str(folder))
    try:
        yield __import__(MODULE)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(MODULE, None)


@pytest.fixture
def tiny(models_module, tmp_path):
    torch.manual_seed(0)
    model = models_module.TinyCNN().eval()
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return model, str(path)


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


# ----------------------------------------------------------------------------- factories


def test_import_factory_finds_dotted_callables(models_module):
    assert import_factory("torch.nn:Linear") is torch.nn.Linear
    assert import_factory(f"{MODULE}:TinyCNN") is models_module.TinyCNN
    assert import_factory("torch.nn:init.zeros_") is torch.nn.init.zeros_


@pytest.mark.parametrize("spec, pattern", [
    ("torch.nn.Linear", r"'torch\.nn\.Linear'.*expected 'package\.module:callable'"),
    ("torch.nn:", "expected"),
    ("no_such_pkg_qa:Net", r"'no_such_pkg_qa:Net'.*cannot import module.*install.*PYTHONPATH"),
    ("torch.nn:Lineer", r"'torch\.nn:Lineer'.*no attribute 'Lineer'.*spelling"),
    ("math:pi", r"'math:pi'.*not callable"),
])
def test_import_factory_errors_name_spec_and_remedy(spec, pattern):
    with pytest.raises(FactoryError, match=pattern):
        import_factory(spec)


def test_load_model_wraps_factory_call_errors(tiny):
    with pytest.raises(FactoryError, match=r"torch\.nn:Linear.*bogus"):
        load_model("torch.nn:Linear", tiny[1], kwargs={"bogus": 1})
    with pytest.raises(FactoryError, match="not an nn.Module"):
        load_model("builtins:dict", tiny[1])


# ----------------------------------------------------------------------------- loading


def test_load_model_round_trip_eval_float32(tiny, models_module):
    model, path = tiny
    loaded = load_model(f"{MODULE}:TinyCNN", path)
    assert not loaded.training and all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    # the same from a file:// URI, and from an fp16 checkpoint wrapped under "model"
    assert torch.equal(load_state_dict(f"file://{path}")["fc.weight"], model.fc.weight)
    half = {k: v.half() for k, v in model.state_dict().items()}
    wrapped = os.path.join(os.path.dirname(path), "wrapped.pt")
    torch.save({"model": half, "epoch": 3}, wrapped)
    loaded = load_model(models_module.TinyCNN, wrapped)
    assert loaded.fc.weight.dtype == torch.float32
    assert torch.equal(loaded.fc.weight, model.fc.weight.half().float())


def test_state_dict_wrapper_key(tiny):
    model, path = tiny
    torch.save({"state_dict": model.state_dict(), "optimizer": {}}, path)
    assert set(load_state_dict(path)) == set(model.state_dict())


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: not found"):
        load_state_dict(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: checkpoint is empty"):
        load_state_dict(tmp_path / "empty.pt")


@pytest.mark.parametrize("damage", ["first_half", "random", "text"])
def test_corrupt_bytes_are_checkpoint_errors_not_unsafe(tiny, damage):
    model, path = tiny
    good = open(path, "rb").read()
    bad = {"first_half": good[: len(good) // 2], "random": os.urandom(4096),
           "text": b"this is not a checkpoint\n"}[damage]
    open(path, "wb").write(bad)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_state_dict(path)
    assert type(info.value) is CheckpointError and path in str(info.value)


def test_wrong_keys_and_wrong_shapes_are_listed(tiny, models_module, tmp_path):
    model, _ = tiny
    renamed = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointKeysError, match=r"renamed\.pt.*missing keys: conv\.weight.*"
                                                  r"unexpected keys: backbone\.conv\.weight"):
        load_model(f"{MODULE}:TinyCNN", tmp_path / "renamed.pt")
    torch.save(models_module.TinyCNN(width=4).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(CheckpointKeysError, match=r"narrow\.pt.*shape mismatches: conv\.weight "
                                                  r"\(checkpoint \[4, 1, 3, 3\], model \[8, 1, 3, 3\]\)"):
        load_model(f"{MODULE}:TinyCNN", tmp_path / "narrow.pt")


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_pickled_module_refused_unless_allowed(tiny, zipped):
    model, path = tiny
    torch.save(model, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsafePickleError) as info:
        load_model(f"{MODULE}:TinyCNN", path)
    message = str(info.value)
    for needle in (path, "TinyCNN", "arbitrary code", "allow_pickle: true", "--allow-unsafe-pickle"):
        assert needle in message
    loaded = load_model(f"{MODULE}:TinyCNN", path, allow_pickle=True)
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpensFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("payload", ["torch_system", "raw_system", "torch_open"])
def test_malicious_pickle_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    data = {"torch_system": lambda: _save({"w": _RunsShell(marker)}),
            "raw_system": lambda: pickle.dumps(_RunsShell(marker)),
            "torch_open": lambda: _save({"w": _OpensFile(str(marker))})}[payload]()
    assert not marker.exists()
    (tmp_path / "evil.pt").write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"evil\.pt.*(system|open)"):
        load_state_dict(tmp_path / "evil.pt")
    with pytest.raises(ArtifactError, match=r"evil\.pt"):
        load_artifact(tmp_path / "evil.pt")
    assert not marker.exists()


def test_read_bytes_and_file_digest(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)          # spans several read chunks
    (tmp_path / "blob").write_bytes(data)
    assert read_bytes((tmp_path / "blob").as_uri()) == data
    assert file_digest(tmp_path / "blob") == (hashlib.sha256(data).hexdigest(), len(data))
    assert file_digest((tmp_path / "blob").as_uri())[0] == hashlib.sha256(data).hexdigest()
    with pytest.raises(CheckpointError, match="not found"):
        file_digest(tmp_path / "none")


# ----------------------------------------------------------------------------- artifacts


def _recipe(precision, **extra):
    return {"precision": precision, "factory": f"{MODULE}:TinyCNN", "kwargs": {"width": 8},
            "backend": "fbgemm", "observer": "default", "input_shape": [1, 8, 8],
            "input_dtype": "float16" if precision == "fp16" else "float32",
            "torch_version": str(torch.__version__), **extra}


def _check_files(folder, files):
    for entry in files:
        data = open(os.path.join(folder, entry["path"]), "rb").read()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert sorted(os.listdir(folder)) == sorted(e["path"] for e in files)   # no temp files


def test_fp16_artifact_round_trip_is_bit_identical(tiny, tmp_path):
    half = to_fp16(tiny[0])
    folder = tmp_path / "art"
    files = save_artifact(half, folder, _recipe("fp16"), X[:1].half())
    assert [f["path"] for f in files] == ["model.pt", "recipe.json", "model.torchscript.pt"]
    _check_files(folder, files)
    assert json.loads((folder / "recipe.json").read_text()) == {**_recipe("fp16"),
                                                                 "fp16_adjustments": []}
    payload = torch.load(folder / "model.pt", weights_only=True)
    assert payload["format"] == "quantize-all-artifact" and payload["format_version"] == 2
    with torch.no_grad():
        expected = half(X.half())
        for source in (folder, folder / "model.pt", (folder / "model.pt").as_uri()):
            loaded = load_artifact(source)
            assert loaded.fc.weight.dtype == torch.float16 and not loaded.training
            assert torch.equal(loaded(X.half()), expected)
        scripted = torch.jit.load(folder / "model.torchscript.pt")
        assert torch.equal(scripted(X.half()), expected)
        example = X[:1].half()
        assert torch.allclose(scripted(example), half(example), rtol=0, atol=1e-3)


def test_untraceable_model_still_gets_an_artifact(tiny, tmp_path):
    folder, half = tmp_path / "art", to_fp16(tiny[0])
    save_artifact(half, folder, _recipe("fp16"), X[:1].half())     # traceable: a TorchScript copy
    files = save_artifact(half, folder, _recipe("fp16"), torch.zeros(1, 3, 8, 8).half())  # wrong shape
    assert [f["path"] for f in files] == ["model.pt", "recipe.json"]
    recipe = json.loads((folder / "recipe.json").read_text())
    assert "RuntimeError" in recipe.pop("torchscript_error")
    assert recipe == {**_recipe("fp16"), "fp16_adjustments": []}
    _check_files(folder, files)
    assert load_artifact(folder).fc.weight.dtype == torch.float16


class _CountsCalls(torch.nn.Module):
    """Python state a trace freezes: the traced copy keeps adding 1, the module adds 1, 2, ..."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x) + self.calls


def test_traced_copy_that_disagrees_with_the_module_is_dropped(tmp_path):
    folder = tmp_path / "art"
    recipe = _recipe("fp16", input_shape=[4], input_dtype="float32")
    files = save_artifact(_CountsCalls(), folder, recipe, torch.ones(1, 4))
    assert [f["path"] for f in files] == ["model.pt", "recipe.json"]
    recipe = json.loads((folder / "recipe.json").read_text())
    assert "outputs differ from the module's on the example" in recipe["torchscript_error"]
    _check_files(folder, files)


def test_save_artifact_refuses_non_json_recipe(tiny, tmp_path):
    with pytest.raises(ArtifactError, match="JSON"):
        save_artifact(tiny[0], tmp_path / "a", _recipe("fp16", when=object()), X[:1])
    assert not (tmp_path / "a").exists()


def test_bad_artifacts_name_the_path(tiny, tmp_path):
    model, path = tiny
    with pytest.raises(ArtifactError, match=r"nothing/model\.pt: not found"):
        load_artifact(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match=r"tiny\.pt: not a quantize-all artifact"):
        load_artifact(path)                                  # a plain state_dict
    (tmp_path / "junk.pt").write_bytes(os.urandom(999))
    with pytest.raises(ArtifactError, match=r"junk\.pt: not a readable artifact"):
        load_artifact(tmp_path / "junk.pt")
    save_artifact(to_fp16(model), tmp_path / "art", _recipe("fp16"), X[:1].half())
    payload = torch.load(tmp_path / "art" / "model.pt", weights_only=True)
    torch.save({**payload, "format_version": 3}, tmp_path / "v3.pt")
    with pytest.raises(ArtifactError, match=r"v3\.pt: artifact format_version 3"):
        load_artifact(tmp_path / "v3.pt")
    torch.save({**payload, "recipe": _recipe("fp16", kwargs={"width": 4})}, tmp_path / "w4.pt")
    with pytest.raises(ArtifactError, match=r"w4\.pt: state_dict does not fit.*shape mismatches"):
        load_artifact(tmp_path / "w4.pt")


def test_int8_artifact_round_trip_is_bit_identical(tiny, tmp_path):
    int8 = pytest.importorskip("quantizer.int8")
    model, _ = tiny
    x = np.random.default_rng(3).standard_normal((64, 1, 8, 8)).astype(np.float32)
    write_calibration(tmp_path / "calib", x, rows_per_shard=16)
    converted = int8.to_int8(model, read_calibration(tmp_path / "calib", batch_size=8),
                             calibration_batches=4)
    folder = tmp_path / "int8"
    files = save_artifact(converted, folder, _recipe("int8"), torch.from_numpy(x[:1]))
    _check_files(folder, files)
    torch.backends.quantized.engine = "qnnpack"        # load_artifact must set it back
    loaded = load_artifact(folder.as_uri())
    assert torch.backends.quantized.engine == "fbgemm"
    assert any(v.dtype == torch.qint8 for v in loaded.state_dict().values()
               if isinstance(v, torch.Tensor))
    assert "torchscript_error" not in json.loads((folder / "recipe.json").read_text())
    scripted = torch.jit.load(folder / "model.torchscript.pt")
    example = torch.from_numpy(x[:1])
    with torch.no_grad():
        assert torch.equal(loaded(X), converted(X))
        assert torch.equal(scripted(example), converted(example))      # atol 0
        assert torch.equal(scripted(X), converted(X))
