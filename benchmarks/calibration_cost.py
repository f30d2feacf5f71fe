"""Calibration-cost benchmark: where ``to_int8``'s time goes, and what the observer costs.

Run (from the repo root; no Ray is started)::

    .venv/bin/python -m benchmarks.calibration_cost           # full: 10 batches, 5 repeats
    .venv/bin/python -m benchmarks.calibration_cost --quick   # smoke: 10 batches, 1 repeat

On ``resnet18`` from ``benchmarks.models`` (11.2 M parameters, ``[8, 3, 64, 64]`` batches), for
each observer (``default``: the backend's default qconfig, histogram activations; ``minmax``):
the split prepare (FX trace, fusion, observer insertion) / calibrate (the 10 forward passes with
observers) / convert, the calibrate time divided by the time of the same 10 forward passes of the
fp32 model (observer overhead), and the SQNR of the result on 64 held-out rows. Medians over the
repeats; torch at its default thread count. The phases are the product's own
(``quantizer.int8.prepare_int8``, ``_calibrate``, ``convert_int8``: ``convert_fx`` and the graph
passes after it), timed one by one.
With ``--zoo``, also every model of the benchmark zoo through ``to_int8`` with ``fbgemm`` and
``x86`` (observer ``default``: histogram activations, per-channel weights) and ``minmax`` (min/max
activations, per-channel weights), in CPU seconds at one thread, the way a task runs it.
Must not import ray or jobs.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from benchmarks import harness

BATCHES, BATCH_SIZE, HELD_OUT = 10, 8, 64


def _phases(model, batches, observer: str) -> tuple[dict, object]:
    from quantizer import int8

    t0 = time.perf_counter()
    prepared = int8.prepare_int8(model, batches[0][:1], "fbgemm", observer)
    t1 = time.perf_counter()
    used = int8._calibrate(prepared, model, ((b,) for b in batches))
    t2 = time.perf_counter()
    converted = int8.convert_int8(prepared)
    t3 = time.perf_counter()
    assert used == len(batches)
    return {"prepare_s": t1 - t0, "calibrate_s": t2 - t1, "convert_s": t3 - t2}, converted


def _fp32_forward_s(model, batches) -> float:
    import torch

    with torch.no_grad():
        model(batches[0])            # warm-up: first-call allocations are not the model's cost
        t0 = time.perf_counter()
        for b in batches:
            model(b)
    return time.perf_counter() - t0


def measure(repeats: int) -> dict:
    import torch

    import quantizer
    from benchmarks.models import INPUT_SHAPE, build

    torch.manual_seed(0)
    model = build("resnet18").eval()
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(BATCHES * BATCH_SIZE + HELD_OUT, *INPUT_SHAPE, generator=gen)
    batches = list(data[:BATCHES * BATCH_SIZE].split(BATCH_SIZE))
    held = data[BATCHES * BATCH_SIZE:]
    with torch.no_grad():
        reference = model(held)
    figures: dict = {"threads": torch.get_num_threads()}
    for observer in ("default", "minmax"):
        _phases(model, batches[:1], observer)   # warm-up: torch.ao's lazy imports and caches
    fp32 = [_fp32_forward_s(model, batches) for _ in range(repeats)]
    figures["fp32_forward_10_batches_s"] = harness.median(fp32)
    for observer in ("default", "minmax"):
        runs, converted = [], None
        for _ in range(repeats):
            split, converted = _phases(model, batches, observer)
            runs.append(split)
        for phase in ("prepare_s", "calibrate_s", "convert_s"):
            figures[f"{observer}_{phase}"] = harness.median([r[phase] for r in runs])
        figures[f"{observer}_observer_overhead"] = (
            figures[f"{observer}_calibrate_s"] / figures["fp32_forward_10_batches_s"])
        with torch.no_grad():
            figures[f"{observer}_sqnr_db"] = float(quantizer.sqnr_db(reference, converted(held)))
    figures["minmax_calibrate_speedup"] = figures["default_calibrate_s"] / figures["minmax_calibrate_s"]
    return figures


ZOO_CONFIGS = (("fbgemm", "default"), ("x86", "default"), ("fbgemm", "minmax"))


def zoo_costs(archs: list[str]) -> dict:
    """Every model of the benchmark zoo through ``to_int8`` with each (backend, observer) of
    ``ZOO_CONFIGS``, at 1 thread (as a task runs): CPU seconds (process time, steadier than wall
    time on a shared machine) and SQNR on the held-out rows, summed / medianed over the zoo."""
    import torch

    import quantizer
    from benchmarks.models import INPUT_SHAPE, build

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(BATCHES * BATCH_SIZE + HELD_OUT, *INPUT_SHAPE, generator=gen)
    batches = [(b, None) for b in data[:BATCHES * BATCH_SIZE].split(BATCH_SIZE)]
    held = data[BATCHES * BATCH_SIZE:]
    seconds = {c: [] for c in ZOO_CONFIGS}
    sqnr = {c: [] for c in ZOO_CONFIGS}
    quantizer.to_int8(build(archs[0]).eval(), batches[:1], 1)    # warm-up: torch.ao imports
    for i, arch in enumerate(archs):
        torch.manual_seed(i)
        model = build(arch).eval()
        with torch.no_grad():
            reference = model(held)
        for backend, observer in ZOO_CONFIGS:
            t0 = time.process_time()
            converted = quantizer.to_int8(model, batches, BATCHES, backend, observer)
            seconds[(backend, observer)].append(time.process_time() - t0)
            with torch.no_grad():
                got = converted(held)
            sqnr[(backend, observer)].append(float(quantizer.sqnr_db(reference, got)))
    figures = {"zoo_models": len(archs)}
    for backend, observer in ZOO_CONFIGS:
        tag = f"zoo_{backend}_{observer}"
        figures[f"{tag}_to_int8_cpu_s"] = sum(seconds[(backend, observer)])
        figures[f"{tag}_median_sqnr_db"] = harness.median(sqnr[(backend, observer)])
        figures[f"{tag}_min_sqnr_db"] = min(sqnr[(backend, observer)])
    base = figures["zoo_fbgemm_default_to_int8_cpu_s"]
    for backend, observer in ZOO_CONFIGS[1:]:
        figures[f"zoo_{backend}_{observer}_vs_fbgemm_default"] = (
            figures[f"zoo_{backend}_{observer}_to_int8_cpu_s"] / base)
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat instead of 5")
    parser.add_argument("--zoo", action="store_true",
                        help="also every model of the benchmark zoo with fbgemm/x86 and "
                             "default/minmax, CPU seconds at 1 thread")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)
    figures = harness.start_figures()
    figures.update(model="resnet18", calibration_batches=BATCHES, batch_size=BATCH_SIZE)
    figures["repeats"] = 1 if args.quick else 5
    figures.update(measure(figures["repeats"]))
    if args.zoo:
        from benchmarks.models import ARCHS

        warnings.simplefilter("ignore")
        figures.update(zoo_costs(list(ARCHS)[:4] if args.quick else list(ARCHS)))
    harness.print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
