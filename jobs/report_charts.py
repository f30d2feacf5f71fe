"""The report's inline SVG: the grouped bar charts (size, SQNR, speedup) and the per-model
sensitivity plots, plus the few formatting helpers ``jobs.report`` shares with them.

Everything drawn here is plain SVG text with every piece of user text escaped: no script, no
external resource. Flags (an int8 row slower than fp32, a row of low fidelity) come from
``jobs.flags``, the rules the table and the manifest notes use too. Must not import ray, click,
torch or anything in ``jobs`` but ``jobs.flags``.
"""

from __future__ import annotations

import html
import math
from typing import Any

from jobs.flags import LOW_FIDELITY_DB, finite_number, is_low_fidelity, is_slow_int8

PRECISION_COLOURS = {"fp16": "#3b75af", "int8": "#2a9d8f"}
OTHER_COLOUR, SLOW_COLOUR = "#8d99ae", "#d62828"
FLOAT_COLOUR = "#e9a23b"          # a sensitivity unit kept in float
SLOW_TEXT = "slower than fp32"
LOW_TEXT = "low fidelity"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: float, decimals: int) -> str:
    return f"{value:,.{decimals}f}"


def _flagged(metric: str, row: dict) -> tuple[bool, str]:
    """(flagged, why) of a row's bar in the chart of ``metric``."""
    if metric == "speedup" and is_slow_int8(row):
        return True, SLOW_TEXT
    if metric == "sqnr_db" and is_low_fidelity(row):
        return True, LOW_TEXT
    return False, ""


def _nice_step(raw: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is >= ``raw`` (axis ticks)."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))


def _shorten(name: str, limit: int = 18) -> str:
    # rotated labels run left under the neighbouring groups; the full name is in the <title>
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


class _ChartSvg:
    """Lays out one grouped bar chart: bars grouped by model, one bar per precision."""

    BAR, GAP, GROUP_GAP, LEFT, TOP, PLOT_H, LABEL_H = 26, 6, 22, 56, 20, 200, 96

    def __init__(self, metric: str, unit: str, decimals: int):
        self.metric, self.unit, self.decimals = metric, unit, decimals

    def draw(self, groups: list[tuple[str, list[dict]]]) -> str:
        values = [v for _, rs in groups for r in rs if (v := finite_number(r.get(self.metric))) is not None]
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
        value, precision = finite_number(row.get(self.metric)), str(row.get("precision"))
        y0, cx = self._y(0.0), x + self.BAR / 2
        flagged, flag_text = _flagged(self.metric, row)
        mark = "\u26a0" if flagged else ""
        kind = ("slow" if flag_text == SLOW_TEXT else "low") if flagged else ""
        tag = (f"<text class=\"precision{' flag' if flagged else ''}\" x=\"{cx:.1f}\" "
               f"y=\"{self.TOP + self.PLOT_H + 14}\" text-anchor=\"middle\">{_e(precision)}{mark}</text>")
        if value is None:
            return tag + (f"<text class=\"na\" data-name=\"{_e(row.get('name'))}\" data-precision=\"{_e(precision)}\" "
                          f"x=\"{cx:.1f}\" y=\"{y0 - 4:.1f}\" text-anchor=\"middle\">n/a</text>")
        top, bottom = sorted((self._y(value), y0))
        colour = SLOW_COLOUR if flagged else PRECISION_COLOURS.get(precision, OTHER_COLOUR)
        label = _fmt(value, self.decimals) + self.unit + (f" \u26a0 {flag_text}" if flagged else "")
        return tag + (
            f"<rect class=\"bar{' ' + kind if flagged else ''}\" data-name=\"{_e(row.get('name'))}\" "
            f"data-precision=\"{_e(precision)}\" data-value=\"{value:.6g}\" x=\"{x:.1f}\" y=\"{top:.1f}\" "
            f"width=\"{self.BAR}\" height=\"{max(bottom - top, 1.0):.1f}\" fill=\"{colour}\">"
            f"<title>{_e(row.get('name'))} {_e(precision)}: {_e(label)}</title></rect>"
            f"<text class=\"value{' flag' if flagged else ''}\" x=\"{cx:.1f}\" y=\"{top - 4:.1f}\" "
            f"text-anchor=\"middle\">{_e(_fmt(value, self.decimals))}{mark}</text>")


class SensitivitySvg:
    """One model's sensitivity ranking: a horizontal bar per unit, most costly first, its length
    the SQNR of the outputs with only that unit in int8 (shorter: costlier); units kept in float
    stand out; a dashed line marks the int8 low-fidelity threshold (``jobs.flags``)."""

    ROW_H, LEFT, RIGHT, TOP, PLOT_W = 18, 190, 70, 22, 300

    def draw(self, row: dict) -> str:
        units = [u for u in row.get("sensitivity_top") or [] if isinstance(u, dict)]
        kept = set(row.get("float_layers") or [])
        values = [v for u in units if (v := finite_number(u.get("sqnr_db"))) is not None]
        self.hi = max(40.0, min(100.0, max(values, default=0.0)))
        height = self.TOP + self.ROW_H * max(1, len(units)) + 26
        width = self.LEFT + self.PLOT_W + self.RIGHT
        parts = [self._bar(i, unit, unit.get("name") in kept) for i, unit in enumerate(units)]
        parts += self._axis(height)
        return (f"<svg class=\"sensitivity\" data-name=\"{_e(row.get('name'))}\" "
                f"xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" "
                f"viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"int8 sensitivity of "
                f"{_e(row.get('name'))}: SQNR with only one layer in int8\">" + "".join(parts)
                + "</svg>")

    def _x(self, value: float) -> float:
        return self.LEFT + self.PLOT_W * max(0.0, min(value, self.hi)) / self.hi

    def _bar(self, i: int, unit: dict, kept: bool) -> str:
        y, name = self.TOP + i * self.ROW_H, str(unit.get("name"))
        value = finite_number(unit.get("sqnr_db"))
        label = (f"<text x=\"{self.LEFT - 6}\" y=\"{y + 12}\" text-anchor=\"end\"><title>{_e(name)}"
                 f"</title>{_e(_shorten(name, 28))}</text>")
        if value is None:
            return label + (f"<text class=\"na\" x=\"{self.LEFT + 4}\" y=\"{y + 12}\">not "
                            f"measured (tuning budget)</text>")
        colour = FLOAT_COLOUR if kept else PRECISION_COLOURS["int8"]
        clipped = "\u2265 " if value > self.hi else ""
        text = f"{clipped}{_fmt(min(value, self.hi), 1)} dB" + (" (kept float)" if kept else "")
        return label + (
            f"<rect class=\"unit{' kept' if kept else ''}\" data-unit=\"{_e(name)}\" "
            f"data-value=\"{value:.6g}\" x=\"{self.LEFT}\" y=\"{y + 2}\" "
            f"width=\"{max(self._x(value) - self.LEFT, 1.0):.1f}\" height=\"{self.ROW_H - 5}\" "
            f"fill=\"{colour}\"><title>{_e(name)}: {_e(text)}</title></rect>"
            f"<text x=\"{self._x(value) + 4:.1f}\" y=\"{y + 12}\">{_e(text)}</text>")

    def _axis(self, height: float) -> list[str]:
        floor = LOW_FIDELITY_DB["int8"]
        xf, bottom = self._x(floor), height - 22
        parts = [f"<line x1=\"{self.LEFT}\" x2=\"{self.LEFT}\" y1=\"{self.TOP - 4}\" "
                 f"y2=\"{bottom}\" stroke=\"#44506a\"/>",
                 f"<line class=\"threshold\" x1=\"{xf:.1f}\" x2=\"{xf:.1f}\" y1=\"{self.TOP - 4}\" "
                 f"y2=\"{bottom}\" stroke=\"{SLOW_COLOUR}\" stroke-dasharray=\"4 3\"/>",
                 f"<text x=\"{xf:.1f}\" y=\"{self.TOP - 8}\" text-anchor=\"middle\">"
                 f"{floor:g} dB</text>"]
        for tick in (0.0, self.hi / 2, self.hi):
            parts.append(f"<text x=\"{self._x(tick):.1f}\" y=\"{height - 8}\" "
                         f"text-anchor=\"middle\">{tick:g}</text>")
        return parts
