"""The HTML report: one self-contained page with the manifest table, three bar charts and a
sensitivity plot per tuned int8 model.

Owns ``render_report``, which turns manifest rows (SPEC.md section 6 field names) into a page
that needs nothing else: inline ``<style>``, inline SVG (``jobs.report_charts``), no JavaScript,
no external CSS, fonts or images, so ``DEST/report.html`` opens anywhere, from any store,
offline. Rows slower than fp32 or of low fidelity are flagged (``jobs.flags``: the rules the run
table and the manifest notes use). Every piece of text is escaped: model names and error
messages are user input. Must not import ray, click, torch or anything in ``jobs`` but
``jobs.flags`` and ``jobs.report_charts``.
"""

from __future__ import annotations

from typing import Iterable

from jobs.flags import (LOW_FIDELITY_DB, finite_number, is_low_fidelity, is_slow_int8,
                        low_fidelity_text)
from jobs.report_charts import (FLOAT_COLOUR, LOW_TEXT, PRECISION_COLOURS, SLOW_COLOUR, SLOW_TEXT,
                                SensitivitySvg, _ChartSvg, _e, _fmt)

# (field, title, unit suffix, decimals) of each chart, in page order
CHARTS = (
    ("size_ratio", "Size ratio (artifact / fp32 state_dict; lower is smaller)", "", 3),
    ("sqnr_db", "SQNR against fp32 (dB; higher is closer)", " dB", 1),
    ("speedup", "Speedup over fp32 (higher is faster; line at 1.0)", "\u00d7", 2),
)
COLUMNS = (
    ("name", "model"), ("precision", "precision"), ("backend", "backend"),
    ("recipe", "recipe"), ("status", "status"), ("size_ratio", "size ratio"),
    ("sqnr_db", "SQNR dB"), ("top1_agreement", "top-1 agreement"),
    ("latency_fp32_ms", "latency fp32 ms"), ("latency_ms", "latency ms"), ("speedup", "speedup"),
    ("float_layers", "float layers"), ("error", "error"),
)
DECIMALS = {"size_ratio": 3, "sqnr_db": 1, "top1_agreement": 3, "latency_fp32_ms": 2,
            "latency_ms": 2, "speedup": 2}

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;
color:#1d2433;background:#fff}
h1{font-size:22px;margin:0 0 6px}h2{font-size:16px;margin:24px 0 6px}
.summary{margin:0 0 16px;color:#44506a}.summary b{color:#1d2433}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #d5dae3;padding:4px 8px}
th{background:#eef1f6;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.status-failed td{background:#fdecec}tr.status-skipped td{color:#6b7486}
td.na,text.na{color:#9aa3b5;fill:#9aa3b5;font-style:italic}
.flag{color:#d62828;font-weight:600;white-space:nowrap}svg.chart text.flag{fill:#d62828}
.flag.slow-note{white-space:normal}
tr.slow td.speedup,tr.lowfi td.sqnr_db{background:#fde2e2}
td.float_layers{max-width:260px;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
svg.sensitivity{display:block;margin:0 0 6px;background:#fbfcfe;border:1px solid #e3e7ee}
svg.sensitivity text{font-size:11px;fill:#1d2433}
td.error{max-width:420px;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;
white-space:pre-wrap;word-break:break-word}
.scroll{overflow-x:auto}.charts{display:flex;flex-wrap:wrap;gap:8px 24px}
figure{margin:0;max-width:100%;overflow-x:auto}figcaption{font-weight:600;margin:8px 0 4px}
svg.chart{display:block;margin:0 0 6px;background:#fbfcfe;border:1px solid #e3e7ee}
.slow-note{max-width:520px}svg.chart text{font-size:11px;fill:#1d2433}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:-1px}
"""


def render_report(rows: list[dict], *, title: str = "quantize-all report",
                  run: dict | None = None) -> str:
    """Render manifest rows as one self-contained HTML page.

    Args:
        rows: manifest rows (SPEC.md section 6 field names); missing fields read as null.
        title: the page title and heading.
        run: optional run facts for the summary line (``run_id`` or ``id``, ``updated_at``).

    Returns:
        The whole page as a string; the caller writes it (e.g. to ``DEST/report.html``).
    """
    rows = [dict(r) for r in rows]
    charts = "\n".join(_chart_section(rows, *spec) for spec in CHARTS)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n{_summary(rows, run or {})}\n"
        f"<h2>Conversions</h2>\n<div class=\"scroll\">{_table(rows)}</div>\n"
        f"<h2>Charts</h2>\n{_legend()}\n<div class=\"charts\">\n{charts}\n</div>\n"
        f"{_sensitivity_section(rows)}</body>\n</html>\n"
    )


def _summary(rows: list[dict], run: dict) -> str:
    counts = {s: sum(1 for r in rows if r.get("status") == s) for s in ("ok", "failed", "skipped")}
    parts = [f"<b>{counts[s]}</b> {s}" for s in counts]
    other = len(rows) - sum(counts.values())
    if other:
        parts.append(f"<b>{other}</b> other")
    run_id = run.get("run_id", run.get("id"))
    parts.append(f"run <b>{_e(run_id) if run_id is not None else 'n/a'}</b>")
    if run.get("updated_at") is not None:
        parts.append(f"updated <b>{_e(run['updated_at'])}</b>")
    joined = " \u00b7 ".join(parts)
    return f"<p class=\"summary\">{joined} ({len(rows)} rows)</p>"


def _table(rows: list[dict]) -> str:
    head = "".join(f"<th>{_e(label)}</th>" for _, label in COLUMNS)
    body = "\n".join(_table_row(r) for r in rows) or (
        f"<tr><td colspan=\"{len(COLUMNS)}\" class=\"na\">no rows</td></tr>")
    return f"<table class=\"manifest\">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _table_row(row: dict) -> str:
    ok = row.get("status") == "ok"
    flags = {"speedup": SLOW_TEXT if is_slow_int8(row) else None,
             "sqnr_db": LOW_TEXT if ok and is_low_fidelity(row) else None}
    classes = f"status-{_e(row.get('status') or 'unknown')}" + \
        (" slow" if flags["speedup"] else "") + (" lowfi" if flags["sqnr_db"] else "")
    cells = []
    for key, _ in COLUMNS:
        if key == "error":
            cells.append(_error_cell(row))
        elif key in DECIMALS:
            cells.append(_number_cell(key, finite_number(row.get(key)), flags.get(key),
                                      low_fidelity_text(row) if flags.get(key) == LOW_TEXT else None))
        elif key == "float_layers":
            layers = row.get(key)
            text = ", ".join(map(str, layers)) if layers else ("none" if layers == [] else "")
            cells.append(f"<td class=\"{key}\">{_e(text)}</td>")
        else:
            cells.append(f"<td class=\"{key}\">{_e(row.get(key))}</td>")
    return f"<tr class=\"{classes}\">{''.join(cells)}</tr>"


def _number_cell(key: str, value: float | None, flag: str | None, why: str | None = None) -> str:
    if value is None:
        return f"<td class=\"num {key} na\">n/a</td>"
    text = _fmt(value, DECIMALS[key]) + ("\u00d7" if key == "speedup" else "")
    if flag:
        title = f" title=\"{_e(why)}\"" if why else ""
        text += f" <span class=\"flag\"{title}>\u26a0 {flag}</span>"
    return f"<td class=\"num {key}\">{text}</td>"


def _error_cell(row: dict) -> str:
    kind, message = row.get("error_type"), row.get("error_message")
    if not kind and not message:
        return "<td class=\"error\"></td>"
    text = f"<b>{_e(kind)}</b>: {_e(message)}" if kind else _e(message)
    return f"<td class=\"error\">{text}</td>"


def _legend() -> str:
    floors = ", ".join(f"{p} {v:g} dB" for p, v in LOW_FIDELITY_DB.items())
    items = [(p, c) for p, c in PRECISION_COLOURS.items()] + [
        (f"int8 {SLOW_TEXT}, or {LOW_TEXT} (SQNR below {floors})", SLOW_COLOUR)]
    spans = "".join(f"<span><i style=\"background:{c}\"></i>{_e(p)}</span>" for p, c in items)
    return f"<p class=\"legend\">{spans}<span class=\"na\">n/a = not measured</span></p>"


def _groups(rows: Iterable[dict]) -> list[tuple[str, list[dict]]]:
    """Rows grouped by model name (first appearance order), precisions sorted within a group."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get("name")), []).append(row)
    return [(n, sorted(rs, key=lambda r: str(r.get("precision")))) for n, rs in groups.items()]


def _chart_section(rows: list[dict], metric: str, title: str, unit: str, decimals: int) -> str:
    svg = _ChartSvg(metric, unit, decimals).draw(_groups(rows))
    note = ""
    slow = [r for r in rows if is_slow_int8(r)] if metric == "speedup" else []
    low = [r for r in rows if r.get("status") == "ok" and is_low_fidelity(r)] \
        if metric == "sqnr_db" else []
    if slow:
        items = ", ".join(f"{_e(r.get('name'))} int8 ({_fmt(finite_number(r['speedup']), 2)}\u00d7)" for r in slow)
        note = f"\n<p class=\"flag slow-note\">\u26a0 {SLOW_TEXT}: {items}</p>"
    if low:
        items = "; ".join(f"{_e(r.get('name'))} {_e(low_fidelity_text(r))}" for r in low)
        note = f"\n<p class=\"flag slow-note low-note\">\u26a0 {items}</p>"
    return f"<figure>\n<figcaption>{_e(title)}</figcaption>\n{svg}{note}\n</figure>"


def _sensitivity_section(rows: list[dict]) -> str:
    """One plot per int8 row whose tuning measured a sensitivity ranking (none: no section)."""
    tuned = [r for r in rows if r.get("precision") == "int8" and r.get("sensitivity_top")]
    if not tuned:
        return ""
    figures = []
    for row in tuned:
        kept = ", ".join(map(str, row.get("float_layers") or [])) or "none"
        link = next((f for f in row.get("files") or [] if isinstance(f, dict)
                     and f.get("path") == "sensitivity.json"), None)
        href = (f" (<a href=\"artifacts/{_e(row.get('name'))}/int8/{_e(row.get('key'))}/"
                f"sensitivity.json\">every unit</a>)") if link and row.get("key") else ""
        caption = (f"{_e(row.get('name'))} int8, {_e(row.get('recipe'))}: kept float: "
                   f"{_e(kept)}; {_e(row.get('tuning_trials'))} trials in "
                   f"{_e(row.get('tuning_s'))} s{href}")
        figures.append(f"<figure>\n<figcaption>{caption}</figcaption>\n"
                       f"{SensitivitySvg().draw(row)}\n</figure>")
    return ("<h2>int8 sensitivity</h2>\n<p class=\"legend\">The most costly layers of each tuned "
            "model: SQNR of the outputs with only that layer in int8 (shorter is costlier), "
            f"<span><i style=\"background:{FLOAT_COLOUR}\"></i>kept in float</span>, dashed "
            f"line at {LOW_FIDELITY_DB['int8']:g} dB.</p>\n<div class=\"charts\">\n"
            + "\n".join(figures) + "\n</div>\n")


