"""Tiny real models and data for the conversion tests.

The models are trained for a few steps on scikit-learn's bundled digits (8x8 images) so their
activations look like a trained net's: SQNR on a random-init net means little. Layer sizes keep
weights dominant (~95k and ~85k parameters) so serialized-size ratios measure the weights, not
torch.save's per-tensor overhead.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-bn-relu x2, max-pool, linear: the shape FX quantizes end to end."""

    def __init__(self, width: int = 64, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """64 -> 256 -> 256 -> 10 on flattened digits."""

    def __init__(self, hidden: int = 256, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LSTMClassifier(nn.Module):
    """An LSTM with a small linear head: FX quantizes the head only."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 64, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int = 0,
          batch_size: int = 64, lr: float = 2e-3) -> nn.Module:
    """Adam on cross-entropy with a fixed seed; returns the model in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def batches(x: torch.Tensor, y: torch.Tensor, size: int, count: int) -> list[tuple]:
    """``count`` consecutive ``(inputs, targets)`` batches, as a calibration loader."""
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(count)]


def state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        after[key].dtype == value.dtype and torch.equal(after[key], value)
        for key, value in before.items())


@pytest.fixture(scope="session")
def digits() -> dict[str, torch.Tensor]:
    """Digits as (N, 1, 8, 8) images in [0, 1]: 1397 train rows, 400 held-out rows (fixed split)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    return {"x_train": x[:-400], "y_train": y[:-400], "x_test": x[-400:], "y_test": y[-400:]}


@pytest.fixture(scope="session")
def _trained_cnn(digits) -> nn.Module:
    return train(SmallCNN(), digits["x_train"], digits["y_train"], epochs=2)


@pytest.fixture(scope="session")
def _trained_mlp(digits) -> nn.Module:
    return train(MLP(), digits["x_train"].flatten(1), digits["y_train"], epochs=3)


@pytest.fixture
def cnn(_trained_cnn) -> nn.Module:
    """A trained SmallCNN, fresh per test (tests may check it is left untouched)."""
    return copy.deepcopy(_trained_cnn)


@pytest.fixture
def mlp(_trained_mlp) -> nn.Module:
    """A trained MLP, fresh per test."""
    return copy.deepcopy(_trained_mlp)


@pytest.fixture
def cnn_loader(digits) -> list[tuple]:
    """10 calibration batches of 32 training images."""
    return batches(digits["x_train"], digits["y_train"], 32, 10)


@pytest.fixture
def mlp_loader(digits) -> list[tuple]:
    """10 calibration batches of 32 flattened training images."""
    return batches(digits["x_train"].flatten(1), digits["y_train"], 32, 10)
