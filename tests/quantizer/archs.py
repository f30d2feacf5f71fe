"""Compact copies of torchvision architectures whose quirks matter to conversion.

torchvision is not installable beside this torch, so these keep the parts of its models that
conversion meets, at a size that runs in milliseconds (3 x 32 x 32 inputs):

- ``MiniMNASNet``: torchvision's ``MNASNet`` (inverted residuals, depthwise convs, residual adds)
  with its ``_version = 2`` and the ``_load_from_state_dict`` logic that reads the version from
  the state_dict's ``_metadata``: a loader that drops ``_metadata`` fails with torchvision's own
  "version shluld be set to 1 or 2" error, and a version-1 file with ``alpha != 1`` gets the v1 stem.
- ``MiniGoogLeNet``: torchvision's ``GoogLeNet`` without aux heads (``aux_logits=False``):
  inception blocks of four branches joined by ``torch.cat``, ``transform_input`` (slicing,
  scaling, cat) and a ceil-mode max-pool.

Each class is a factory (``tests.quantizer.archs:MiniMNASNet``); ``ARCHS`` lists them with their
kwargs and ``calibrated`` sets BatchNorm statistics on random data so outputs are not degenerate.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["MiniMNASNet", "MiniGoogLeNet", "ARCHS", "calibrated"]

_BN_MOMENTUM = 1 - 0.9997        # torchvision's MNASNet value


def _round_to_multiple_of(val: float, divisor: int, round_up_bias: float = 0.9) -> int:
    new_val = max(divisor, int(val + divisor / 2) // divisor * divisor)
    return new_val if new_val >= round_up_bias * val else new_val + divisor


def _get_depths(alpha: float) -> list[int]:
    depths = [16, 8, 12, 16, 24, 32, 64, 96]      # torchvision: 32, 16, 24, 40, 80, 96, 192, 320
    return [_round_to_multiple_of(depth * alpha, 8) for depth in depths]


class _InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int, expansion: int):
        super().__init__()
        mid_ch = in_ch * expansion
        self.apply_residual = in_ch == out_ch and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, 1, bias=False),
            nn.BatchNorm2d(mid_ch, momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, mid_ch, kernel_size, padding=kernel_size // 2, stride=stride,
                      groups=mid_ch, bias=False),
            nn.BatchNorm2d(mid_ch, momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch, momentum=_BN_MOMENTUM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.apply_residual:                 # a Python bool: FX traces one branch
            return self.layers(x) + x
        return self.layers(x)


def _stack(in_ch: int, out_ch: int, kernel_size: int, stride: int, expansion: int, repeats: int):
    first = _InvertedResidual(in_ch, out_ch, kernel_size, stride, expansion)
    rest = [_InvertedResidual(out_ch, out_ch, kernel_size, 1, expansion) for _ in range(1, repeats)]
    return nn.Sequential(first, *rest)


class MiniMNASNet(nn.Module):
    """torchvision's MNASNet, narrower and shallower; same state_dict versioning."""

    # Version 2 adds depth scaling in the initial stages of the network (torchvision's comment).
    _version = 2

    def __init__(self, alpha: float = 1.0, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        if alpha <= 0.0:
            raise ValueError(f"alpha should be greater than 0.0 instead of {alpha}")
        self.alpha = alpha
        self.num_classes = num_classes
        depths = _get_depths(alpha)
        layers = [
            nn.Conv2d(3, depths[0], 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(depths[0], momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(depths[0], depths[0], 3, padding=1, stride=1, groups=depths[0], bias=False),
            nn.BatchNorm2d(depths[0], momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(depths[0], depths[1], 1, padding=0, stride=1, bias=False),
            nn.BatchNorm2d(depths[1], momentum=_BN_MOMENTUM),
            _stack(depths[1], depths[2], 3, 2, 3, 2),
            _stack(depths[2], depths[3], 5, 2, 3, 2),
            _stack(depths[3], depths[4], 5, 2, 6, 1),
            _stack(depths[4], depths[5], 3, 1, 6, 2),
            nn.Conv2d(depths[5], 128, 1, padding=0, stride=1, bias=False),
            nn.BatchNorm2d(128, momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
        ]
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x)
        x = x.mean([2, 3])          # equivalent to global average pooling
        return self.classifier(x)

    def use_v1_stem(self) -> None:
        """Give the model version 1's fixed-size stem (then it saves as version 1)."""
        depths = _get_depths(self.alpha)
        v1_stem = [
            nn.Conv2d(3, 16, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(16, momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1, stride=1, groups=16, bias=False),
            nn.BatchNorm2d(16, momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(16, depths[1], 1, padding=0, stride=1, bias=False),
            nn.BatchNorm2d(depths[1], momentum=_BN_MOMENTUM),
        ]
        for idx, layer in enumerate(v1_stem):
            self.layers[idx] = layer
        self._version = 1       # the model is now identical to v1, and must be saved as such

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version", None)
        if version not in [1, 2]:
            raise ValueError(f"version shluld be set to 1 or 2 instead of {version}")
        if version == 1 and not self.alpha == 1.0:
            # In the initial version of the model (v1), stem was fixed-size (torchvision's words).
            self.use_v1_stem()
            warnings.warn("A new version of MNASNet model has been implemented. Your checkpoint "
                          "was saved using the previous version.", UserWarning, stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class _Inception(nn.Module):
    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = _BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(_BasicConv2d(in_channels, ch3x3red, kernel_size=1),
                                     _BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        # torchvision's "5x5" branch is a 3x3 too (a known quirk kept for its weights)
        self.branch3 = nn.Sequential(_BasicConv2d(in_channels, ch5x5red, kernel_size=1),
                                     _BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     _BasicConv2d(in_channels, pool_proj, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(outputs, 1)


class MiniGoogLeNet(nn.Module):
    """torchvision's GoogLeNet (``aux_logits=False``), two inception blocks of a narrow width."""

    def __init__(self, num_classes: int = 10, transform_input: bool = True, dropout: float = 0.2):
        super().__init__()
        self.transform_input = transform_input
        self.conv1 = _BasicConv2d(3, 16, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = _BasicConv2d(16, 16, kernel_size=1)
        self.conv3 = _BasicConv2d(16, 48, kernel_size=3, padding=1)
        self.inception3a = _Inception(48, 16, 24, 32, 4, 8, 8)
        self.inception3b = _Inception(64, 32, 32, 48, 8, 24, 16)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(120, num_classes)

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:
            x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
            x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
            x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
            x = torch.cat((x_ch0, x_ch1, x_ch2), 1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.conv3(self.conv2(x))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


ARCHS = {
    "mnasnet": ("tests.quantizer.archs:MiniMNASNet", {"alpha": 1.0}),
    "mnasnet-0.5": ("tests.quantizer.archs:MiniMNASNet", {"alpha": 0.5}),
    "googlenet": ("tests.quantizer.archs:MiniGoogLeNet", {}),
}


def calibrated(model: nn.Module, seed: int = 0, batches: int = 4) -> nn.Module:
    """``model`` with BatchNorm statistics from a few train-mode passes on random images, in eval
    mode (random-init running stats of 0 / 1 make every net's activations look alike)."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None                  # a plain average over the passes
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(16, 3, 32, 32, generator=generator))
    return model.eval()
