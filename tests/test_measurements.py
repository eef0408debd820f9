"""Measurements a user can trust: eval's progress over batches, latencies with
their spread and the batch size actually timed, a warning when other processes were busy while
timing, the model-level error measured on the calibration data when there is some, and the
per-layer sensitivity table on request (`--sensitivity`)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLES, cli, cli_json, load_digits_mlp
from qlin_cli import QuantConfig, quantize_model
from qlin_cli.api import evaluate_checkpoint
from qlin_cli.data import BUSY_CORES, OtherLoad, model_output
from qlin_cli.primitives import sqnr_db

DIGITS_PT = SAMPLES / "digits_mlp.pt"
TEST = SAMPLES / "digits_test.safetensors"  # 450 samples
CALIB = SAMPLES / "digits_calib.safetensors"


# ----------------------------------------------------------------------------- eval


def test_eval_progress_spread_and_the_batch_size_used(digits_q):
    seen = []
    r = evaluate_checkpoint(DIGITS_PT, digits_q, TEST, batch_size=200, repeats=2,
                            progress=lambda *step: seen.append(step))
    # loading, then the 3 batches compared (200, 200, 50), then 2 passes over the 2 full batches timed
    assert seen == [(0, 0, "loading models"), (1, 3, "comparing"), (2, 3, "comparing"), (3, 3, "comparing"),
                    (1, 4, "timing"), (2, 4, "timing"), (3, 4, "timing"), (4, 4, "timing")]
    d = r.to_dict()
    assert d["batch_size"] == 200 and d["timed_forwards"] == 4
    for which in ("float", "int8"):
        lat = d["latency_ms"][which]
        assert 0 < lat["min"] <= lat["median"] <= lat["max"]
    assert d["latency_float_ms"] == d["latency_ms"]["float"]["median"]
    assert d["speedup"] == d["latency_ms"]["float"]["median"] / d["latency_ms"]["int8"]["median"]
    assert d["other_load_cores"] is None or d["other_load_cores"] >= 0
    row = dict(r.tables()[0].rows)
    key = next(k for k in row if k.startswith("latency float ms, min / median / max"))
    assert "(batch 200, " in key and "4 forwards)" in key
    assert row[key] == " / ".join(f"{lat:.3f}" for lat in r.timing.latencies_ms[0])


def test_eval_reports_the_batch_it_used_not_the_one_asked_for(digits_q, capsys):
    r = cli_json(capsys, "eval", DIGITS_PT, digits_q, "--inputs", TEST, "--batch-size", "1000", "--repeats", "2")
    assert r["batch_size"] == 450 and r["timed_forwards"] == 2  # one batch of all 450 samples


def test_busy_machine_warning(digits_q):
    report = evaluate_checkpoint(DIGITS_PT, digits_q, TEST, batch_size=450, repeats=1)
    quiet = dataclasses.replace(report, timing=dataclasses.replace(report.timing, other_load_cores=0.0))
    busy = dataclasses.replace(report, timing=dataclasses.replace(report.timing, other_load_cores=0.93))
    assert quiet.warnings() == []
    assert busy.warnings() == ["warning: other processes used 0.93 CPU cores on average while qlin timed the "
                               "models: the latencies are slower and noisier than this machine's own"]
    assert BUSY_CORES == 0.25


def test_eval_warns_when_another_process_computes_while_timing(digits_q, capsys, monkeypatch):
    """A process spinning on a core during the whole eval (torch on one thread, so that it does
    not stall waiting for the busy core): the warning is on stderr, the JSON records the load.
    One sample a batch, 8 times: 7,200 timed forwards, over 0.1 s (OtherLoad.MIN_S here) even
    on a fast quiet machine, where 4,480 forwards once took under 0.25 s (20 times, 18,000 forwards,
    took 21 s of this test's time on a loaded 2-core machine)."""
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc here")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spinner = subprocess.Popen([sys.executable, "-S", "-c", "import time\nt = time.time()\nwhile time.time() - t < 60: pass"])
    try:
        time.sleep(0.2)
        monkeypatch.setattr(OtherLoad, "MIN_S", 0.1)
        code, out, err = cli(capsys, "eval", DIGITS_PT, digits_q, "--inputs", TEST, "--batch-size", "1",
                             "--repeats", "8", "--json")
    finally:
        spinner.kill()
        spinner.wait()
        torch.set_num_threads(threads)
    assert code == 0
    r = json.loads(out)
    assert r["timed_forwards"] == 8 * 450
    assert r["other_load_cores"] is not None and r["other_load_cores"] >= BUSY_CORES
    assert "warning: other processes used" in err


def test_other_load_is_unknown_for_a_block_too_short_to_tell():
    from qlin_cli.data import OtherLoad

    with OtherLoad() as load:
        pass
    assert load.cores is None


# ----------------------------------------------------------------------------- quantize


def test_model_error_is_measured_on_the_calibration_data(tmp_path, capsys):
    """Static mode with --calib and no --inputs: the model-level error is on (the first 64
    samples of) the calibration data, not on a random batch; the number is that SQNR."""
    r = cli_json(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "s.safetensors", "--mode", "static",
                 "--calib", CALIB, "--kernel", "int_mm")
    assert r["probe"]["description"] == "64 samples of digits_calib.safetensors (the calibration data)"
    calib = load_file(CALIB)["inputs"][:64]
    reference = model_output(load_digits_mlp(), calib, 64)
    int8 = quantize_model(load_digits_mlp(), QuantConfig(mode="static", kernel="int_mm"),
                          calib=load_file(CALIB)["inputs"]).model
    assert r["probe"]["sqnr_db"] == pytest.approx(sqnr_db(reference, model_output(int8, calib, 64)), abs=1e-9)


def test_sensitivity_on_request(tmp_path, capsys):
    """--sensitivity without --min-sqnr: every quantized layer's output SQNR with it alone in
    int8, most sensitive first, equal to quantizing that one layer by hand."""
    code, out, _ = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--kernel", "int_mm",
                       "--calib", CALIB, "--no-smooth", "--sensitivity", "--report", tmp_path / "r.json")
    assert code == 0 and "sensitivity on 256 samples of digits_calib.safetensors" in " ".join(out.split())
    r = json.loads((tmp_path / "r.json").read_text())
    s = r["sensitivity"]
    assert s["data"] == "256 samples of digits_calib.safetensors (the calibration data)"
    assert [row["layer"] for row in s["layers"]] != [] and sorted(row["layer"] for row in s["layers"]) == ["0", "2", "4"]
    alone = [row["alone_sqnr_db"] for row in s["layers"]]
    assert alone == sorted(alone)
    calib = load_file(CALIB)["inputs"]
    reference = model_output(load_digits_mlp(), calib, 32)
    for row in s["layers"]:
        others = [f"^{name}$" for name in "024" if name != row["layer"]]
        one = quantize_model(load_digits_mlp(), QuantConfig(kernel="int_mm", skip=others)).model
        assert row["alone_sqnr_db"] == pytest.approx(sqnr_db(reference, model_output(one, calib, 32)), abs=1e-9)
    assert r["fallback"] is None


def test_sensitivity_with_a_target_that_moved_nothing_and_one_that_did(tmp_path, capsys):
    base = ("quantize", DIGITS_PT, "--kernel", "int_mm", "--calib", CALIB, "--sensitivity")
    r = cli_json(capsys, *base, "-o", tmp_path / "a.safetensors", "--min-sqnr", "1")
    assert r["fallback"]["steps"] == [] and len(r["sensitivity"]["layers"]) == 3
    target = r["sensitivity"]["all_int8_sqnr_db"] + 1.0
    code, out, _ = cli(capsys, *base, "-o", tmp_path / "b.safetensors", "--min-sqnr", str(target),
                       "--report", tmp_path / "b.json")
    assert code == 0 and "kept float by --min-sqnr" in " ".join(out.split())
    r = json.loads((tmp_path / "b.json").read_text())
    moved = [step["layer"] for step in r["fallback"]["steps"]]
    assert moved and moved[0] == r["sensitivity"]["layers"][0]["layer"]  # the most sensitive went first


def test_sensitivity_without_data_uses_the_probe(tmp_path, capsys):
    r = cli_json(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--kernel", "int_mm", "--sensitivity")
    assert r["sensitivity"]["data"] == "a random normal batch (8, 64)"
    assert r["sensitivity"]["all_int8_sqnr_db"] == pytest.approx(r["probe"]["sqnr_db"], abs=1e-9)
