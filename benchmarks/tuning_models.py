"""Small digit classifiers with the blocks that make int8 hard, for the accuracy-tuning zoo.

Owns ``TUNING_ARCHS`` (name -> builder) and ``build`` (a zoo ``factory``:
``benchmarks.tuning_models:build`` with ``kwargs: {arch: NAME}``), and ``trained`` (a model trained
briefly on scikit-learn's digits, so its activations look like a trained net's). Every model
takes float32 ``[B, 1, 8, 8]`` digits and returns ``[B, 10]`` logits. Blocks: depthwise
convolutions, squeeze-excitation with SiLU/Sigmoid and ReLU/Hardsigmoid gates, SiLU, Hardswish,
PReLU, self-attention with LayerNorm and GELU, multi-layer LSTM and GRU. Attention here is a
plain block for tuning tests; the ViT/ConvNeXt/Swin-style models of the attention work live in
``benchmarks/attention_models.py``. Shared by ``benchmarks/tuning_zoo.py``,
``benchmarks/sensitivity.py`` and the tests. Must import only torch (and ``jobs.demo`` to train).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from benchmarks.models import SqueezeExcite, conv_bn
from jobs.demo.models import DepthwiseCNN, DigitsMLP, ResidualCNN

CLASSES = 10


class _Flat(nn.Module):
    """Adapts a flat-input model (``DigitsMLP``) to ``[B, 1, 8, 8]`` images."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.flatten(x, 1))


class MBConv(nn.Module):
    """EfficientNet block: 1x1 expand, 3x3 depthwise, SE (SiLU, Sigmoid), 1x1 project, skip."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(conv_bn(cin, mid, 1, act=nn.SiLU),
                                  conv_bn(mid, mid, 3, stride, groups=mid, act=nn.SiLU),
                                  SqueezeExcite(mid, nn.SiLU, nn.Sigmoid),
                                  conv_bn(mid, cout, 1, act=None))
        self.residual = cin == cout and stride == 1

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class HardswishBlock(nn.Module):
    """MobileNetV3 block: 1x1 expand, 5x5 depthwise, Hardswish, SE (ReLU, Hardsigmoid), project."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(conv_bn(cin, mid, 1, act=nn.Hardswish),
                                  conv_bn(mid, mid, 5, stride, groups=mid, act=nn.Hardswish),
                                  SqueezeExcite(mid, nn.ReLU, nn.Hardsigmoid),
                                  conv_bn(mid, cout, 1, act=None))
        self.residual = cin == cout and stride == 1

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class ConvNet(nn.Module):
    """Stride-2 stem (4x4 maps keep training fast), blocks, 1x1 head conv, global pool, linear."""

    def __init__(self, block: Callable, widths: tuple, strides: tuple, act=nn.ReLU, head: int = 256):
        super().__init__()
        self.stem = conv_bn(1, widths[0], 3, 2, act=act)
        blocks, cin = [], widths[0]
        for width, stride in zip(widths, strides):
            blocks.append(block(cin, width, stride))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(conv_bn(cin, head, 1, act=act), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(head, CLASSES))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class PReLUCNN(nn.Module):
    """MTCNN-style: conv + PReLU (per-channel slopes) three times, then linear + PReLU, linear."""

    def __init__(self, width: int = 64):
        super().__init__()
        layers, cin = [], 1
        for cout in (width, width, 2 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.PReLU(cout)]
            cin = cout
        self.features = nn.Sequential(*layers[:4], nn.MaxPool2d(2), *layers[4:])
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(cin * 16, 128), nn.PReLU(128))
        self.head = nn.Linear(128, CLASSES)

    def forward(self, x):
        return self.head(self.dense(self.features(x)))


class Attention(nn.Module):
    """Pre-norm transformer block: LayerNorm, multi-head self-attention (qkv Linear, matmul,
    softmax), residual; LayerNorm, GELU MLP, residual."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        x = x + self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """2x2 patches of the 8x8 digit (16 tokens), position embedding, attention blocks, mean pool."""

    def __init__(self, dim: int = 64, depth: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.position = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.Sequential(*[Attention(dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, CLASSES)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


class RowRNN(nn.Module):
    """Reads the digit row by row (8 steps of 8 pixels) through a 2-layer LSTM or GRU."""

    def __init__(self, kind: str = "lstm", hidden: int = 96, layers: int = 2):
        super().__init__()
        rnn = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = rnn(8, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        out, _ = self.rnn(x.reshape(x.shape[0], 8, 8))
        return self.head(out[:, -1])


TUNING_ARCHS: dict[str, Callable[[], nn.Module]] = {
    "residual-cnn": functools.partial(ResidualCNN, width=48),
    "depthwise-cnn": functools.partial(DepthwiseCNN, width=192, stem_stride=2),
    "digits-mlp": lambda: _Flat(DigitsMLP(hidden=256)),
    "mbconv-silu-se": functools.partial(ConvNet, MBConv, (32, 48, 64), (1, 1, 2), nn.SiLU),
    "hardswish-se": functools.partial(ConvNet, HardswishBlock, (32, 48, 64), (1, 1, 2), nn.Hardswish),
    "prelu-cnn": PReLUCNN,
    "tiny-vit": TinyViT,
    "lstm-2layer": functools.partial(RowRNN, "lstm"),
    "gru-2layer": functools.partial(RowRNN, "gru"),
}


def build(arch: str) -> nn.Module:
    """The zoo factory: a fresh, randomly initialised model of architecture ``arch``.

    Raises:
        KeyError: unknown ``arch`` (the message lists the known ones).
    """
    if arch not in TUNING_ARCHS:
        raise KeyError(f"unknown arch {arch!r}; known: {', '.join(TUNING_ARCHS)}")
    return TUNING_ARCHS[arch]()


def trained(arch: str, *, epochs: int = 4, seed: int = 0) -> tuple[nn.Module, float]:
    """``build(arch)`` trained on the digits split of ``jobs.demo``; (model in eval mode, held-out
    accuracy)."""
    from jobs.demo.build import digits_split, train

    torch.manual_seed(seed)
    model = build(arch)
    accuracy = train(model, arch, digits_split(seed), epochs=epochs, seed=seed)
    return model.eval(), accuracy
