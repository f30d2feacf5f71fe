"""What pyproject.toml promises about the environment quantize-all runs in."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# torch.load(weights_only=True) reads every checkpoint and artifact; before 2.10 it has known
# bypasses that run code (CVE-2025-32434, fixed in 2.6.0; CVE-2026-24747, fixed in 2.10.0).
WEIGHTS_ONLY_SAFE_FROM = (2, 10)


def _torch_floor() -> tuple[int, int]:
    # the dependencies list's torch line (tomllib is not in Python 3.10, which we support)
    major, minor = re.search(r'^\s*"torch\s*>=\s*(\d+)\.(\d+)', PYPROJECT.read_text(),
                             re.M).groups()
    return int(major), int(minor)


def test_torch_floor_excludes_known_weights_only_bypasses():
    assert _torch_floor() >= WEIGHTS_ONLY_SAFE_FROM


def test_the_installed_torch_meets_the_floor():
    installed = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= _torch_floor()
