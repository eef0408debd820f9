"""Determinism across threads: 1 and 2 threads, set in process
or by OMP_NUM_THREADS, give byte-identical qlin files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli, sha256, subprocess_qlin
from qlin_cli import read_qfile

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
ENCODER_SD = SAMPLES / "encoder.safetensors"
ENCODER_MODEL = "sample_models.encoder:build"

# load_factory (--model) puts the current folder on sys.path: conftest's fixture undoes it
pytestmark = pytest.mark.usefixtures("isolate_imports")


@pytest.mark.parametrize("options", [[], ["--kernel", "fbgemm"], ["--mode", "weight-only"]], ids=" ".join)
def test_one_and_two_threads_give_identical_files(options, tmp_path, capsys, monkeypatch):
    if "fbgemm" in options and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm engine")
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    digests = {}
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            assert torch.get_num_threads() == n
            out = tmp_path / f"{n}-{len(digests)}.safetensors"
            code, _, stderr = cli(capsys, "quantize", ENCODER_SD, "--model", ENCODER_MODEL, "-o", out, *options)
            assert code == 0, stderr
            digests[out.name] = sha256(out.read_bytes())
    finally:
        torch.set_num_threads(threads)
    assert len(set(digests.values())) == 1, digests
    plan = json.loads(read_qfile(out).metadata["plan"])
    if options:
        assert {e["mode" if options[0] == "--mode" else "kernel_request"] for e in plan} == {options[1]}


def test_omp_num_threads_1_process_matches_2_threads_in_process(tmp_path, capsys, monkeypatch):
    """The way users pin threads (OMP_NUM_THREADS at startup) against torch.set_num_threads(2)."""
    single = tmp_path / "omp1.safetensors"
    proc = subprocess_qlin("quantize", ENCODER_SD, "--model", ENCODER_MODEL, "-o", single, cwd=REPO,
                           OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, _, stderr = cli(capsys, "quantize", ENCODER_SD, "--model", ENCODER_MODEL, "-o", tmp_path / "t2.safetensors")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stderr
    assert sha256(single.read_bytes()) == sha256((tmp_path / "t2.safetensors").read_bytes())
