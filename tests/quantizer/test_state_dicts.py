"""Checkpoints as people have them: nested dicts, extra entries, DDP/Lightning prefixes, version
metadata, safetensors files under any name, and files saved from CUDA tensors."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from quantizer.checkpoints import load_model, load_state_dict
from quantizer.errors import CheckpointError, CheckpointKeysError
from tests.quantizer.archs import MiniMNASNet

FACTORY = "tests.quantizer.test_state_dicts:Encoder"


class Encoder(nn.Module):
    """A small stand-in for Resemblyzer's speaker encoder: LSTM, linear, ReLU."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        _, (hidden, _) = self.lstm(x)
        return torch.relu(self.linear(hidden[-1]))


class Wrapped(nn.Module):
    """What DDP and Lightning save: the model under ``module`` / ``model``."""

    def __init__(self, inner: nn.Module, attr: str = "module"):
        super().__init__()
        setattr(self, attr, inner)


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return Encoder().eval()


def _write(tmp_path, obj, name="ckpt.pt") -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def _same(model: nn.Module, reference: nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values()))


def _training_checkpoint(encoder: Encoder) -> dict:
    """Resemblyzer's layout: step, model_state (+ loss parameters), optimizer_state."""
    state = encoder.state_dict()
    state["similarity_weight"] = torch.tensor([10.0])
    state["similarity_bias"] = torch.tensor([-5.0])
    optimizer = torch.optim.Adam(encoder.parameters())
    return {"step": 1000, "model_state": state, "optimizer_state": optimizer.state_dict()}


# ----------------------------------------------------------------------------- nested dicts


def test_nested_checkpoint_error_lists_the_keys_and_suggests_checkpoint_key(encoder, tmp_path):
    path = _write(tmp_path, _training_checkpoint(encoder))
    with pytest.raises(CheckpointError) as info:
        load_model(FACTORY, path)
    message = str(info.value)
    assert type(info.value) is CheckpointError and path in message
    assert "'step', 'model_state', 'optimizer_state'" in message
    assert "`checkpoint_key: model_state`" in message


def test_checkpoint_key_and_ignore_keys_load_a_training_checkpoint(encoder, tmp_path):
    path = _write(tmp_path, _training_checkpoint(encoder))
    with pytest.raises(CheckpointKeysError, match=r"unexpected keys: similarity_weight, "
                                                  r"similarity_bias.*`ignore_keys: \[similarity_\*\]`"):
        load_model(FACTORY, path, checkpoint_key="model_state")
    loaded = load_model(FACTORY, path, checkpoint_key="model_state", ignore_keys=["similarity_*"])
    assert _same(loaded, encoder)


def test_dotted_checkpoint_keys_walk_nested_dicts(encoder, tmp_path):
    path = _write(tmp_path, {"ema": {"model": encoder.state_dict()}, "cfg.v2": {"net": encoder.state_dict()}})
    assert _same(load_model(FACTORY, path, checkpoint_key="ema.model"), encoder)
    assert _same(load_model(FACTORY, path, checkpoint_key="cfg.v2.net"), encoder)  # a dotted key
    with pytest.raises(CheckpointError, match=r"checkpoint_key 'ema\.student' not found; this level "
                                              r"holds keys 'model'"):
        load_model(FACTORY, path, checkpoint_key="ema.student")


def test_state_dict_and_model_wrappers_still_unwrap_by_themselves(encoder, tmp_path):
    for key in ("state_dict", "model"):
        path = _write(tmp_path, {key: encoder.state_dict(), "epoch": 3})
        assert _same(load_model(FACTORY, path), encoder)


# ----------------------------------------------------------------------------- prefixes


@pytest.mark.parametrize("attr", ["module", "model"])
def test_ddp_and_lightning_prefixes_come_off_when_only_that_fits(encoder, tmp_path, attr):
    path = _write(tmp_path, Wrapped(encoder, attr).state_dict())
    assert _same(load_model(FACTORY, path), encoder)
    # explicitly, too; and a glob in ignore_keys sees the key without the prefix
    state = Wrapped(encoder, attr).state_dict()
    state[f"{attr}.similarity_weight"] = torch.ones(1)
    path = _write(tmp_path, state)
    loaded = load_model(FACTORY, path, strip_prefix=[f"{attr}."], ignore_keys=["similarity_*"])
    assert _same(loaded, encoder)


def test_no_automatic_strip_when_the_stripped_keys_do_not_fit(encoder, tmp_path):
    state = Wrapped(encoder).state_dict()
    state["module.extra.weight"] = torch.ones(1)
    path = _write(tmp_path, state)
    with pytest.raises(CheckpointKeysError, match=r"`strip_prefix: \[module\.\]`"):
        load_model(FACTORY, path)


def test_other_prefixes_are_suggested(encoder, tmp_path):
    path = _write(tmp_path, Wrapped(encoder, "backbone").state_dict())
    with pytest.raises(CheckpointKeysError, match=r"missing keys: lstm\.weight_ih_l0.*unexpected keys: "
                                                  r"backbone\.lstm.*`strip_prefix: \[backbone\.\]`"):
        load_model(FACTORY, path)
    assert _same(load_model(FACTORY, path, strip_prefix=["backbone."]), encoder)


def test_a_strip_that_merges_two_keys_is_refused(encoder, tmp_path):
    state = {**encoder.state_dict(), **Wrapped(encoder).state_dict()}
    path = _write(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"strip_prefix 'module\.' maps both "
                                              r"'lstm\.weight_ih_l0' and 'module\.lstm\.weight_ih_l0'"):
        load_state_dict(path, strip_prefix=["module."])


# ----------------------------------------------------------------------------- _metadata


def _mnasnet(alpha: float = 1.0) -> MiniMNASNet:
    torch.manual_seed(1)
    return MiniMNASNet(alpha=alpha).eval()


def test_state_dict_metadata_reaches_version_checks(tmp_path):
    """torchvision's mnasnet: `torch.save(model.state_dict())` must load (it reads _metadata)."""
    model = _mnasnet()
    path = _write(tmp_path, model.state_dict())
    loaded = load_model("tests.quantizer.archs:MiniMNASNet", path)
    assert _same(loaded, model) and loaded._version == 2
    bare = model.state_dict()
    del bare._metadata                    # what the loader used to hand over
    with pytest.raises(CheckpointKeysError, match=r"version shluld be set to 1 or 2 instead of None"):
        load_model("tests.quantizer.archs:MiniMNASNet", _write(tmp_path, bare, "bare.pt"))
    # nested under a key, behind a DDP prefix (auto or explicit): the versions follow the keys
    nested = _write(tmp_path, {"model_state": Wrapped(model).state_dict()}, "nested.pt")
    for strip in ((), ("module.",)):
        loaded = load_model("tests.quantizer.archs:MiniMNASNet", nested,
                            checkpoint_key="model_state", strip_prefix=strip)
        assert _same(loaded, model)


def test_version_1_metadata_takes_the_v1_path(tmp_path):
    old = _mnasnet(alpha=0.5)
    old.use_v1_stem()                     # a checkpoint saved by version 1: 16-channel stem
    path = _write(tmp_path, old.state_dict())
    with pytest.warns(UserWarning, match="previous version"):
        loaded = load_model("tests.quantizer.archs:MiniMNASNet", path, kwargs={"alpha": 0.5})
    assert loaded._version == 1 and loaded.layers[0].out_channels == 16 and _same(loaded, old)
    bare = old.state_dict()
    del bare._metadata                    # without versions: v2 shapes, and MNASNet says why
    with pytest.raises(CheckpointKeysError, match=r"shape mismatches: layers\.0\.weight.*"
                                                  r"version shluld be set to 1 or 2 instead of None"):
        load_model("tests.quantizer.archs:MiniMNASNet", _write(tmp_path, bare, "bare.pt"),
                   kwargs={"alpha": 0.5})


# ----------------------------------------------------------------------------- file formats


def test_safetensors_load_by_content_whatever_the_name(encoder, tmp_path):
    data = safetensors_bytes({k: v.contiguous() for k, v in encoder.state_dict().items()})
    for name in ("weights.safetensors", "weights.bin", "weights.pt"):
        (tmp_path / name).write_bytes(data)
        assert _same(load_model(FACTORY, tmp_path / name), encoder)
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated or corrupt safetensors file"):
        load_state_dict(tmp_path / "cut.pt")


def test_safetensors_with_a_prefix_and_extra_entries(encoder, tmp_path):
    tensors = {f"model.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    tensors["model.similarity_bias"] = torch.zeros(1)
    (tmp_path / "w.safetensors").write_bytes(safetensors_bytes(tensors))
    loaded = load_model(FACTORY, tmp_path / "w.safetensors", strip_prefix=["model."],
                        ignore_keys=["similarity_*"])
    assert _same(loaded, encoder)


def test_files_saved_from_cuda_tensors_load_on_cpu(encoder, tmp_path):
    buf = io.BytesIO()
    torch.save(encoder.state_dict(), buf, _use_new_zipfile_serialization=False)
    # the storages' location tag, as a GPU machine writes it (Resemblyzer's pretrained.pt)
    data = buf.getvalue().replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    assert b"cuda:0" in data
    (tmp_path / "gpu.pt").write_bytes(data)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=True)       # what a plain load does
    assert _same(load_model(FACTORY, tmp_path / "gpu.pt"), encoder)
