"""Accuracy-gated int8 over a zoo: every row meets the gate or fails naming its best.

Runs ``quantizer.tuning.tune_int8`` (recipe ``auto`` by default: static, then dynamic, the
smallest artifact that passes) with ``min_sqnr_db`` on the digit classifiers of
``benchmarks.tuning_models`` (trained briefly here) and on the pretrained models of
``tests.real.models`` (MTCNN P/R/O-Net, the Resemblyzer speaker encoder, CREPE tiny and full;
their weight wheels must be installed), and prints one table row per model: plain int8 SQNR,
the chosen recipe, SQNR after tuning, layers kept float, trials, tuning seconds, size ratio.

    python -m benchmarks.tuning_zoo [--only NAME ...] [--min-sqnr-db 20] [--recipe auto] [--quick]

Prints the table, then the figures (``harness.print_figures``): rows met, rows failed.

Must not import ray.
"""

from __future__ import annotations

import argparse
import io
import os
import time
import warnings

import torch

from benchmarks import harness, tuning_models
from quantizer import GateNotMetError, tuning
from tests.real import models as real

CAL_ROWS, HELD_ROWS, BATCH = 128, 128, 16


def _digits():
    from jobs.demo.build import digits_split
    split = digits_split(0)
    x, y = torch.from_numpy(split.held_x), torch.from_numpy(split.held_y)
    return x[:CAL_ROWS], x[CAL_ROWS:CAL_ROWS + HELD_ROWS], y[CAL_ROWS:CAL_ROWS + HELD_ROWS]


def _pretrained(name: str):
    cls = {"mtcnn-pnet": real.PNet, "mtcnn-rnet": real.RNet, "mtcnn-onet": real.ONet,
           "speaker-encoder": real.VoiceEncoder, "crepe-tiny": real.Crepe,
           "crepe-full": real.Crepe}[name]
    model = cls("tiny") if name == "crepe-tiny" else cls()
    state = torch.load(real.asset(name), weights_only=True, map_location="cpu")
    if name == "speaker-encoder":
        state = {k: v for k, v in state["model_state"].items() if not k.startswith("similarity")}
    model.load_state_dict(state)
    return model.eval()


def _real_data(name: str, rows: int):
    if name.startswith("mtcnn"):
        return real.mtcnn_crops(rows, {"p": 12, "r": 24, "o": 48}[name[6]], seed=0)
    if name == "speaker-encoder":
        return real.voice_mels(rows, seed=1)
    return real.crepe_frames(rows, seed=0)[0]


REAL = ("mtcnn-pnet", "mtcnn-rnet", "mtcnn-onet", "speaker-encoder", "crepe-tiny", "crepe-full")


def zoo(only: list[str]):
    """(name, model, calibration rows, held-out rows, labels or None, forward_kwargs) for the
    selected models."""
    names = [n for n in list(tuning_models.TUNING_ARCHS) + list(REAL) if not only or n in only]
    for name in names:
        if name in tuning_models.TUNING_ARCHS:
            model, _ = tuning_models.trained(name)
            cal, held, labels = _digits()
        else:
            model = _pretrained(name)
            rows = 32 if name == "crepe-full" else 64
            data = _real_data(name, 2 * rows)
            cal, held, labels = data[:rows], data[rows:], None
        fixed = {"embed": False} if name.startswith("crepe") else None  # forward(x, embed=False)
        yield name, model, cal, held, labels, fixed


def _bytes(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def row(name, model, cal, held, labels, fixed, gate, config) -> tuple[str, bool]:
    """The table row of one model, and whether it met the gate."""
    loader = [(cal[i:i + BATCH], None) for i in range(0, len(cal), BATCH)]
    start = time.perf_counter()
    try:
        result = tuning.tune_int8(model, loader, held, gate=gate, config=config, targets=labels,
                                  calibration_batches=len(loader), forward_kwargs=fixed)
    except GateNotMetError as exc:
        best = exc.best
        return (f"| {name} | FAILED: best {best.get('recipe')} {best.get('sqnr_db', 0):.1f} dB, "
                f"quantized {best.get('quantized_fraction', 0):.2f} | | "
                f"{', '.join(best.get('float_layers', [])) or '-'} | | "
                f"{time.perf_counter() - start:.1f} | |"), False
    plain = {t.recipe: t.sqnr_db for t in result.trials if not t.float_layers}
    chosen = result.chosen
    return (f"| {name} | {chosen.recipe} | "
            + " / ".join(f"{r} {v:.1f}" for r, v in plain.items())
            + f" | {chosen.sqnr_db:.1f} | {', '.join(chosen.float_layers) or '-'} | "
            f"{len(result.trials)} | {result.tuning_s:.1f} | "
            f"{chosen.state_bytes / _bytes(model):.3f} |"), True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--min-sqnr-db", type=float, default=20.0)
    parser.add_argument("--recipe", default="auto", choices=tuning.RECIPE_CHOICES)
    parser.add_argument("--budget-s", type=float, default=tuning.DEFAULT_BUDGET_S)
    parser.add_argument("--quick", action="store_true", help="digits-mlp and mtcnn-rnet only")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    figures = harness.start_figures()
    gate = tuning.Gate(min_sqnr_db=args.min_sqnr_db)
    config = tuning.TuningConfig(recipe=args.recipe, budget_s=args.budget_s)
    print(f"gate: {gate.describe()}, recipe {args.recipe}, budget {args.budget_s:g} s, "
          f"torch threads {torch.get_num_threads()}")
    print("| model | recipe | plain SQNR dB | tuned SQNR dB | float layers | trials | tuning s "
          "| size ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    met = failed = 0
    for item in zoo(["digits-mlp", "mtcnn-rnet"] if args.quick else args.only):
        line, ok = row(*item, gate, config)
        print(line, flush=True)
        met, failed = met + ok, failed + (not ok)
    figures.update(rows_met=met, rows_failed=failed)
    figures["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    harness.print_figures(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
