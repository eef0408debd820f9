"""`qlin quantize --report FILE.html`: one self-contained page (no script,
nothing fetched) with the layer table and an inline SVG chart of each layer's weight SQNR, output
SQNR and sensitivity by depth; rendered in headless Chromium, whose screenshot must have the
window's size and the chart's colors drawn.

Chromium is not part of CI (`apt-get install -y chromium` took 104 s on the dev machine, and a
browser is not qlin's dependency): there the rendering test skips with that reason.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib

import pytest
from safetensors.torch import load_file, save_file

from conftest import SAMPLES

from qlin_cli import QuantConfig
from qlin_cli.api import QuantizeOptions, quantize_checkpoint

COLORS = {"weight SQNR": (0x1F, 0x77, 0xB4), "output SQNR": (0xFF, 0x7F, 0x0E), "sensitivity": (0x2C, 0xA0, 0x2C)}
WIDTH, HEIGHT = 1000, 900


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The encoder in static mode with calibration and a --min-sqnr target it misses all-int8, so
    that all three series are measured (on 32 samples: the fallback runs the model per layer)."""
    root = tmp_path_factory.mktemp("html")
    test = load_file(SAMPLES / "digits_test.safetensors")["inputs"][:32]
    save_file({"inputs": test}, root / "eval.safetensors")
    report = quantize_checkpoint(
        SAMPLES / "encoder.safetensors", QuantConfig(mode="static", kernel="fbgemm"),
        QuantizeOptions(output=root / "e.safetensors", model="sample_models.encoder:build", report=root / "r.html",
                        calib=SAMPLES / "digits_calib.safetensors", calib_samples=32,
                        eval_inputs=root / "eval.safetensors", min_sqnr=50.0),
    )
    return root / "r.html", report


def test_page_is_self_contained_and_holds_the_numbers(page):
    path, report = page
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "<table>" in text
    assert "<script" not in text.lower() and not re.search(r"\b(src|href)\s*=", text, re.I)
    assert "@import" not in text and "url(" not in text
    assert not (set(re.findall(r"https?://[^\s\"']+", text)) - {"http://www.w3.org/2000/svg"})  # a namespace, not fetched
    assert not path.with_suffix(".md").exists() and not path.with_suffix(".json").exists()
    sensitivity = report.sensitivity_db()
    assert len(sensitivity) >= 7  # every quantized layer's was measured (the target needed fallback)
    for r in report.layers:  # each measured point carries its value, to the hundredth
        assert f"{r.name}: weight SQNR {r.weight_sqnr_db:.2f} dB" in text
        assert f"{r.name}: output SQNR {r.output_sqnr_db:.2f} dB" in text
        if r.name in sensitivity:
            assert f"{r.name}: sensitivity (model output SQNR, layer alone int8) {sensitivity[r.name]:.2f} dB" in text
    floats = [r.name for r in report.layers if r.status != "quantized"]
    assert floats and all(f"<title>{name}: kept float</title>" in text for name in floats)
    # the points are drawn by depth: x grows with the layer's index
    xs = [float(m) for m in re.findall(r'<circle cx="([\d.]+)"[^>]*fill="#1f77b4"', text)]
    assert len(xs) == len(report.layers) and xs == sorted(xs) and len(set(xs)) == len(xs)


def _read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line[j:j + 3]) for j in range(0, stride, bpp))
        rows[-1] = list(rows[-1])
        prev = line
    return width, height, rows


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (apt-get install -y chromium); "
                                                "CI does not install a browser (104 s)")
def test_chart_renders_in_headless_chromium(page, tmp_path):
    path, _ = page
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    width, height, rows = _read_png(shot.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    pixels = [p for row in rows for p in row]
    assert sum(p != b"\xff\xff\xff" for p in pixels) > 0.05 * len(pixels)  # not blank
    # each series' color: its 14x14 legend square (196 px) and its points and lines in the plot
    counts = {name: sum(p == bytes(rgb) for p in pixels) for name, rgb in COLORS.items()}
    assert all(c > 196 + 150 for c in counts.values()), counts
    (tmp_path / "counts.txt").write_text(repr(counts))
