"""The end-of-run table and the ``--json`` summary. Flags (slower than fp32, low fidelity) are
``jobs.flags``'s. Must not import ray, click or torch."""

from __future__ import annotations

from jobs.flags import flag_texts

SUMMARY_FIELDS = (
    "name", "precision", "backend", "status", "reason", "key", "size_ratio", "sqnr_db",
    "top1_agreement", "latency_fp32_ms", "latency_ms", "speedup", "quantized_fraction",
    "error_type", "error_message", "artifact_uri", "attempts", "duration_s",
    "sqnr_db_outputs", "top1_output", "recipe", "float_layers", "tuning_trials", "tuning_s",
    "notes",
)
COLUMNS = ("model", "precision", "status", "size ratio", "SQNR dB", "speedup", "note")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def note_of(row: dict) -> str:
    """What a reader needs next to the numbers: why it failed, skipped, or is flagged."""
    if row["status"] == "failed":
        return f"{row.get('error_type')}: {(row.get('error_message') or '')[:90]}"
    if row["status"] == "skipped":
        return row.get("reason") or ""
    texts = flag_texts(row)
    kept = len(row.get("float_layers") or [])
    if kept or row.get("recipe") == "dynamic":      # static without fallback: nothing to say
        texts.append(f"{row.get('recipe')} int8" + (f", {kept} layer(s) kept float" if kept else ""))
    return "; ".join(texts)


def format_table(rows: list[dict]) -> str:
    """A plain-text table: model, precision, status, size ratio, SQNR, speedup, note."""
    body = [(r["name"], r["precision"], r["status"], _fmt(r.get("size_ratio"), ".3f"),
             _fmt(r.get("sqnr_db"), ".1f"), _fmt(r.get("speedup"), ".2f"), note_of(r))
            for r in sorted(rows, key=lambda r: (r["name"], r["precision"]))]
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *body)]
    widths[-1] = min(widths[-1], 100)
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c)[:w].ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return "\n".join(lines)


def summary_json(result) -> dict:
    """The run summary printed by ``--json``."""
    return {
        "run_id": result.run_id, "store": result.store, "exit_code": result.exit_code,
        "counts": result.counts, "duration_s": result.duration_s,
        "ray_started": result.ray_started, "ray_used": result.ray_used,
        "ray_mode": result.ray_mode,
        "manifest": f"{result.store}/manifest.json", "report": f"{result.store}/report.html",
        "rows": [{k: r.get(k) for k in SUMMARY_FIELDS} for r in result.rows],
    }
