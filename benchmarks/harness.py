"""What every benchmark shares: the machine's description, zoo folders, timed subprocesses, output.

Owns ``machine``, ``write_zoo``, ``write_tiny_checkpoints``, ``run_cli`` (the real ``quantize-all``
in a subprocess, timed from outside, its peak RSS sampled from /proc), ``median`` and
``print_figures`` (the ``name: value`` lines each benchmark prints last). Must not import ray or
jobs: the orchestrator is only ever driven through its command line here, so its start-up counts.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> dict:
    """CPU model, core count, load, versions: what the figures were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib import metadata

    return {"cpu": cpu, "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "torch": metadata.version("torch"),
            "ray": metadata.version("ray")}


def start_figures() -> dict:
    """Print the machine (stderr) and return the figures every benchmark opens with."""
    info = machine()
    print(f"machine: {json.dumps(info)}", file=sys.stderr)
    return {"cores": info["cores"], "load_1min_at_start": info["load_1min"]}


def cli_command() -> list[str]:
    """The installed ``quantize-all`` script beside this interpreter, else ``python -m jobs.cli``."""
    script = os.path.join(os.path.dirname(sys.executable), "quantize-all")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "jobs.cli"]


def subprocess_env() -> dict:
    env = dict(os.environ)
    # the zoo's factories (benchmarks.models) import in the driver's workers from the repo root
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)      # always a local Ray started by the run itself
    return env


@dataclass
class Timed:
    wall_s: float
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float | None

    def json(self) -> dict:
        return json.loads(self.stdout)


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_timed(cmd: list[str], *, sample_rss: bool = False, timeout: float = 3600) -> Timed:
    """Run ``cmd`` from the repo root; wall time measured from outside, from spawn to exit.

    Polled every 20 ms (the wall time resolves to that). With ``sample_rss`` the process's own
    peak RSS (VmHWM: its high-water mark; Ray's raylet and workers, its children, excluded) is
    read at each poll; the last reading before exit is kept.
    """
    # files, not pipes: a child writing more than a pipe holds would block while we poll it
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), text=True,
                                stdout=out_f, stderr=err_f)
        peak, deadline = None, t0 + timeout
        while proc.poll() is None:
            if sample_rss:
                peak = _vm_hwm_mb(proc.pid) or peak
            if time.perf_counter() > deadline:
                proc.kill()
                proc.wait()
                err_f.seek(0)
                raise RuntimeError(f"{cmd[:3]} did not finish within {timeout:.0f} s:\n"
                                   f"{err_f.read()[-2000:]}")
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    return Timed(wall, proc.returncode, out, err, peak)


def run_cli(zoo: str, out: str, *extra: str, sample_rss: bool = False) -> Timed:
    """``quantize-all ZOO --out OUT --json EXTRA...``; raises if it exits with 2 or more."""
    timed = run_timed(cli_command() + [zoo, "--out", out, "--json", *extra], sample_rss=sample_rss)
    if timed.returncode >= 2:
        raise RuntimeError(f"quantize-all exited {timed.returncode}:\n{timed.stderr[-3000:]}")
    return timed


def write_zoo(path: str, models: list[dict], defaults: dict) -> str:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({"defaults": defaults, "models": models}, f, sort_keys=False)
    return path


def write_tiny_checkpoints(folder: str, n: int) -> str:
    """``n`` tiny-MLP checkpoints (distinct weights) and an fp16-only zoo over them."""
    import torch

    from benchmarks.models import tiny

    os.makedirs(os.path.join(folder, "ckpt"), exist_ok=True)
    models = []
    for i in range(n):
        torch.manual_seed(i)
        torch.save(tiny().state_dict(), os.path.join(folder, "ckpt", f"m{i:04d}.pt"))
        models.append({"name": f"m{i:04d}", "factory": "benchmarks.models:tiny",
                       "checkpoint": f"ckpt/m{i:04d}.pt"})
    return write_zoo(os.path.join(folder, "zoo.yaml"), models, {"precisions": ["fp16"]})


def ray_startup_s() -> float:
    """Wall time of a bare local ``ray.init()`` + ``ray.shutdown()`` in a fresh interpreter."""
    code = ("import time; t = time.perf_counter(); import ray; "
            "ray.init(include_dashboard=False, logging_level='ERROR', log_to_driver=False); "
            "ray.shutdown(); print(time.perf_counter() - t)")
    timed = run_timed([sys.executable, "-c", code], timeout=180)
    if timed.returncode:
        raise RuntimeError(f"ray.init failed:\n{timed.stderr[-2000:]}")
    return float(timed.stdout.strip().splitlines()[-1])


def median(values) -> float:
    return statistics.median(values)


def print_figures(figures: dict) -> None:
    """The figures, last, one ``name: value`` line each (floats to 3 decimals)."""
    print("")
    for name, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.3f}"
        print(f"{name}: {value}", flush=True)


def in_workdir(args, prefix: str, body) -> int:
    """``body(args, work)`` in ``--workdir`` if given, else in a temporary folder removed after
    (the generated checkpoints can take a few GB)."""
    if args.workdir:
        return body(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        return body(args, work)
