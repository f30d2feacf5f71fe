"""The TorchScript copy: one flat module that gives the model's outputs, for fp16 and int8."""

import io
import re

import pytest
import torch
from torch import nn

from quantizer import to_fp16
from quantizer.errors import ArtifactError
from quantizer.torchscript import torchscript_bytes


class Nested(nn.Module):
    """Submodules two deep, a repeated block, a tied weight and a BatchNorm's buffers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
                                    for _ in range(2))
        self.head = nn.Linear(8, 8)
        self.tail = nn.Linear(8, 8)
        self.tail.weight = self.head.weight              # tied

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.tail(self.head(x.mean((2, 3))))


def _load(data: bytes):
    return torch.jit.load(io.BytesIO(data))


@pytest.fixture(scope="module")
def nested():
    torch.manual_seed(0)
    model = Nested().eval()
    with torch.no_grad():                                 # BatchNorm statistics that matter
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    return model, torch.randn(6, 3, 10, 10)


def test_fp16_copy_is_one_module_named_by_the_models_paths(nested):
    model, x = nested
    half = to_fp16(model)
    scripted = _load(torchscript_bytes(half, x[:1].half()))
    assert list(scripted.children()) == [] and not scripted.training
    want = {k.replace(".", "_") for k in half.state_dict()} - {"tail_weight"}   # tied: stored once
    assert set(scripted.state_dict()) == want
    assert "stem_1_running_var" in want and "blocks_1_0_weight" in want
    with torch.no_grad():
        assert torch.equal(scripted(x.half()), half(x.half()))


def test_int8_copy_holds_the_packed_weights_and_gives_the_outputs_exactly(nested):
    int8 = pytest.importorskip("quantizer.int8")
    model, x = nested
    converted = int8.to_int8(model, [x[:4]], calibration_batches=1)
    scripted = _load(torchscript_bytes(converted, x[:1]))
    assert list(scripted.children()) == []
    packed = set(re.findall(r"self\.(\w+_packed_params)\b", scripted.code))
    assert len(packed) == 3 + 2, packed                 # three convolutions, the linear pair
    assert "stem_0_conv__packed_params" in packed
    with torch.no_grad():
        assert torch.equal(scripted(x), converted(x))   # atol 0, rows it was not traced on


class _Clash(nn.Module):
    """``a_b.c`` and ``a.b_c`` both join to ``a_b_c``."""

    def __init__(self):
        super().__init__()
        self.a_b = nn.Module()
        self.a_b.c = nn.Parameter(torch.tensor([2.0]))
        self.a = nn.Module()
        self.a.b_c = nn.Parameter(torch.tensor([3.0]))

    def forward(self, x):
        return x * self.a_b.c + self.a.b_c


def test_paths_that_join_to_one_name_keep_both_tensors():
    scripted = _load(torchscript_bytes(_Clash(), torch.ones(2)))
    assert sorted(scripted.state_dict()) == ["a_b_c", "a_b_c_1"]
    assert torch.equal(scripted(torch.tensor([1.0, 2.0])), torch.tensor([5.0, 7.0]))


class _WithScripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.jit.script(nn.Linear(4, 3))
        self.outer = nn.Linear(3, 2)

    def forward(self, x):
        return self.outer(self.inner(x))


def test_a_model_holding_a_torchscript_submodule_is_traced_as_it_stands():
    torch.manual_seed(1)
    model, x = _WithScripted().eval(), torch.randn(5, 4)
    scripted = _load(torchscript_bytes(model, x[:1]))
    assert sorted(name for name, _ in scripted.named_children()) == ["inner", "outer"]
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x))


def test_no_example_is_an_artifact_error(nested):
    with pytest.raises(ArtifactError, match="no example input"):
        torchscript_bytes(nested[0], None)


class _Branchy(nn.Module):
    """Branches on the data: inputs with a positive mean go through one layer, others the other."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        if x.mean() > 0:
            return self.up(x)
        return self.down(x)


class _Recurrent(nn.Module):
    """torch's LSTM checks its hidden state's shape with a tensor comparison while traced."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[1][0][-1]


def test_a_copy_that_froze_a_branch_on_the_data_is_refused():
    torch.manual_seed(2)
    model, example = _Branchy().eval(), torch.ones(1, 4)      # the example takes "up"
    rows = torch.cat([torch.ones(3, 4), -torch.ones(1, 4)])   # row 3 takes "down"
    with pytest.raises(ArtifactError, match=r"on check row 3: the forward branches on tensor "
                                            r"values \(test_torchscript\.py:\d+\)"):
        torchscript_bytes(model, example, check_rows=rows)
    kept = _load(torchscript_bytes(model, example, check_rows=2 * torch.ones(5, 4)))
    with torch.no_grad():
        assert torch.equal(kept(torch.ones(2, 4)), model(torch.ones(2, 4)))
        assert not torch.equal(kept(-torch.ones(1, 4)), model(-torch.ones(1, 4)))   # why


def test_only_the_models_own_branches_count():
    import warnings

    from quantizer.torchscript import _BOOL_WARNING, _branches

    def traced_warnings(model, x):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.filterwarnings("always", _BOOL_WARNING, torch.jit.TracerWarning)
            torch.jit.trace(model, x, check_trace=False)
        return caught

    lstm = traced_warnings(_Recurrent().eval(), torch.randn(2, 5, 4))
    assert [w for w in lstm if _BOOL_WARNING in str(w.message)]   # torch's own shape check
    assert _branches(lstm) == ()
    branchy = _branches(traced_warnings(_Branchy().eval(), torch.ones(1, 4)))
    assert len(branchy) == 1 and branchy[0].startswith("test_torchscript.py:")
