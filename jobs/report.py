"""The HTML report: one self-contained page with the manifest table and three bar charts.

Owns ``render_report``, which turns manifest rows (SPEC.md section 6 field names) into a page
that needs nothing else: inline ``<style>``, inline SVG drawn here, no JavaScript, no external
CSS, fonts or images, so ``DEST/report.html`` opens anywhere, from any store, offline.
Every piece of text is escaped: model names and error messages are user input.
Must not import ray, click, torch or anything else in ``jobs``.
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterable

# (field, title, unit suffix, decimals) of each chart, in page order
CHARTS = (
    ("size_ratio", "Size ratio (artifact / fp32 state_dict; lower is smaller)", "", 3),
    ("sqnr_db", "SQNR against fp32 (dB; higher is closer)", " dB", 1),
    ("speedup", "Speedup over fp32 (higher is faster; line at 1.0)", "\u00d7", 2),
)
COLUMNS = (
    ("name", "model"), ("precision", "precision"), ("backend", "backend"),
    ("status", "status"), ("size_ratio", "size ratio"), ("sqnr_db", "SQNR dB"),
    ("top1_agreement", "top-1 agreement"), ("latency_fp32_ms", "latency fp32 ms"),
    ("latency_ms", "latency ms"), ("speedup", "speedup"), ("error", "error"),
)
DECIMALS = {"size_ratio": 3, "sqnr_db": 1, "top1_agreement": 3, "latency_fp32_ms": 2,
            "latency_ms": 2, "speedup": 2}
PRECISION_COLOURS = {"fp16": "#3b75af", "int8": "#2a9d8f"}
OTHER_COLOUR, SLOW_COLOUR = "#8d99ae", "#d62828"
SLOW_TEXT = "slower than fp32"

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
tr.slow td.speedup{background:#fde2e2}
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
        f"<h2>Charts</h2>\n{_legend()}\n<div class=\"charts\">\n{charts}\n</div>\n</body>\n</html>\n"
    )


def is_slow_int8(row: dict) -> bool:
    """True for an int8 row that measured a speedup below 1.0 (slower than its fp32 source)."""
    speedup = _number(row.get("speedup"))
    return row.get("precision") == "int8" and speedup is not None and speedup < 1.0


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _number(value: Any) -> float | None:
    """A finite float, or None for null, NaN, inf, booleans and anything non-numeric."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: float, decimals: int) -> str:
    return f"{value:,.{decimals}f}"


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
    slow = is_slow_int8(row)
    classes = f"status-{_e(row.get('status') or 'unknown')}" + (" slow" if slow else "")
    cells = []
    for key, _ in COLUMNS:
        if key == "error":
            cells.append(_error_cell(row))
        elif key in DECIMALS:
            cells.append(_number_cell(key, _number(row.get(key)), slow and key == "speedup"))
        else:
            cells.append(f"<td class=\"{key}\">{_e(row.get(key))}</td>")
    return f"<tr class=\"{classes}\">{''.join(cells)}</tr>"


def _number_cell(key: str, value: float | None, flag: bool) -> str:
    if value is None:
        return f"<td class=\"num {key} na\">n/a</td>"
    text = _fmt(value, DECIMALS[key]) + ("\u00d7" if key == "speedup" else "")
    if flag:
        text += f" <span class=\"flag\">\u26a0 {SLOW_TEXT}</span>"
    return f"<td class=\"num {key}\">{text}</td>"


def _error_cell(row: dict) -> str:
    kind, message = row.get("error_type"), row.get("error_message")
    if not kind and not message:
        return "<td class=\"error\"></td>"
    text = f"<b>{_e(kind)}</b>: {_e(message)}" if kind else _e(message)
    return f"<td class=\"error\">{text}</td>"


def _legend() -> str:
    items = [(p, c) for p, c in PRECISION_COLOURS.items()] + [(f"int8 {SLOW_TEXT}", SLOW_COLOUR)]
    spans = "".join(f"<span><i style=\"background:{c}\"></i>{_e(p)}</span>" for p, c in items)
    return f"<p class=\"legend\">{spans}<span class=\"na\">n/a = not measured</span></p>"


def _groups(rows: Iterable[dict]) -> list[tuple[str, list[dict]]]:
    """Rows grouped by model name (first appearance order), precisions sorted within a group."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get("name")), []).append(row)
    return [(n, sorted(rs, key=lambda r: str(r.get("precision")))) for n, rs in groups.items()]


def _nice_step(raw: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is >= ``raw`` (axis ticks)."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))


def _shorten(name: str, limit: int = 18) -> str:
    # rotated labels run left under the neighbouring groups; the full name is in the <title>
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def _chart_section(rows: list[dict], metric: str, title: str, unit: str, decimals: int) -> str:
    svg = _ChartSvg(metric, unit, decimals).draw(_groups(rows))
    note = ""
    slow = [r for r in rows if is_slow_int8(r)] if metric == "speedup" else []
    if slow:
        items = ", ".join(f"{_e(r.get('name'))} int8 ({_fmt(_number(r['speedup']), 2)}\u00d7)" for r in slow)
        note = f"\n<p class=\"flag slow-note\">\u26a0 {SLOW_TEXT}: {items}</p>"
    return f"<figure>\n<figcaption>{_e(title)}</figcaption>\n{svg}{note}\n</figure>"


class _ChartSvg:
    """Lays out one grouped bar chart: bars grouped by model, one bar per precision."""

    BAR, GAP, GROUP_GAP, LEFT, TOP, PLOT_H, LABEL_H = 26, 6, 22, 56, 20, 200, 96

    def __init__(self, metric: str, unit: str, decimals: int):
        self.metric, self.unit, self.decimals = metric, unit, decimals

    def draw(self, groups: list[tuple[str, list[dict]]]) -> str:
        values = [v for _, rs in groups for r in rs if (v := _number(r.get(self.metric))) is not None]
        lo = min([0.0] + values)
        hi = max([1.0 if self.metric == "speedup" else 0.0] + values)
        self.step = _nice_step((hi - lo) / 4 if hi > lo else 0.25)
        self.lo = math.floor(lo / self.step) * self.step
        self.hi = max(math.ceil(hi / self.step) * self.step, self.lo + self.step)
        nbars = sum(len(rs) for _, rs in groups)
        width = max(420, self.LEFT + nbars * (self.BAR + self.GAP) + len(groups) * self.GROUP_GAP + 20)
        height = self.TOP + self.PLOT_H + self.LABEL_H
        parts = self._axis(width)
        x = self.LEFT + self.GROUP_GAP / 2
        for name, group_rows in groups:
            parts += self._group(name, group_rows, x)
            x += len(group_rows) * (self.BAR + self.GAP) + self.GROUP_GAP
        if not groups:
            parts.append(f"<text class=\"na\" x=\"{self.LEFT + 10}\" y=\"{self.TOP + 20}\">no rows</text>")
        return (f"<svg class=\"chart\" data-metric=\"{self.metric}\" xmlns=\"http://www.w3.org/2000/svg\" "
                f"width=\"{width:.0f}\" height=\"{height}\" viewBox=\"0 0 {width:.0f} {height}\" "
                f"role=\"img\" aria-label=\"{_e(self.metric)} per model and precision\">"
                + "".join(parts) + "</svg>")

    def _y(self, value: float) -> float:
        return self.TOP + self.PLOT_H * (self.hi - value) / (self.hi - self.lo)

    def _axis(self, width: float) -> list[str]:
        parts = []
        for i in range(round((self.hi - self.lo) / self.step) + 1):
            v = self.lo + self.step * i
            y = self._y(v)
            parts.append(f"<line x1=\"{self.LEFT}\" x2=\"{width - 10:.0f}\" y1=\"{y:.1f}\" y2=\"{y:.1f}\" "
                         f"stroke=\"#e3e7ee\"/><text x=\"{self.LEFT - 6}\" y=\"{y + 4:.1f}\" "
                         f"text-anchor=\"end\">{round(v, 9):g}</text>")
        y0 = self._y(0.0)
        parts.append(f"<line x1=\"{self.LEFT}\" x2=\"{width - 10:.0f}\" y1=\"{y0:.1f}\" y2=\"{y0:.1f}\" stroke=\"#44506a\"/>")
        if self.metric == "speedup":
            y1 = self._y(1.0)
            parts.append(f"<line class=\"reference\" x1=\"{self.LEFT}\" x2=\"{width - 10:.0f}\" y1=\"{y1:.1f}\" "
                         f"y2=\"{y1:.1f}\" stroke=\"{SLOW_COLOUR}\" stroke-dasharray=\"5 4\"/>")
        return parts

    def _group(self, name: str, rows: list[dict], x0: float) -> list[str]:
        parts, x = [], x0
        for row in rows:
            parts.append(self._bar(row, x))
            x += self.BAR + self.GAP
        cx, ly = (x0 + x - self.GAP) / 2, self.TOP + self.PLOT_H + 34
        parts.append(f"<text class=\"model\" x=\"{cx:.1f}\" y=\"{ly}\" text-anchor=\"end\" "
                     f"transform=\"rotate(-30 {cx:.1f} {ly})\"><title>{_e(name)}</title>"
                     f"{_e(_shorten(name))}</text>")
        return parts

    def _bar(self, row: dict, x: float) -> str:
        value, precision = _number(row.get(self.metric)), str(row.get("precision"))
        y0, cx = self._y(0.0), x + self.BAR / 2
        slow = self.metric == "speedup" and is_slow_int8(row)
        mark = "\u26a0" if slow else ""
        tag = (f"<text class=\"precision{' flag' if slow else ''}\" x=\"{cx:.1f}\" "
               f"y=\"{self.TOP + self.PLOT_H + 14}\" text-anchor=\"middle\">{_e(precision)}{mark}</text>")
        if value is None:
            return tag + (f"<text class=\"na\" data-name=\"{_e(row.get('name'))}\" data-precision=\"{_e(precision)}\" "
                          f"x=\"{cx:.1f}\" y=\"{y0 - 4:.1f}\" text-anchor=\"middle\">n/a</text>")
        top, bottom = sorted((self._y(value), y0))
        colour = SLOW_COLOUR if slow else PRECISION_COLOURS.get(precision, OTHER_COLOUR)
        label = _fmt(value, self.decimals) + self.unit + (f" \u26a0 {SLOW_TEXT}" if slow else "")
        return tag + (
            f"<rect class=\"bar{' slow' if slow else ''}\" data-name=\"{_e(row.get('name'))}\" "
            f"data-precision=\"{_e(precision)}\" data-value=\"{value:.6g}\" x=\"{x:.1f}\" y=\"{top:.1f}\" "
            f"width=\"{self.BAR}\" height=\"{max(bottom - top, 1.0):.1f}\" fill=\"{colour}\">"
            f"<title>{_e(row.get('name'))} {_e(precision)}: {_e(label)}</title></rect>"
            f"<text class=\"value{' flag' if slow else ''}\" x=\"{cx:.1f}\" y=\"{top - 4:.1f}\" "
            f"text-anchor=\"middle\">{_e(_fmt(value, self.decimals))}{mark}</text>")
