"""The library stays a library: no Ray, click or jobs behind ``import quantizer``."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import quantizer

AO_IMPORT = re.compile(r"^\s*(from|import)\s+torch\.ao\b", re.MULTILINE)
REPO = pathlib.Path(__file__).resolve().parents[2]


def test_import_quantizer_pulls_in_no_ray_click_or_jobs():
    code = (
        "import sys, quantizer\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'click', 'jobs'))\n"
        "assert not bad, bad\n"
        "print(quantizer.__version__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == quantizer.__version__


def test_only_int8_touches_torch_ao_quantization():
    package = pathlib.Path(quantizer.__file__).parent
    engine = ("int8.py", "int8_qconfig.py", "int8_lowering.py", "int8_float_outputs.py")
    offenders = [path.name for path in sorted(package.glob("*.py"))
                 if path.name not in engine and AO_IMPORT.search(path.read_text())]
    assert offenders == []


def test_public_surface_resolves():
    assert all(hasattr(quantizer, name) for name in quantizer.__all__)
