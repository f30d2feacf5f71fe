"""Small, structurally different models for the bundled demo zoo (scikit-learn digits, 8x8 grey).

Each class is a zoo ``factory`` (``jobs.demo.models:ClassName``) taking plain keyword arguments,
so a checkpoint holds a ``state_dict`` only. The demo zoo lists ``ResidualCNN``, ``DigitsMLP``,
``DepthwiseCNN`` and ``GatedCNN`` (fp16 only: FX cannot trace it); ``LSTMClassifier`` and
``TupleOutputCNN`` exist for tests of the failure paths and odd outputs.
Every model's docstring states its input shape. Must import only torch.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualCNN", "DigitsMLP", "DepthwiseCNN", "GatedCNN", "LSTMClassifier",
           "TupleOutputCNN", "DEMO_MODELS", "TEST_MODELS", "FLAT_INPUT_MODELS"]


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class _ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(width, width)
        self.conv2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(width))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.conv1(x)))


class ResidualCNN(nn.Module):
    """Conv-BN-ReLU stem, residual blocks with skip adds, global average pool, linear head.

    Input: float32 ``[B, 1, 8, 8]``. Output: logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, blocks: int = 2):
        super().__init__()
        self.stem = _conv_bn_relu(1, width)
        self.blocks = nn.Sequential(*[_ResidualBlock(width) for _ in range(blocks)])
        self.down = _conv_bn_relu(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.blocks(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


class DigitsMLP(nn.Module):
    """Plain multilayer perceptron on the flattened image.

    Input: float32 ``[B, 64]`` (the 8x8 image flattened; the demo zoo feeds it ``calib/flat``).
    Output: logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 128,
                 layers: int = 2):
        super().__init__()
        dims = [in_features] + [hidden] * layers
        body = []
        for cin, cout in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(cin, cout), nn.ReLU()]
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DepthwiseCNN(nn.Module):
    """MobileNet-style depthwise-separable convolutions (3x3 depthwise, then 1x1 pointwise).

    Input: float32 ``[B, 1, 8, 8]``. Output: logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, width: int = 24, stem_stride: int = 1):
        super().__init__()
        # A wide net on a stride-2 stem keeps the compute small: per-channel int8 scales cost
        # 16 bytes per channel, which only wide pointwise layers amortise.
        self.stem = _conv_bn_relu(1, width, stride=stem_stride)
        self.separable = nn.Sequential(*[self._separable(width, stride) for stride in (1, 2, 1)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    @staticmethod
    def _separable(width: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=width, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.separable(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


class GatedCNN(nn.Module):
    """A CNN whose forward branches on the data: ``if x.mean() > threshold`` picks one of two blocks.

    The branch depends on tensor values, so ``torch.fx.symbolic_trace`` cannot trace it and FX int8
    quantization is impossible: fp16 only. On digits scaled to [0, 1] the default threshold sends
    about 55% of single images one way and 45% the other, and batch means sit near it too, so
    training reaches both blocks. Input: float32 ``[B, 1, 8, 8]``. Output: logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, threshold: float = 0.3):
        super().__init__()
        self.threshold = threshold
        self.features = nn.Sequential(_conv_bn_relu(1, width), _conv_bn_relu(width, width, stride=2))
        self.bright = _conv_bn_relu(width, width)
        self.dark = _conv_bn_relu(width, width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # data-dependent control flow (the whole point of this model): a Python bool of a tensor
        bright = bool(x.mean() > self.threshold)
        x = self.features(x)
        if bright:
            x = self.bright(x)
        else:
            x = self.dark(x)
        return self.head(torch.flatten(self.pool(x), 1))


class LSTMClassifier(nn.Module):
    """Reads the image row by row as a sequence of 8 steps of 8 pixels through an ``nn.LSTM``.

    FX static int8 quantization leaves ``nn.LSTM`` in float, so most parameters stay fp32: the
    orchestrator must fail such a row rather than ship it as int8. Not in the demo zoo.
    Input: float32 ``[B, 1, 8, 8]``. Output: logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, hidden: int = 64, rows: int = 8, cols: int = 8):
        super().__init__()
        self.rows, self.cols = rows, cols
        self.lstm = nn.LSTM(cols, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(x.shape[0], self.rows, self.cols)
        out, _ = self.lstm(seq)
        return self.head(out[:, -1])


class TupleOutputCNN(nn.Module):
    """A small CNN returning ``(logits [B, num_classes], features [B, width])``.

    For tests of models whose output is not a single tensor. Not in the demo zoo.
    Input: float32 ``[B, 1, 8, 8]``.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(_conv_bn_relu(1, width), _conv_bn_relu(width, width, stride=2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.head(features), features


# name in the zoo -> (class, kwargs); the demo zoo lists these
DEMO_MODELS = {
    "residual-cnn": (ResidualCNN, {"num_classes": 10, "width": 48}),
    "digits-mlp": (DigitsMLP, {"num_classes": 10, "hidden": 320}),
    "depthwise-cnn": (DepthwiseCNN, {"num_classes": 10, "width": 384, "stem_stride": 2}),
    "gated-cnn": (GatedCNN, {"num_classes": 10, "width": 16}),
}
# only in zoo-tests.yaml: rows that are expected to fail (or need care) in int8
TEST_MODELS = {
    "lstm-classifier": (LSTMClassifier, {"num_classes": 10, "hidden": 64}),
    "tuple-output-cnn": (TupleOutputCNN, {"num_classes": 10, "width": 96}),
}
FLAT_INPUT_MODELS = frozenset({"digits-mlp"})
