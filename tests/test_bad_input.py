"""Broken input files through the real CLI: safetensors
files that lie about their size or whose header is not JSON, given to quantize and inspect, and
float models with NaN/Inf weights. Always exit 1, one line starting with "error:", no traceback,
nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_one_error_line, cli, files_in, mlp_with
from warm_qlin import warm_subprocess_qlin

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
ENCODER_SD = SAMPLES / "encoder.safetensors"
ENCODER_MODEL = "sample_models.encoder:build"

# load_factory (--model) puts the current folder on sys.path: conftest's fixture undoes it
pytestmark = pytest.mark.usefixtures("isolate_imports")


def _safetensors_bytes(header: bytes | dict, payload: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if length is None else length
    return n.to_bytes(8, "little") + text + payload


def _encoder_cut(cut: int):
    return lambda: ENCODER_SD.read_bytes()[:cut]


_ENC_HEADER_LEN = int.from_bytes(ENCODER_SD.read_bytes()[:8], "little")


# name -> bytes of a broken safetensors file
BROKEN_SAFETENSORS = {
    "header claims more data than the file has": lambda: _safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 16
    ),
    "encoder state dict missing its last 100 bytes": lambda: ENCODER_SD.read_bytes()[:-100],
    "header not valid JSON (unquoted key)": lambda: _safetensors_bytes(
        b'{"w": {"dtype": "F32", "shape": [4], data_offsets: [0, 16]}}', b"\0" * 16
    ),
    "header not valid JSON (cut short)": lambda: _safetensors_bytes(b'{"w": {"dtype": "F32", "sha', b"\0" * 16),
    "header is JSON but not an object": lambda: _safetensors_bytes(b"[1, 2, 3]", b""),
    "header with a negative shape": lambda: _safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "header with an unknown dtype": lambda: _safetensors_bytes(
        {"w": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "header length 1 MB in a 60-byte file": lambda: _safetensors_bytes(b'{"a": 1}', b"\0" * 50, length=10**6),
    "header length 2**64 - 1": lambda: _safetensors_bytes(b'{"a": 1}', b"\0" * 50, length=2**64 - 1),
    "encoder cut inside the length field": _encoder_cut(5),
    "encoder cut inside the header": _encoder_cut(8 + _ENC_HEADER_LEN // 2),
    "encoder cut inside the payload": _encoder_cut(8 + _ENC_HEADER_LEN + 1000),
}


@pytest.mark.parametrize("case", list(BROKEN_SAFETENSORS))
@pytest.mark.parametrize("command", ["quantize", "inspect"])
def test_broken_safetensors_is_one_line_error(case, command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # so that --model sample_models.encoder:build imports
    work = tmp_path / "work"
    work.mkdir()
    src = work / "broken.safetensors"
    src.write_bytes(BROKEN_SAFETENSORS[case]())
    out = work / "out.safetensors"
    before = files_in(work)
    if command == "quantize":
        code, stdout, stderr = cli(capsys, "quantize", src, "--model", ENCODER_MODEL, "-o", out)
    else:
        code, stdout, stderr = cli(capsys, "inspect", src)
    assert code == 1
    line = assert_one_error_line(stderr)
    assert str(src) in line and "not a valid safetensors file" in line
    assert stdout == ""
    assert files_in(work) == before  # nothing written, the input untouched


@pytest.mark.parametrize(
    "case, command",
    [
        ("header claims more data than the file has", "quantize"),
        ("header length 2**64 - 1", "quantize"),
        ("header not valid JSON (unquoted key)", "inspect"),
    ],
)
def test_broken_safetensors_entry_point_has_no_traceback(case, command, tmp_path):
    src = tmp_path / "broken.safetensors"
    src.write_bytes(BROKEN_SAFETENSORS[case]())
    before = files_in(tmp_path)
    args = ["quantize", src, "--model", ENCODER_MODEL, "-o", tmp_path / "out.safetensors"]
    proc = warm_subprocess_qlin(*(args if command == "quantize" else ["inspect", src]), cwd=REPO)
    assert proc.returncode == 1
    assert "not a valid safetensors file" in assert_one_error_line(proc.stderr)
    assert proc.stdout == ""
    assert files_in(tmp_path) == before


@pytest.mark.parametrize(
    "layer, param, index, value, phrase",
    [
        (2, "weight", (1, 3), float("nan"), "layer '2': weight has 1 non-finite value(s)"),
        (0, "weight", (0, 0), float("inf"), "layer '0': weight has 1 non-finite value(s)"),
        (0, "weight", (5, 5), -float("inf"), "layer '0': weight has 1 non-finite value(s)"),
        (2, "bias", (2,), float("nan"), "layer '2': bias has 1 non-finite value(s)"),
    ],
)
def test_non_finite_weights_name_the_layer(layer, param, index, value, phrase, tmp_path, capsys):
    torch.save(mlp_with(layer, param, index, value), tmp_path / "bad.pt")
    before = files_in(tmp_path)
    code, stdout, stderr = cli(capsys, "quantize", tmp_path / "bad.pt", "-o", tmp_path / "out.safetensors", "--kernel", "fbgemm")
    assert code == 1 and stdout == ""
    assert phrase in assert_one_error_line(stderr)
    assert files_in(tmp_path) == before


def test_non_finite_weights_entry_point(tmp_path):
    torch.save(mlp_with(2, "weight", (0, 0), float("nan")), tmp_path / "nan.pt")
    proc = warm_subprocess_qlin("quantize", "nan.pt", "--kernel", "fbgemm", cwd=tmp_path)  # default output beside the input
    assert proc.returncode == 1 and proc.stdout == ""
    assert "layer '2': weight has 1 non-finite" in assert_one_error_line(proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt"]
