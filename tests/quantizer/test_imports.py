"""The library stays a library: no Ray, click or jobs behind ``import quantizer``."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import quantizer

AO_IMPORT = re.compile(r"^\s*(from|import)\s+torch\.ao\b", re.MULTILINE)
REPO = pathlib.Path(__file__).resolve().parents[2]


def fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet) from the repo root; its stdout."""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_quantizer_pulls_in_no_ray_click_or_jobs():
    code = (
        "import sys, quantizer\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'click', 'jobs'))\n"
        "assert not bad, bad\n"
        "print(quantizer.__version__)\n"
    )
    assert fresh_python(code).strip() == quantizer.__version__


def test_only_int8_touches_torch_ao_quantization():
    package = pathlib.Path(quantizer.__file__).parent
    engine = ("int8.py", "int8_qconfig.py", "int8_lowering.py", "int8_float_outputs.py")
    offenders = [path.name for path in sorted(package.glob("*.py"))
                 if path.name not in engine and AO_IMPORT.search(path.read_text())]
    assert offenders == []


def test_public_surface_resolves():
    assert all(hasattr(quantizer, name) for name in quantizer.__all__)


def test_an_int8_conversion_leaves_the_compiler_stack_unimported():
    """prepare_fx's tracer would record a stack trace per graph node, and the first one imports
    torch._dynamo and torch._inductor (~0.9 s in every fresh worker); ``to_int8`` turns that off
    and puts the setting back."""
    code = (
        "import sys, torch, torch.fx, quantizer\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),\n"
        "                        torch.nn.Linear(4 * 6 * 6, 2)).eval()\n"
        "x = torch.randn(8, 3, 8, 8)\n"
        "q = quantizer.to_int8(m, [(x, None)], calibration_batches=1)\n"
        "assert q(x).shape == (8, 2)\n"
        "print(sorted(n for n in ('torch._dynamo', 'torch._inductor') if n in sys.modules),\n"
        "      torch.fx.config.do_not_emit_stack_traces)\n"
    )
    assert fresh_python(code).split() == ["[]", "False"]
