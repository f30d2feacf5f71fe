"""The benchmark zoo: 16 structurally different CNNs of ResNet-18 scale (5-12 M parameters).

Owns ``ARCHS`` (name -> builder) and ``build`` (the zoo ``factory``: ``benchmarks.models:build``
with ``kwargs: {arch: NAME}``). Every model takes float32 ``[B, 3, 64, 64]`` images (stride-4
stem, as ImageNet ResNets, so stage 1 runs at 16x16) and returns ``[B, num_classes]`` logits.
They differ in what matters to a converter and to int8 kernels: depth, width, block type
(basic, bottleneck, pre-activation, inverted residual, dense, inception), kernel size (3/5/7),
dilation, grouped and depthwise convolutions, squeeze-excitation multiplies, channel shuffle,
activations (ReLU, ReLU6, Hardswish, LeakyReLU). All are FX-traceable. Defined here so the
benchmarks download nothing. Must import only torch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

INPUT_SHAPE = (3, 64, 64)
NUM_CLASSES = 100


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
            dilation: int = 1, act: Callable[[], nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, dilation * (k - 1) // 2, dilation=dilation,
                        groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Identity() if cin == cout and stride == 1 else conv_bn(cin, cout, 1, stride, act=None)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, act=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        mid = max(8, c // 4)
        self.fc = nn.Sequential(nn.Conv2d(c, mid, 1), act(), nn.Conv2d(mid, c, 1), gate())

    def forward(self, x):
        return x * self.fc(self.pool(x))


class Basic(nn.Module):
    """ResNet basic block; optional kernel size, dilation, squeeze-excitation, activation."""

    def __init__(self, cin, cout, stride, k=3, dilation=1, se=False, act=nn.ReLU):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, k, stride, dilation=dilation, act=act),
                                  conv_bn(cout, cout, k, 1, dilation=dilation, act=None),
                                  SqueezeExcite(cout) if se else nn.Identity())
        self.short, self.act = _shortcut(cin, cout, stride), act()

    def forward(self, x):
        return self.act(self.body(x) + self.short(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (optionally grouped: ResNeXt), 1x1 expand, residual add."""

    def __init__(self, cin, cout, stride, groups=1, mid_ratio=0.25):
        super().__init__()
        mid = max(groups, int(cout * mid_ratio) // groups * groups)
        self.body = nn.Sequential(conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, stride, groups=groups),
                                  conv_bn(mid, cout, 1, act=None))
        self.short, self.act = _shortcut(cin, cout, stride), nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + self.short(x))


class PreAct(nn.Module):
    """Pre-activation block: BN-ReLU-conv twice (BN cannot fold into a preceding conv)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.mid = nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False))
        self.short = (nn.Identity() if cin == cout and stride == 1
                      else nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        y = self.pre(x)
        return self.mid(self.conv1(y)) + self.short(x)


class Inverted(nn.Module):
    """MobileNet inverted residual: 1x1 expand, kxk depthwise, (SE), 1x1 project."""

    def __init__(self, cin, cout, stride, expand=6, k=3, act=nn.ReLU6, se=False):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(conv_bn(cin, mid, 1, act=act),
                                  conv_bn(mid, mid, k, stride, groups=mid, act=act),
                                  SqueezeExcite(mid, nn.ReLU, nn.Hardsigmoid) if se else nn.Identity(),
                                  conv_bn(mid, cout, 1, act=None))
        self.residual = cin == cout and stride == 1

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class Shuffle(nn.Module):
    """ShuffleNet unit: grouped 1x1, channel shuffle (view/transpose), depthwise 3x3, grouped 1x1."""

    def __init__(self, cin, cout, stride, groups=4):
        super().__init__()
        self.groups, mid = groups, cout // 4 // groups * groups
        self.reduce = conv_bn(cin, mid, 1, groups=groups)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid, act=None)
        self.expand = conv_bn(mid, cout, 1, groups=groups, act=None)
        self.short, self.act = _shortcut(cin, cout, stride), nn.ReLU()

    def forward(self, x):
        y = self.reduce(x)
        b, c, h, w = y.shape
        y = y.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.act(self.expand(self.dw(y)) + self.short(x))


class Dense(nn.Module):
    """DenseNet block: each layer's output concatenated to its input, then a 1x1 transition."""

    def __init__(self, cin, cout, stride, layers=4, growth=64):
        super().__init__()
        self.layers = nn.ModuleList(conv_bn(cin + i * growth, growth, 3) for i in range(layers))
        self.transition = nn.Sequential(conv_bn(cin + layers * growth, cout, 1),
                                        nn.AvgPool2d(2) if stride == 2 else nn.Identity())

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.transition(x)


class Inception(nn.Module):
    """Four branches (1x1, 3x3, two 3x3, pool + 1x1) concatenated."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        q = cout // 4
        self.b1 = conv_bn(cin, q, 1, stride)
        self.b3 = nn.Sequential(conv_bn(cin, q, 1), conv_bn(q, q, 3, stride))
        self.b5 = nn.Sequential(conv_bn(cin, q, 1), conv_bn(q, q, 3), conv_bn(q, q, 3, stride))
        self.bp = nn.Sequential(nn.MaxPool2d(3, stride, 1), conv_bn(cin, cout - 3 * q, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class Plain(nn.Module):
    """VGG stage unit: two convolutions, no skip connection; a max-pool does the striding."""

    def __init__(self, cin, cout, stride, act=nn.ReLU):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, act=act), conv_bn(cout, cout, act=act),
                                  nn.MaxPool2d(2) if stride == 2 else nn.Identity())

    def forward(self, x):
        return self.body(x)


class Net(nn.Module):
    """Stride-4 stem, four stages of ``block`` (first block of stages 2-4 strides), pool, linear."""

    def __init__(self, block, widths, depths, stem=64, strides=(1, 2, 2, 2), num_classes=NUM_CLASSES,
                 stem_k=7, **block_kwargs):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem, stem_k, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], stem
        for width, depth, stride in zip(widths, depths, strides):
            for i in range(depth):
                stages.append(block(cin, width, stride if i == 0 else 1, **block_kwargs))
                cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


# name -> (block, widths, depths, extra Net/block kwargs)
ARCHS: dict[str, tuple] = {
    "resnet18": (Basic, (64, 128, 256, 512), (2, 2, 2, 2), {}),
    "resnet10-wide": (Basic, (96, 192, 384, 576), (1, 1, 1, 1), {"stem": 96}),
    "resnet26-narrow": (Basic, (48, 96, 192, 368), (3, 4, 6, 3), {"stem": 48}),
    "preact-resnet18": (PreAct, (64, 128, 256, 512), (2, 2, 2, 2), {}),
    "bottleneck-resnet": (Bottleneck, (256, 512, 768, 1024), (2, 2, 3, 2), {}),
    "resnext-g32": (Bottleneck, (256, 512, 1024, 1536), (2, 2, 2, 2), {"groups": 32, "mid_ratio": 0.5}),
    "se-resnet18": (Basic, (64, 128, 256, 512), (2, 2, 2, 2), {"se": True}),
    "vgg-bn": (Plain, (64, 128, 256, 512), (1, 1, 2, 2), {"strides": (1, 2, 2, 1), "stem_k": 3}),
    "resnet-k5": (Basic, (48, 96, 160, 288), (2, 2, 2, 2), {"k": 5, "stem": 48}),
    "resnet-k7-leaky": (Basic, (32, 64, 128, 256), (1, 2, 2, 1), {"k": 7, "stem": 32, "act": nn.LeakyReLU}),
    "dilated-resnet": (Basic, (64, 128, 256, 384), (2, 2, 2, 2),
                       {"strides": (1, 2, 1, 1), "dilation": 2}),
    "mobilenet-wide": (Inverted, (64, 128, 256, 512), (2, 3, 3, 2), {"stem": 48, "stem_k": 3}),
    "mobilenet-hswish-se": (Inverted, (64, 128, 224, 384), (2, 2, 3, 2),
                            {"stem": 48, "act": nn.Hardswish, "se": True, "k": 5}),
    "shufflenet": (Shuffle, (384, 768, 1536, 2048), (2, 4, 4, 2), {"stem": 64, "groups": 8}),
    "densenet": (Dense, (128, 256, 512, 1024), (1, 1, 1, 1), {"layers": 4, "growth": 96}),
    "inception": (Inception, (128, 256, 512, 768), (2, 2, 3, 2), {}),
}

_NET_KEYS = ("stem", "strides", "stem_k")


def build(arch: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The zoo factory: a fresh, randomly initialised model of architecture ``arch``.

    Args:
        arch: a key of ``ARCHS``.
        num_classes: size of the output layer.

    Returns:
        The ``nn.Module`` (train mode, float32), input ``[B, 3, 64, 64]``.

    Raises:
        KeyError: unknown ``arch`` (the message lists the known ones).
    """
    if arch not in ARCHS:
        raise KeyError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    block, widths, depths, extra = ARCHS[arch]
    net_kwargs = {k: v for k, v in extra.items() if k in _NET_KEYS}
    block_kwargs = {k: v for k, v in extra.items() if k not in _NET_KEYS}
    return Net(block, widths, depths, num_classes=num_classes, **net_kwargs, **block_kwargs)


def tiny(num_classes: int = 10) -> nn.Module:
    """A ~3 k-parameter MLP on ``[B, 16]`` inputs: the checkpoints of the overhead benchmarks."""
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, num_classes))
