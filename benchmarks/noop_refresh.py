"""No-op refresh benchmark: a converted 100-model zoo run again must be quick and start no Ray.

Run (from the repo root; ``unshare -n`` form in docs/performance.md)::

    .venv/bin/python -m benchmarks.noop_refresh           # full: 100 models, 5 timed refreshes
    .venv/bin/python -m benchmarks.noop_refresh --quick   # smoke: 20 models, 3 timed refreshes

The first run converts the zoo (tiny fp16 models, on Ray); each refresh is then the unchanged
``quantize-all`` command, timed from outside (interpreter start to exit), and must report
``ray_used: false`` with every row skipped. One more refresh runs the CLI under an ``atexit`` hook
that lists the ``torch`` and ``ray`` modules the process imported (there must be none).
Must not import ray or jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks import harness

# the real CLI entry point, with a hook that reports which heavy packages got imported
_PROBE = (
    "import atexit, json, sys\n"
    "atexit.register(lambda: print('HEAVY_MODULES=' + json.dumps(sorted({m.split('.')[0] for m in "
    "sys.modules if m.split('.')[0] in ('torch', 'ray')})), file=sys.stderr))\n"
    "from jobs.cli import main\n"
    "sys.argv[0] = 'quantize-all'\n"
    "main()\n"
)


def heavy_modules(zoo: str, out: str) -> list[str]:
    """Which of torch / ray a refresh of ``zoo`` into ``out`` imports."""
    timed = harness.run_timed([sys.executable, "-c", _PROBE, zoo, "--out", out, "--json"])
    line = next(x for x in timed.stderr.splitlines() if x.startswith("HEAVY_MODULES="))
    return json.loads(line.split("=", 1)[1])


def measure(work: str, n: int, repeats: int) -> dict:
    zoo = harness.write_tiny_checkpoints(os.path.join(work, "zoo"), n)
    out = os.path.join(work, "out")
    first = harness.run_cli(zoo, out)
    if first.json()["counts"]["ok"] != n:
        raise RuntimeError(f"first run: {first.json()['counts']}\n{first.stderr[-2000:]}")
    walls, ray_used, skipped = [], [], []
    for _ in range(repeats):
        timed = harness.run_cli(zoo, out)
        summary = timed.json()
        walls.append(timed.wall_s)
        ray_used.append(summary["ray_used"])
        skipped.append(summary["counts"]["skipped"])
    heavy = heavy_modules(zoo, out)
    return {
        "models": n, "first_run_wall_s": first.wall_s,
        "refresh_wall_s": harness.median(walls), "refresh_wall_max_s": max(walls),
        "ray_used": any(ray_used), "all_skipped": all(s == n for s in skipped),
        "heavy_modules_imported": ",".join(heavy) or "none",
        "target_met": harness.median(walls) <= 2.0 and not any(ray_used) and not heavy,
        "repeats": repeats,
    }


def _main(args, work: str) -> int:
    n, repeats = (20, 3) if args.quick else (100, 5)
    figures = harness.start_figures()
    figures.update(measure(work, n, repeats))
    harness.print_figures(figures)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 models, 3 timed refreshes")
    parser.add_argument("--workdir", help="keep the zoo and output here (default: a temp dir)")
    args = parser.parse_args(argv)
    return harness.in_workdir(args, "bench-noop-", _main)


if __name__ == "__main__":
    sys.exit(main())
