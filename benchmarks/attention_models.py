"""Compact attention / LayerNorm models for int8 fidelity work: ViT, ConvNeXt and Swin in miniature.

Owns ``ARCHS`` (name -> builder) and ``build`` (a zoo ``factory``: ``benchmarks.attention_models:build``
with ``kwargs: {arch: NAME}``). torchvision is not installable beside the CPU torch, so these are
written here, small enough to convert in seconds on two cores, but with the structures that decide
int8 fidelity in the real ones:

- ``vit-mha``: patch embedding (strided conv), class token, position embedding, pre-norm blocks of
  ``nn.MultiheadAttention`` + GELU MLP with residual adds (as torchvision's ``vit_b_16``);
- ``vit-qkv``: the same with attention written out: one qkv Linear, reshape/permute, ``q @ k^T``,
  softmax, ``@ v``, projection (as timm's ViTs and most hand-written transformers);
- ``convnext``: 4x4-patch stem, depthwise 7x7 convolutions, LayerNorm over channels via a
  channels-last permute, pointwise MLP as Linear layers, layer scale, residual adds, LayerNorm +
  strided conv downsampling (as torchvision's ``convnext_tiny``);
- ``swin``: shifted-window attention with a learned relative position bias, window partition via
  view/permute, ``torch.roll`` shifts with an attention mask, patch merging (as ``swin_t``).

Every model takes float32 ``[B, 3, 32, 32]`` images and returns ``[B, num_classes]`` logits; all
are FX-traceable and ``torch.export``-able. Must import only torch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


class Mlp(nn.Sequential):
    """Linear, GELU, Linear: the transformer feed-forward block."""

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__(nn.Linear(dim, dim * ratio), nn.GELU(), nn.Linear(dim * ratio, dim))


class QKVAttention(nn.Module):
    """Multi-head self-attention written out, on ``[B, N, C]`` tokens, with an optional
    additive bias (``[heads, N, N]``, or ``[windows, heads, N, N]`` for windowed input)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                windows: int = 1) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:   # consecutive rows of x are the windows of one image
            attn = (attn.view(-1, windows, self.heads, n, n) + bias).view(-1, self.heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    """Pre-norm transformer encoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mha: bool):
        super().__init__()
        self.mha = mha
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = (nn.MultiheadAttention(dim, heads, batch_first=True) if mha
                     else QKVAttention(dim, heads))
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + (self.attn(y, y, y, need_weights=False)[0] if self.mha else self.attn(y))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer: patch embedding, class token, position embedding, blocks, head."""

    def __init__(self, mha: bool = True, dim: int = 96, depth: int = 4, heads: int = 4,
                 patch: int = 4, image: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        tokens = (image // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mha) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, through a channels-last permute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, LayerNorm (channels last), Linear 4x, GELU, Linear, layer scale, add."""

    def __init__(self, dim: int, layer_scale: float = 0.1):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return x + (self.mlp(y) * self.gamma).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Patch stem + LayerNorm, four stages of ConvNeXt blocks joined by LayerNorm + 2x2 strided
    convolutions, global average pool, LayerNorm, linear head."""

    def __init__(self, dims=(40, 80, 160, 320), depths=(2, 2, 4, 2), stem: int = 2,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], stem, stem), LayerNorm2d(dims[0])]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i:
                layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            layers += [ConvNeXtBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x).mean((2, 3))))


def _window_index(window: int) -> torch.Tensor:
    """Index into the ``(2w-1)^2`` relative position table for every pair of a window's tokens."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    rel = (coords.flatten(1)[:, :, None] - coords.flatten(1)[:, None, :]).permute(1, 2, 0) + window - 1
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _shift_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """``[windows, w*w, w*w]``: -100 between tokens that a cyclic shift put in one window."""
    region = torch.zeros(size, size)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for k, (hs, ws) in enumerate((h, w) for h in bounds for w in bounds):
        region[hs, ws] = k
    windows = region.view(size // window, window, size // window, window).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    return (windows[:, None, :] != windows[:, :, None]).float() * -100.0


class SwinBlock(nn.Module):
    """(Shifted-)window attention with relative position bias, then the MLP; pre-norm, NHWC."""

    def __init__(self, dim: int, heads: int, size: int, window: int, shift: int):
        super().__init__()
        self.size, self.window, self.shift = size, window, shift if window < size else 0
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = QKVAttention(dim, heads)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        self.register_buffer("index", _window_index(window).flatten(), persistent=False)
        mask = _shift_mask(size, window, self.shift) if self.shift else torch.zeros(1, 1, 1)
        self.register_buffer("mask", mask, persistent=False)
        self.mlp = Mlp(dim)

    def _bias(self) -> torch.Tensor:
        n = self.window * self.window
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1)      # [heads, n, n]
        return bias.unsqueeze(0) + self.mask.unsqueeze(1)                # [windows|1, heads, n, n]

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        s, w, c = self.size, self.window, x.shape[-1]
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
        x = x.view(-1, s // w, w, s // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
        x = self.attn(x, self._bias(), (s // w) ** 2)
        x = x.view(-1, s // w, s // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
        return torch.roll(x, (self.shift, self.shift), (1, 2)) if self.shift else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (4C), LayerNorm, Linear to 2C: halves H and W (NHWC)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduce = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduce(self.norm(x))


class Swin(nn.Module):
    """Patch embedding + LayerNorm (NHWC), stages of (shifted-)window blocks joined by patch
    merging, LayerNorm, average over positions, linear head."""

    def __init__(self, dim: int = 48, depths=(2, 2, 2), heads=(3, 6, 12), window: int = 4,
                 patch: int = 2, image: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.embed_norm = nn.LayerNorm(dim)
        layers: list[nn.Module] = []
        size = image // patch
        for i, (depth, head) in enumerate(zip(depths, heads)):
            if i:
                layers.append(PatchMerging(dim))
                dim, size = dim * 2, size // 2
            layers += [SwinBlock(dim, head, size, window, shift=(j % 2) * window // 2)
                       for j in range(depth)]
        self.stages = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.embed(x).permute(0, 2, 3, 1))
        return self.head(self.norm(self.stages(x)).mean((1, 2)))


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "vit-mha": lambda **kw: ViT(mha=True, **kw),
    "vit-qkv": lambda **kw: ViT(mha=False, **kw),
    "convnext": ConvNeXt,
    "swin": Swin,
}


def build(arch: str, num_classes: int = NUM_CLASSES, **kwargs) -> nn.Module:
    """The zoo factory: a fresh, randomly initialised model of architecture ``arch``.

    Args:
        arch: a key of ``ARCHS``.
        num_classes: size of the output layer.
        **kwargs: passed to the architecture (e.g. ``depth`` or ``dims`` for smaller copies).

    Returns:
        The ``nn.Module`` (train mode, float32), input ``[B, 3, 32, 32]``.

    Raises:
        KeyError: unknown ``arch`` (the message lists the known ones).
    """
    if arch not in ARCHS:
        raise KeyError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch](num_classes=num_classes, **kwargs)
