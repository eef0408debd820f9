"""Outputs that cannot be written, through the real CLI: an
unwritable folder, a parent that is a file, an output that is a folder, a full disk. Exit 1, one
line starting with "error:", and nothing written or the previous file kept.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import qlin_cli.files
from conftest import ModuleWith, assert_one_error_line, cli, files_in, raising

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
DIGITS_PT = SAMPLES / "digits_mlp.pt"

# load_factory (--model) puts the current folder on sys.path: conftest's fixture undoes it
pytestmark = pytest.mark.usefixtures("isolate_imports")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", ro / "out.safetensors")
        assert code == 1 and stdout == ""
        line = assert_one_error_line(stderr)
        assert str(ro) in line and "not writable" in line
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_output_parent_is_a_regular_file(tmp_path, capsys):
    (tmp_path / "afile").write_bytes(b"keep me")
    before = files_in(tmp_path)
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "afile" / "out.safetensors")
    assert code == 1 and stdout == ""
    assert str(tmp_path / "afile") in assert_one_error_line(stderr)
    assert files_in(tmp_path) == before


def test_output_parent_is_a_regular_file_message(tmp_path, capsys):
    (tmp_path / "afile").write_bytes(b"keep me")
    _, _, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "afile" / "out.safetensors")
    line = assert_one_error_line(stderr)
    assert "does not exist" not in line
    assert "not a folder" in line or "not a directory" in line or "is a file" in line


def test_report_parent_is_a_regular_file_writes_nothing(tmp_path, capsys):
    (tmp_path / "afile").write_bytes(b"keep me")
    before = files_in(tmp_path)
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "out.safetensors",
                               "--report", tmp_path / "afile" / "r.json")
    assert code == 1 and stdout == ""
    assert str(tmp_path / "afile") in assert_one_error_line(stderr)
    assert files_in(tmp_path) == before  # the main output is not written either


def test_output_is_an_existing_folder(tmp_path, capsys):
    (tmp_path / "out.safetensors").mkdir()
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "out.safetensors", "--force")
    assert code == 1 and stdout == ""
    assert "is a directory" in assert_one_error_line(stderr)
    assert list((tmp_path / "out.safetensors").iterdir()) == []


def test_disk_full_during_write_keeps_previous_file(digits_q, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(qlin_cli.files, "os", ModuleWith(os, fsync=raising(full)))
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", out, "--force")
    assert code == 1 and stdout == ""
    line = assert_one_error_line(stderr)
    assert str(out) in line and "No space left on device" in line
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]  # no temporary file left
    assert out.read_bytes() == b"previous"
