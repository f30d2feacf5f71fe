"""int8 fidelity benchmark: quantize-all's FX recipes side by side with torchao's pt2e, per model.

Run (from the repo root; no Ray is started; the first run trains the zoo, ~15 min on 2 idle cores)::

    .venv/bin/python -m benchmarks.int8_fidelity                    # every model of the zoo
    .venv/bin/python -m benchmarks.int8_fidelity --models vit-qkv,swin --no-latency

For each model of ``benchmarks.fidelity_zoo`` (compact ViT / ConvNeXt / Swin models and CNNs,
trained on bundled data): the SQNR of the int8 model's logits against fp32 on held-out rows, for
(a) ``today``: ``to_int8`` with ``qconfig_version=1`` (quantize-all 0.1's mapping), (b) ``new``:
``to_int8`` as it is now by default, (c) ``pt2e``: torchao's ``prepare_pt2e`` / ``convert_pt2e``
with ``X86InductorQuantizer`` and its default config (skipped, and said so, when torchao is not
installed). All three see the same checkpoint, the same calibration batches and the same held-out
rows. For (a) and (b) also: the speedup of int8 over fp32 at batch 1 (medians of interleaved
rounds, torch's default thread count) and the state_dict size ratio int8 / fp32. pt2e's int8
speed needs ``torch.compile`` (Inductor), not measured here. Figures last, as ``name: value``
lines, with ``met_*`` lines for issue 14's targets. Must not import ray (the zoo imports
``jobs.demo.models``, torch only).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import warnings

from benchmarks import harness

HELD_OUT = 128
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "quantize-all", "fidelity-zoo")


def _pt2e_module():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.pt2e import quantize_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as exc:
        print(f"torchao is not installed ({exc}): the pt2e column is skipped", file=sys.stderr)
        return None
    return quantize_pt2e, xiq


def pt2e_int8(pt2e, model, batches):
    """torchao pt2e static int8 with X86InductorQuantizer's default config, calibrated on batches."""
    import torch

    quantize_pt2e, xiq = pt2e
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, (batches[0],)).module()
        prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
        for batch in batches:
            prepared(batch)
        return quantize_pt2e.convert_pt2e(prepared)


def _state_bytes(model) -> int:
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def _speedups(models: dict, x, rounds: int) -> dict:
    """fp32 latency / int8 latency at batch 1 for each name but ``fp32``: one thread (the
    machine is shared: fewer threads, less waiting on others), rounds interleaved, medians."""
    import torch

    from quantizer.fidelity import measure_latency_ms

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(measure_latency_ms(model, x, warmup=3, repeats=15, budget_s=3.0))
    finally:
        torch.set_num_threads(threads)
    fp32 = harness.median(times["fp32"])
    return {name: fp32 / harness.median(t) for name, t in times.items() if name != "fp32"}


def measure(name: str, args, pt2e) -> dict:
    import torch

    from benchmarks import fidelity_zoo
    from quantizer import int8
    from quantizer.fidelity import sqnr_db

    model = fidelity_zoo.trained(name, args.cache)
    calib, held = fidelity_zoo.rows(name, args.batches * args.batch_size, HELD_OUT)
    batches = list(calib.split(args.batch_size))
    loader = [(b, None) for b in batches]
    converted = {
        "today": int8.to_int8(model, loader, args.batches, args.backend, qconfig_version=1),
        "new": int8.to_int8(model, loader, args.batches, args.backend),
    }
    if pt2e is not None and args.pt2e:
        converted["pt2e"] = pt2e_int8(pt2e, model, batches)
    int8.set_engine(args.backend)
    with torch.no_grad():
        ref = model(held)
        # pt2e's exported graph is specialised to the calibration batch size
        row = {f"sqnr_{k}": sqnr_db(ref, torch.cat([m(b) for b in held.split(args.batch_size)]))
               for k, m in converted.items()}
    row["accuracy_fp32"] = fidelity_zoo.accuracy(model, name)
    row["activation_range"] = converted["new"].int8_settings["activation_range"]
    fp32_bytes = _state_bytes(model)
    for k in ("today", "new"):
        row[f"size_{k}"] = _state_bytes(converted[k]) / fp32_bytes
    if args.latency_rounds:
        timed = {"fp32": model, "today": converted["today"], "new": converted["new"]}
        row.update({f"speedup_{k}": v for k, v in _speedups(timed, held[:1], args.latency_rounds).items()})
    return row


def _table(rows: dict) -> str:
    head = "| model | kind | today dB | new dB | pt2e dB | speedup today / new | size today / new |"
    lines = [head, "| --- " * 7 + "|"]
    from benchmarks.fidelity_zoo import ZOO

    for name, r in rows.items():
        pt2e = f"{r['sqnr_pt2e']:.1f}" if "sqnr_pt2e" in r else "-"
        speed = (f"{r['speedup_today']:.2f}x / {r['speedup_new']:.2f}x" if "speedup_new" in r else "-")
        lines.append(f"| {name} | {ZOO[name].kind} | {r['sqnr_today']:.1f} | {r['sqnr_new']:.1f} | "
                     f"{pt2e} | {speed} | {r['size_today']:.3f} / {r['size_new']:.3f} |")
    return "\n".join(lines)


def targets(rows: dict) -> dict:
    """Issue 14's targets: attention models within 2 dB of pt2e, no CNN more than 0.5 dB worse
    than today, and neither speedup (10% timing noise allowed) nor size ratio worse than today."""
    from benchmarks.fidelity_zoo import ZOO

    met = {}
    attention = [r for n, r in rows.items() if ZOO[n].kind == "attention"]
    if attention and all("sqnr_pt2e" in r for r in attention):
        met["met_attention_within_2db_of_pt2e"] = all(
            r["sqnr_new"] >= r["sqnr_pt2e"] - 2.0 for r in attention)
    met["met_cnn_within_0.5db_of_today"] = all(
        r["sqnr_new"] >= r["sqnr_today"] - 0.5 for n, r in rows.items() if ZOO[n].kind == "cnn")
    met["met_size_not_worse"] = all(r["size_new"] <= r["size_today"] * 1.001 for r in rows.values())
    if all("speedup_new" in r for r in rows.values()):
        met["met_speedup_not_worse"] = all(
            r["speedup_new"] >= r["speedup_today"] * 0.9 for r in rows.values())
    return met


def main(argv=None) -> int:
    from benchmarks import fidelity_zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(fidelity_zoo.ZOO),
                        help="comma-separated names of benchmarks.fidelity_zoo.ZOO")
    parser.add_argument("--backend", default="fbgemm")
    parser.add_argument("--batches", type=int, default=10, help="calibration batches")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per calibration batch")
    parser.add_argument("--no-pt2e", dest="pt2e", action="store_false", help="skip torchao")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="trained checkpoints (reused)")
    parser.add_argument("--latency-rounds", type=int, default=5,
                        help="interleaved latency rounds (0: no latency)")
    parser.add_argument("--no-latency", dest="latency_rounds", action="store_const", const=0)
    args = parser.parse_args(argv)
    figures = harness.start_figures()
    pt2e = _pt2e_module() if args.pt2e else None
    rows = {}
    for name in args.models.split(","):
        rows[name] = row = measure(name, args, pt2e)
        print(f"{name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items()), file=sys.stderr, flush=True)
    print(_table(rows))
    for name, row in rows.items():
        figures.update({f"{k}.{name}": v for k, v in row.items()})
    figures.update(targets(rows))
    figures["load_1min_at_end"] = harness.machine()["load_1min"]
    harness.print_figures({k: str(v).lower() if isinstance(v, bool) else v for k, v in figures.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
