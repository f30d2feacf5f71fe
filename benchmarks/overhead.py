"""Orchestration-overhead benchmark: hundreds of tiny fp16 checkpoints through quantize-all.

Run (from the repo root; ``unshare -n`` form in docs/performance.md)::

    .venv/bin/python -m benchmarks.overhead           # full: 500 models; RSS at 100 and 1,000
    .venv/bin/python -m benchmarks.overhead --quick   # smoke: 50 models; RSS at 20 and 200

The models are ~3 k-parameter MLPs, so the conversion itself is negligible and what is measured
is the orchestrator: planning and hashing, Ray tasks, artifact publication, manifest and report.
Per model: ``(wall - Ray start-up) / N``, Ray start-up being a bare ``ray.init`` + ``shutdown``
timed in a fresh interpreter in the same run; also the marginal cost ``(wall(N) - wall(10)) /
(N - 10)``, which cancels every fixed cost. Driver memory: the ``quantize-all`` process's own peak
RSS (VmHWM, its Ray children excluded) at a small and a 10x larger zoo. Must not import ray or jobs.
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks import harness


def _zoo(work: str, n: int) -> str:
    return harness.write_tiny_checkpoints(os.path.join(work, f"zoo-{n}"), n)


def _run(work: str, n: int, tag: str, *, rss: bool = False) -> harness.Timed:
    timed = harness.run_cli(_zoo(work, n), os.path.join(work, f"out-{n}-{tag}"), sample_rss=rss)
    summary = timed.json()
    if summary["counts"]["ok"] != n:
        raise RuntimeError(f"{n}-model run: {summary['counts']}\n{timed.stderr[-2000:]}")
    print(f"{n} models ({tag}): {timed.wall_s:.1f} s wall, driver peak RSS "
          f"{timed.peak_rss_mb or 0:.0f} MB", file=sys.stderr, flush=True)
    return timed


def measure(work: str, n: int, rss_small: int, rss_large: int) -> dict:
    startup = harness.median([harness.ray_startup_s() for _ in range(2)])
    small = _run(work, 10, "fixed")
    big = _run(work, n, "main")
    durations = sorted(r["duration_s"] for r in big.json()["rows"])
    figures = {
        "models": n, "ray_startup_s": startup, "wall_10_models_s": small.wall_s,
        "wall_s": big.wall_s,
        "per_model_ms": (big.wall_s - startup) / n * 1000,
        "marginal_per_model_ms": (big.wall_s - small.wall_s) / (n - 10) * 1000,
        "task_median_ms": durations[len(durations) // 2] * 1000,
    }
    low = _run(work, rss_small, "rss", rss=True)
    high = _run(work, rss_large, "rss", rss=True)
    figures.update({
        f"driver_peak_rss_{rss_small}_mb": low.peak_rss_mb,
        f"driver_peak_rss_{rss_large}_mb": high.peak_rss_mb,
        "rss_ratio": high.peak_rss_mb / low.peak_rss_mb,
        f"wall_{rss_large}_models_s": high.wall_s,
    })
    figures["target_per_model_met"] = figures["per_model_ms"] <= 20
    figures["target_rss_met"] = figures["rss_ratio"] <= 1.5
    return figures


def _main(args, work: str) -> int:
    n, small, large = (50, 20, 200) if args.quick else (500, 100, 1000)
    figures = harness.start_figures()
    figures.update(measure(work, n, small, large))
    harness.print_figures(figures)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 models; RSS at 20 and 200")
    parser.add_argument("--workdir", help="keep zoos and outputs here (default: a temp dir)")
    args = parser.parse_args(argv)
    return harness.in_workdir(args, "bench-overhead-", _main)


if __name__ == "__main__":
    sys.exit(main())
