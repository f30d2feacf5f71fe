"""Tests of jobs.report: the HTML page's content, escaping and charts, then the page in headless Chromium."""

from __future__ import annotations

import html.parser
import os
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest

from jobs.report import PRECISION_COLOURS, SLOW_COLOUR, render_report

EVIL = "<script>alert('x')</script>"


def _row(name, precision, status="ok", **metrics):
    row = {"name": name, "precision": precision, "backend": "fbgemm", "status": status,
           "size_ratio": None, "sqnr_db": None, "top1_agreement": None, "latency_fp32_ms": None,
           "latency_ms": None, "speedup": None, "error_type": None, "error_message": None}
    row.update(metrics)
    return row


ROWS = [
    _row("resnet", "fp16", size_ratio=0.5, sqnr_db=61.2, top1_agreement=1.0,
         latency_fp32_ms=2.0, latency_ms=40.0, speedup=0.05),           # fp16 slow on CPU: no flag
    _row("resnet", "int8", size_ratio=0.26, sqnr_db=31.5, top1_agreement=0.99,
         latency_fp32_ms=2.0, latency_ms=0.8, speedup=2.5),
    _row("slow-mlp", "int8", size_ratio=0.27, sqnr_db=35.0, top1_agreement=1.0,
         latency_fp32_ms=0.1, latency_ms=0.125, speedup=0.8),           # int8 slower than fp32
    _row(EVIL, "int8", status="failed", error_type="TraceError",
         error_message="cannot trace <if x.mean() > 0> & co"),
    _row("lstm", "fp16", status="skipped", size_ratio=0.5, sqnr_db=float("nan"), speedup=None),
]
# rows with a finite value, per chart
EXPECTED_BARS = {"size_ratio": 4, "sqnr_db": 3, "speedup": 3}


class _Collector(html.parser.HTMLParser):
    """Collects svg charts, their rects and all <script> tags of a page."""

    def __init__(self):
        super().__init__()
        self.charts, self.scripts, self.external = [], 0, []
        self.bars: dict[str, list[dict]] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(a[key])
        if tag == "svg" and "chart" in (a.get("class") or "").split():
            self.charts.append(a["data-metric"])
        if tag == "rect" and "bar" in (a.get("class") or "").split():
            self.bars.setdefault(self.charts[-1], []).append(a)


def _parse(page: str) -> _Collector:
    collector = _Collector()
    collector.feed(page)
    return collector


def test_page_is_self_contained_with_three_charts_and_one_bar_per_value():
    page = render_report(ROWS, run={"run_id": "20240101-abc", "updated_at": "2024-01-01T00:00:00Z"})
    parsed = _parse(page)
    assert parsed.charts == ["size_ratio", "sqnr_db", "speedup"]
    assert {m: len(b) for m, b in parsed.bars.items()} == EXPECTED_BARS
    assert parsed.scripts == 0 and parsed.external == []
    assert "<style>" in page and "@import" not in page and "url(" not in page
    resnet_int8 = [b for b in parsed.bars["size_ratio"]
                   if b["data-name"] == "resnet" and b["data-precision"] == "int8"]
    assert len(resnet_int8) == 1 and float(resnet_int8[0]["data-value"]) == pytest.approx(0.26)


def test_summary_counts_statuses_and_names_the_run():
    page = render_report(ROWS, run={"run_id": "20240101-abc", "updated_at": "2024-01-01T00:00:00Z"})
    summary = page.split('<p class="summary">', 1)[1].split("</p>", 1)[0]
    assert "<b>3</b> ok" in summary and "<b>1</b> failed" in summary and "<b>1</b> skipped" in summary
    assert "20240101-abc" in summary and "2024-01-01T00:00:00Z" in summary
    assert "updated" not in render_report(ROWS).split('<p class="summary">', 1)[1].split("</p>")[0]


def test_user_text_is_escaped_everywhere():
    page = render_report(ROWS, title="<b>zoo</b>")
    assert "<script>" not in page and EVIL not in page
    assert html.escape(EVIL) in page                            # the table cell
    assert "cannot trace &lt;if x.mean() &gt; 0&gt; &amp; co" in page
    assert "<title>&lt;b&gt;zoo&lt;/b&gt;</title>" in page
    # the failed row has no values, so it has no bars, but its n/a marks carry the escaped name
    assert f'data-name="{html.escape(EVIL, quote=True)}"' in page
    assert _parse(page).scripts == 0


def test_null_and_nan_values_are_marked_na_not_drawn_as_zero():
    page = render_report(ROWS)
    bars = _parse(page).bars
    assert not any(b["data-name"] == "lstm" for b in bars["sqnr_db"] + bars["speedup"])
    assert all(float(b["data-value"]) != 0.0 for m in bars for b in bars[m])
    sqnr_chart = page.split('data-metric="sqnr_db"', 1)[1].split("</svg>", 1)[0]
    assert sqnr_chart.count(">n/a</text>") == 2                # failed row and the NaN row
    assert 'data-value="nan"' not in page.lower() and ">nan<" not in page.lower()


def test_int8_slower_than_fp32_is_flagged_in_table_and_chart_but_fp16_is_not():
    page = render_report(ROWS)
    table = page.split("<table", 1)[1].split("</table>", 1)[0]
    slow_rows = [tr for tr in table.split("<tr") if "slower than fp32" in tr]
    assert len(slow_rows) == 1 and "slow-mlp" in slow_rows[0]
    speedup_bars = _parse(page).bars["speedup"]
    flagged = [b for b in speedup_bars if "slow" in b["class"].split()]
    assert [(b["data-name"], b["fill"]) for b in flagged] == [("slow-mlp", SLOW_COLOUR)]
    fp16 = next(b for b in speedup_bars if b["data-precision"] == "fp16")
    assert fp16["fill"] == PRECISION_COLOURS["fp16"]
    assert 'class="reference"' in page                          # the 1.0 line


def test_empty_rows_still_render_three_empty_charts():
    parsed = _parse(render_report([]))
    assert parsed.charts == ["size_ratio", "sqnr_db", "speedup"] and parsed.bars == {}


# ----------------------------------------------------------------------------- headless Chromium

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    path = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and
                 os.access(p, os.X_OK)), None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI must install it (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    return path


def _read_png_rgb(path: str) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG into ``[H, W, 3]`` uint8 (tests only)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.uint8)
    prev = np.zeros(width * bpp, np.int32)
    for y in range(height):
        out[y] = prev = _unfilter(raw[y, 0], raw[y, 1:].astype(np.int32), prev, bpp)
    return out.reshape(height, width, bpp)[:, :, :3]


def _unfilter(kind: int, line: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    if kind == 0:
        return line
    if kind == 2:
        return (line + prev) & 0xFF
    if kind == 1:   # Sub is a running sum per channel
        return (np.cumsum(line.reshape(-1, bpp), axis=0) & 0xFF).reshape(-1)
    cur = np.zeros_like(line)   # Average and Paeth depend on the pixel to the left: go byte by byte
    lv, pv = line.tolist(), prev.tolist()
    cv = [0] * len(lv)
    for i, v in enumerate(lv):
        a = cv[i - bpp] if i >= bpp else 0
        b = pv[i]
        if kind == 3:
            cv[i] = (v + (a + b) // 2) & 0xFF
            continue
        c = pv[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        cv[i] = (v + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    cur[:] = cv
    return cur


def _run_chromium(chromium: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=True)


def test_page_renders_in_headless_chromium_with_its_charts(tmp_path):
    chromium = _chromium()
    page = tmp_path / "report.html"
    page.write_text(render_report(ROWS, run={"run_id": "r1"}), encoding="utf-8")
    dom = _run_chromium(chromium, tmp_path, "--dump-dom", page.as_uri()).stdout
    parsed = _parse(dom)
    assert parsed.charts == ["size_ratio", "sqnr_db", "speedup"]
    assert {m: len(b) for m, b in parsed.bars.items()} == EXPECTED_BARS
    assert parsed.scripts == 0                                  # the escaped name stayed text

    shot = tmp_path / "shot.png"
    _run_chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri())
    assert shot.stat().st_size > 20_000
    pixels = _read_png_rgb(str(shot))
    assert pixels.shape == (1600, 1200, 3)
    colours = {tuple(int(c) for c in px) for px in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 50                                    # text, lines, bars: not a blank page
    for hex_colour in (PRECISION_COLOURS["fp16"], PRECISION_COLOURS["int8"], SLOW_COLOUR):
        rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        matches = int((np.abs(pixels.astype(int) - rgb).max(axis=2) <= 2).sum())
        assert matches > 200, f"no bars drawn in {hex_colour} ({matches} pixels)"
