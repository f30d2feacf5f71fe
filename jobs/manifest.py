"""The manifest: one row per (model, precision), as ``manifest.json`` and ``manifest.parquet``.

Owns the row schema (SPEC.md section 6: those names exactly, plus a few extra fields), merging a
run's results into the zoo's current state, and writing both files atomically. The manifest is the
zoo's *current state*: a row that a run skipped keeps the status and run_id of the run that made
it; what each run did (``converted``, ``skipped`` and why) is in ``runs/RUN_ID.json``.

No non-finite number is ever written (strict JSON parsers reject a bare ``NaN``): a result or a
stored row holding one becomes a ``failed`` row naming the field (``NonFiniteValue``), so the
next run converts it again, and ``manifest.json`` is written with ``allow_nan=False``.
Must not import ray or click.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.store import Store

SCHEMA_VERSION = 1
MANIFEST_JSON = "manifest.json"
MANIFEST_PARQUET = "manifest.parquet"

_FILE = pa.struct([("path", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64())])
_UNIT = pa.struct([("name", pa.string()), ("sqnr_db", pa.float64())])

# SPEC.md section 6, in order, then our additions.
SCHEMA = pa.schema([
    ("name", pa.string()), ("precision", pa.string()), ("backend", pa.string()),
    ("status", pa.string()), ("key", pa.string()), ("run_id", pa.string()),
    ("source_uri", pa.string()), ("source_sha256", pa.string()), ("source_bytes", pa.int64()),
    ("artifact_uri", pa.string()), ("artifact_sha256", pa.string()),
    ("artifact_bytes", pa.int64()), ("size_ratio", pa.float64()), ("params", pa.int64()),
    ("quantized_fraction", pa.float64()), ("calibration_batches", pa.int64()),
    ("sqnr_db", pa.float64()), ("top1_agreement", pa.float64()),
    ("latency_fp32_ms", pa.float64()), ("latency_ms", pa.float64()), ("speedup", pa.float64()),
    ("error_type", pa.string()), ("error_message", pa.string()), ("attempts", pa.int64()),
    ("node", pa.string()), ("started_at", pa.string()), ("finished_at", pa.string()),
    ("duration_s", pa.float64()), ("torch_version", pa.string()),
    ("quantizer_version", pa.string()), ("files", pa.list_(_FILE)),
    # additions
    ("factory", pa.string()), ("observer", pa.string()), ("fp32_bytes", pa.int64()),
    ("fidelity_rows", pa.int64()), ("notes", pa.string()), ("retired", pa.bool_()),
    # fidelity per output: one SQNR per output tensor (quantizer.fidelity.flatten_outputs order)
    # and the index of the class-score output top1_agreement was measured on (null: none)
    ("sqnr_db_outputs", pa.list_(pa.float64())), ("top1_output", pa.int64()),
    # how the artifact was made: "fp16" | "static" | "dynamic", the int8 units kept in float,
    # and the accuracy-gated search that chose them (quantizer.tune_int8; docs/tuning.md)
    ("recipe", pa.string()), ("float_layers", pa.list_(pa.string())),
    ("tuning_trials", pa.int64()), ("tuning_s", pa.float64()), ("recipe_reason", pa.string()),
    ("top1_drop", pa.float64()), ("sensitivity_top", pa.list_(_UNIT)),
])
FIELDS = tuple(SCHEMA.names)
# Fields that describe the artifact: a failed attempt keeps the last good values of these.
ARTIFACT_FIELDS = (
    "key", "run_id", "artifact_uri", "artifact_sha256", "artifact_bytes", "size_ratio",
    "quantized_fraction", "calibration_batches", "sqnr_db", "top1_agreement",
    "latency_fp32_ms", "latency_ms", "speedup", "files", "torch_version", "quantizer_version",
    "sqnr_db_outputs", "top1_output", "recipe", "float_layers", "tuning_trials", "tuning_s",
    "recipe_reason", "top1_drop", "sensitivity_top",
)


class ManifestError(ValueError):
    """A manifest row holds a value the manifest never contains (a non-finite number)."""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def blank_row(**values) -> dict:
    """A row with every field present (None where unknown)."""
    row = dict.fromkeys(FIELDS)
    row["retired"] = False
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise KeyError(f"not manifest fields: {sorted(unknown)}")
    row.update(values)
    return row


def non_finite_fields(row: dict) -> list[str]:
    """The fields of ``row`` holding a non-finite number (at any depth), e.g. ``['sqnr_db']``."""
    def bad(value) -> bool:
        if isinstance(value, float):
            return not math.isfinite(value)
        if isinstance(value, dict):
            return any(bad(v) for v in value.values())
        return isinstance(value, (list, tuple)) and any(bad(v) for v in value)
    return [k for k, v in row.items() if bad(v)]


def refuse_non_finite(row: dict) -> dict:
    """``row`` unchanged when every number is finite; else a ``failed`` row naming the fields,
    without the artifact that produced them (``merge_result`` restores the last good one)."""
    fields = non_finite_fields(row)
    if not fields:
        return row
    found = ", ".join(f"{k} = {row[k]!r}" for k in fields)
    dropped = [f for f in ARTIFACT_FIELDS if f not in ("key", "run_id")] + fields
    return dict(row, **dict.fromkeys(dropped), status="failed", error_type="NonFiniteValue",
                error_message=f"{row.get('name')} ({row.get('precision')}): {found}; the "
                              f"manifest never records a non-finite number, so this row failed "
                              f"and the next run converts it again")


def merge_result(previous: dict | None, result: dict) -> dict:
    """The new current-state row for one (model, precision) after an attempt.

    A failed attempt keeps the last good artifact fields (a consumer never loses a working
    model); its error fields and attempt metadata are the new attempt's. A result holding a
    non-finite number is a failed attempt (``refuse_non_finite``).
    """
    result = refuse_non_finite(result)
    row = blank_row(**{k: v for k, v in result.items() if k in FIELDS})
    if result.get("status") == "failed" and previous and previous.get("artifact_uri"):
        for name in ARTIFACT_FIELDS:
            if name == "key":
                continue  # the failed attempt's key is kept, so the next run retries it
            row[name] = previous.get(name)
        row["notes"] = f"last attempt failed; artifact fields are from run {previous.get('run_id')}"
    return row


class Manifest:
    """The rows of ``DEST/manifest.json``, keyed by (name, precision)."""

    def __init__(self, rows: Iterable[dict] = (), updated_at: str | None = None):
        self.rows: dict[tuple[str, str], dict] = {}
        for row in rows:   # a NaN a manifest of an older version holds: failed, converted again
            self.rows[(row["name"], row["precision"])] = blank_row(
                **{k: v for k, v in refuse_non_finite(row).items() if k in FIELDS})
        self.updated_at = updated_at

    @classmethod
    def load(cls, store: Store) -> "Manifest":
        """Read DEST's manifest (an empty one when DEST has none yet)."""
        doc = store.read_json(MANIFEST_JSON)
        if doc is None:
            return cls()
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{store.display}/{MANIFEST_JSON}: schema_version {doc.get('schema_version')!r} "
                f"is not {SCHEMA_VERSION}; this quantize-all cannot update it")
        return cls(doc.get("rows", []), doc.get("updated_at"))

    def get(self, name: str, precision: str) -> dict | None:
        return self.rows.get((name, precision))

    def record(self, result: dict) -> dict:
        """Merge one attempt's result; return the row now stored (failed if it held a NaN)."""
        key = (result["name"], result["precision"])
        self.rows[key] = merge_result(self.rows.get(key), result)
        return self.rows[key]

    def mark_retired(self, live_names: set[str]) -> list[tuple[str, str]]:
        """Flag rows whose model left the zoo (artifacts are kept); un-flag ones that came back."""
        changed = []
        for key, row in self.rows.items():
            retired = key[0] not in live_names
            if bool(row.get("retired")) != retired:
                row["retired"] = retired
                changed.append(key)
        return changed

    def sorted_rows(self) -> list[dict]:
        return [self.rows[k] for k in sorted(self.rows)]

    def write(self, store: Store) -> None:
        """Write manifest.parquet then manifest.json, each atomically.

        Raises:
            ManifestError: a row holds a non-finite number (rows set outside ``record``);
                nothing is written.
        """
        self.updated_at = now_iso()
        rows = self.sorted_rows()
        bad = [f"{r['name']} ({r['precision']}): {', '.join(non_finite_fields(r))}"
               for r in rows if non_finite_fields(r)]
        if bad:
            raise ManifestError(f"{store.display}/{MANIFEST_JSON} not written: non-finite numbers "
                                f"in {'; '.join(bad)}; the manifest never holds one")
        doc = json.dumps({"schema_version": SCHEMA_VERSION, "updated_at": self.updated_at,
                          "rows": rows}, indent=1, allow_nan=False, default=str)
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        store.write_bytes(MANIFEST_PARQUET, buf.getvalue())
        store.write_bytes(MANIFEST_JSON, doc.encode())


def read_parquet_rows(store: Store) -> list[dict]:
    """The rows of manifest.parquet as dicts (for tests and consumers)."""
    data = store.read_bytes(MANIFEST_PARQUET)
    return [] if data is None else pq.read_table(pa.BufferReader(data)).to_pylist()
