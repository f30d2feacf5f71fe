"""Flags on an ``ok`` row: the one home of the rules that the manifest ``notes``, the run table
(``jobs.summary``) and the report (``jobs.report``) all show.

- **Slower than fp32**: an int8 row whose measured speedup is below 1.0.
- **Low fidelity**: a row whose SQNR against fp32 (all outputs together, or any one output of a
  model with several) is below ``LOW_FIDELITY_DB`` for its precision. The thresholds:
  - int8: 20 dB, a noise power of 1 % of the signal's (an RMS error of 10 %). Well-calibrated
    int8 CNNs measure 30-40 dB here (the demo zoo, ResNet-18, CREPE at 29 dB); 20 dB is also
    the gate tuning uses in the issue-13 measurements (docs/tuning.md); the broken rows that
    motivated the flag (MTCNN int8 with quantized PReLUs) measured 1.7-11.6 dB.
  - fp16: 40 dB (an RMS error of 1 %). fp16 rounding alone (11 significant bits) gives about
    60-75 dB on healthy models (the demo zoo, CREPE after its BatchNorm rewrite); 40 dB is the
    margin the artifacts' reload fingerprint allows (``quantizer.fingerprint``); an overflow or
    a lost buffer lands far below it (CREPE-full with its inf running_var: 5.8 dB).
  A flag is not a failure: ``min_sqnr_db`` is the gate. It says that a shipped row is far below
  what its precision normally reaches.

Pure functions of a row (manifest field names). Must not import anything but the standard library.
"""

from __future__ import annotations

import math
from typing import Any

LOW_FIDELITY_DB = {"int8": 20.0, "fp16": 40.0}
SLOW_TEXT = "SLOWER than fp32"
LOW_TEXT = "LOW FIDELITY"


def finite_number(value: Any) -> float | None:
    """A finite float, or None for null, NaN, inf, booleans and anything non-numeric."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def is_slow_int8(row: dict) -> bool:
    """An int8 row that measured a speedup below 1.0 (slower than its fp32 source)."""
    speedup = finite_number(row.get("speedup"))
    return row.get("precision") == "int8" and speedup is not None and speedup < 1.0


def worst_fidelity(row: dict) -> tuple[str, float] | None:
    """(what, dB) of the lowest SQNR the row measured: ``SQNR`` over all outputs, or
    ``output N`` of a model with several outputs; None when nothing was measured."""
    found = [("SQNR", finite_number(row.get("sqnr_db")))]
    outputs = row.get("sqnr_db_outputs") or []
    if len(outputs) > 1:
        found += [(f"output {i}", finite_number(v)) for i, v in enumerate(outputs)]
    found = [(what, value) for what, value in found if value is not None]
    return min(found, key=lambda item: item[1]) if found else None


def is_low_fidelity(row: dict) -> bool:
    floor = LOW_FIDELITY_DB.get(str(row.get("precision")))
    worst = worst_fidelity(row)
    return floor is not None and worst is not None and worst[1] < floor


def low_fidelity_text(row: dict) -> str | None:
    """``LOW FIDELITY: output 1 at 8.3 dB < 20 dB (int8)``, or None when not flagged."""
    if not is_low_fidelity(row):
        return None
    what, value = worst_fidelity(row)
    floor = LOW_FIDELITY_DB[row["precision"]]
    return f"{LOW_TEXT}: {what} {value:.1f} dB < {floor:g} dB ({row['precision']})"


def flag_texts(row: dict) -> list[str]:
    """Every flag of an ``ok`` row, as the table and the manifest notes say them."""
    if row.get("status") not in (None, "ok"):
        return []
    texts = [low_fidelity_text(row)]
    if is_slow_int8(row):
        texts.append(SLOW_TEXT)
    return [t for t in texts if t]
