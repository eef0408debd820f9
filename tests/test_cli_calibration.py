"""Calibration through the real command line: `--calib`, `--calib-samples`,
`--batch-size`, `--mode static`, `--observer` / `--weight-observer` / `--percentile`,
`--smooth`; what the JSON report, the qlin file, `qlin inspect` and `qlin eval` show.

Library-level behaviour (observer math, hooks, SmoothQuant's gain on planted outliers) lives in
test_calibrate.py and test_observers.py; the core CLI in test_cli.py. Here every case runs
`qlin_cli.cli.main([...])` in-process from the repository root, with outputs in tmp folders.
The encoder runs that several tests read are made once per module.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import cli, cli_json
from qlin_cli import read_qfile
from qlin_cli.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
ENCODER_SD = SAMPLES / "encoder.safetensors"
ENCODER_MODEL = "sample_models.encoder:build"
DIGITS_PT = SAMPLES / "digits_mlp.pt"
CALIB = SAMPLES / "digits_calib.safetensors"
TEST_INPUTS = SAMPLES / "digits_test.safetensors"
TEST_LABELS = SAMPLES / "digits_test_labels.safetensors"

# encoder layer -> in_features
ENCODER_LAYERS = {"embed": 8}  # in module order
for _b in ("blocks.0", "blocks.1"):
    ENCODER_LAYERS.update({f"{_b}.qkv": 128, f"{_b}.proj": 128, f"{_b}.fc1": 128, f"{_b}.fc2": 512})
ENCODER_LAYERS["head"] = 128
DIGITS_LAYERS = {"0": 64, "2": 256, "4": 256}

ENCODER = [ENCODER_SD, "--model", ENCODER_MODEL]
STATIC = ["--mode", "static", "--calib", CALIB, "--kernel", "fbgemm"]  # a kernel named: auto keeps layers this small float


# ----------------------------------------------------------------------------- helpers


def _invoke(args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return 0 if exc.value.code is None else exc.value.code


def run_captured(*args) -> tuple[int, str, str]:
    """`qlin ARGS` for module-scoped fixtures (no capsys there): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(REPO)
        code = _invoke(args)
    return code, out.getvalue(), err.getvalue()


def quantize_json(out: Path, *args) -> dict:
    code, stdout, stderr = run_captured("quantize", *args, "-o", out, "--json")
    assert code == 0, stderr
    return json.loads(stdout)


def assert_one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), err
    return lines[0]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def rows(report: dict) -> dict[str, dict]:
    return {r["name"]: r for r in report["layers"]}


def within(inner: list[float], outer: list[float], tol: float = 1e-5) -> bool:
    """`inner` range lies inside `outer` (up to float noise)."""
    return inner[0] >= outer[0] - tol and inner[1] <= outer[1] + tol


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # so --model sample_models.encoder:build imports as a user would


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return load_file(CALIB)["inputs"]


@pytest.fixture(scope="module")
def static_run(tmp_path_factory) -> tuple[dict, Path]:
    """The encoder in static mode with the default (minmax) observer: (report, file)."""
    out = tmp_path_factory.mktemp("static") / "encoder.static.safetensors"
    return quantize_json(out, *ENCODER, *STATIC, "--inputs", TEST_INPUTS), out


@pytest.fixture(scope="module")
def smooth_run(tmp_path_factory) -> tuple[dict, Path]:
    """The encoder in static mode with SmoothQuant alpha 0.5: (report, file)."""
    out = tmp_path_factory.mktemp("smooth") / "encoder.smooth.safetensors"
    return quantize_json(out, *ENCODER, *STATIC, "--smooth", "0.5", "--inputs", TEST_INPUTS), out


@pytest.fixture(scope="module")
def mlp_static(tmp_path_factory) -> tuple[dict, Path, str]:
    """digits_mlp.pt in static mode, rendered as a table, the report also written as JSON:
    (report, file, stdout)."""
    folder = tmp_path_factory.mktemp("mlp")
    out, report = folder / "digits.static.safetensors", folder / "report.json"
    code, stdout, stderr = run_captured("quantize", DIGITS_PT, *STATIC, "-o", out, "--report", report)
    assert code == 0, stderr
    return json.loads(report.read_text()), out, stdout


# ----------------------------------------------------------------------------- static mode


def test_static_report(static_run, calib):
    r, out = static_run
    assert r["output"] == str(out)
    assert r["config"]["mode"] == "static" and r["config"]["act_granularity"] == "tensor"
    assert r["config"]["observer"] == "minmax" and r["config"]["smooth"] is None
    assert r["calibration"] == {"file": str(CALIB), "samples": 256, "batch_size": 32, "used_for": "calibration"}
    assert list(rows(r)) == list(ENCODER_LAYERS)
    for row in r["layers"]:
        name = row["name"]
        assert row["status"] == "quantized" and row["mode"] == "static", name
        assert row["observer"] == "minmax" and row["weight_observer"] == "minmax" and row["smooth"] is None, name
        lo, hi = row["input_range"]
        assert isinstance(lo, float) and isinstance(hi, float) and lo <= hi, (name, lo, hi)
        scale, zp = row["input_scale"], row["input_zero_point"]
        assert scale > 0 and isinstance(zp, int) and -128 <= zp <= 127, (name, scale, zp)
        # asymmetric per tensor over the range widened to hold 0
        lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
        assert scale == pytest.approx((hi0 - lo0) / 255, rel=1e-6), name
        assert abs(zp - (-128 - lo0 / scale)) <= 0.5 + 1e-3, name
        assert row["output_sqnr_db"] > 30, (name, row["output_sqnr_db"])
    # minmax on the embedding's input is the range of the calibration pixels themselves
    assert rows(r)["embed"]["input_range"] == [float(calib.min()), float(calib.max())]
    # GELU's outputs feed fc2: one-sided, so the zero point sits near qmin
    assert rows(r)["blocks.0.fc2"]["input_range"][0] > -0.2 and rows(r)["blocks.0.fc2"]["input_zero_point"] < -100
    assert r["probe"]["description"] == f"64 samples of {TEST_INPUTS.name}"
    assert r["probe"]["sqnr_db"] > 35, r["probe"]


def test_static_file_holds_input_qparams(static_run):
    r, out = static_run
    t = tensors(out)
    for name, row in rows(r).items():
        s, z = t[f"{name}.input_scale"], t[f"{name}.input_zero_point"]
        assert s.dtype == torch.float32 and s.shape == (), name
        assert z.dtype == torch.int8 and z.shape == (), name
        assert float(s) == row["input_scale"] and int(z) == row["input_zero_point"], name
        assert t[f"{name}.weight"].dtype == torch.int8
        assert f"{name}.smooth_scale" not in t
    plan = {e["name"]: e for e in read_qfile(out).plan.to_list()}
    assert {e["mode"] for e in plan.values()} == {"static"}
    assert {(e["observer"], e["weight_observer"], e["smooth"]) for e in plan.values()} == {("minmax", "minmax", None)}


def test_static_inspect_json(static_run, capsys):
    r, out = static_run
    info = cli_json(capsys, "inspect", out)
    assert info["kind"] == "qlin" and info["config"]["mode"] == "static"
    shown = {row["name"]: row for row in info["layers"]}
    assert list(shown) == list(ENCODER_LAYERS)
    for name, row in rows(r).items():
        s = shown[name]
        assert (s["mode"], s["observer"], s["weight_observer"], s["smooth"]) == ("static", "minmax", "minmax", None)
        assert s["input_scale"] == row["input_scale"] and s["input_zero_point"] == row["input_zero_point"]
        assert s["weight_dtype"] == "int8"


def test_static_table_shows_input_range_scale_and_output_sqnr(mlp_static):
    r, _, stdout = mlp_static
    for header in ("output SQNR dB", "input range", "input scale"):
        assert header in stdout
    first = r["layers"][0]
    assert f"(z={first['input_zero_point']})" in stdout
    assert f"{first['input_scale']:.3g}" in stdout


def test_calib_samples_and_batch_size_are_used_and_recorded(static_run, tmp_path, capsys):
    full = rows(static_run[0])
    r = cli_json(capsys, "quantize", *ENCODER, *STATIC, "--calib-samples", 64, "--batch-size", 16,
                 "-o", tmp_path / "q.safetensors")
    assert r["calibration"] == {"file": str(CALIB), "samples": 64, "batch_size": 16, "used_for": "calibration"}
    part = rows(r)
    # a subset of the samples: every range inside the full one, and some strictly narrower
    assert all(within(part[n]["input_range"], full[n]["input_range"]) for n in ENCODER_LAYERS)
    narrower = [n for n in ENCODER_LAYERS if not within(full[n]["input_range"], part[n]["input_range"])]
    assert len(narrower) >= 3, narrower
    assert all(row["output_sqnr_db"] > 30 for row in r["layers"])


def test_batch_size_does_not_change_minmax_ranges(mlp_static, tmp_path, capsys, calib):
    ref = rows(mlp_static[0])
    r = cli_json(capsys, "quantize", DIGITS_PT, *STATIC, "--batch-size", 7, "-o", tmp_path / "q.safetensors")
    assert r["calibration"] == {"file": str(CALIB), "samples": 256, "batch_size": 7, "used_for": "calibration"}  # 36 batches of 7, then 4
    assert rows(r)["0"]["input_range"] == [float(calib.min()), float(calib.max())]
    for name in DIGITS_LAYERS:
        assert rows(r)[name]["input_range"] == pytest.approx(ref[name]["input_range"], rel=1e-6, abs=1e-7), name


def test_batch_size_drives_the_moving_average(mlp_static, tmp_path, capsys, calib):
    """--batch-size is used, not only recorded: the moving-average observer sees one min/max per
    batch. One batch of all 256 samples is plain minmax; batches of 16 are an EMA (factor 0.01)
    of the 16 batch ranges, which the test recomputes from the float MLP."""
    minmax = rows(mlp_static[0])
    one = cli_json(capsys, "quantize", DIGITS_PT, *STATIC, "--observer", "moving-average", "--batch-size", 256,
                   "-o", tmp_path / "one.safetensors")
    for name in DIGITS_LAYERS:
        assert rows(one)[name]["input_range"] == pytest.approx(minmax[name]["input_range"], rel=1e-6), name
    r = cli_json(capsys, "quantize", DIGITS_PT, *STATIC, "--observer", "moving-average", "--batch-size", 16,
                 "-o", tmp_path / "sixteen.safetensors")
    assert r["calibration"]["batch_size"] == 16
    with torch.serialization.safe_globals([torch.nn.Sequential, torch.nn.Linear, torch.nn.ReLU]):
        model = torch.load(DIGITS_PT, weights_only=True).eval()
    lo = hi = None
    with torch.no_grad():
        for start in range(0, 256, 16):
            x = model[1](model[0](calib[start : start + 16]))  # the input of layer "2"
            blo, bhi = float(x.min()), float(x.max())
            lo, hi = (blo, bhi) if lo is None else (lo + 0.01 * (blo - lo), hi + 0.01 * (bhi - hi))
    assert rows(r)["2"]["input_range"] == pytest.approx([lo, hi], rel=1e-5, abs=1e-6)
    assert rows(r)["2"]["input_range"][1] < minmax["2"]["input_range"][1] * 0.999  # not the full range


def test_calib_samples_beyond_the_file_uses_all_of_it(tmp_path, capsys):
    r = cli_json(capsys, "quantize", DIGITS_PT, *STATIC, "--calib-samples", 1000, "-o", tmp_path / "q.safetensors")
    assert r["calibration"]["samples"] == 256


@pytest.mark.parametrize("fmt", ["pt tensor", "pt dict"])
def test_calib_as_pt_file_gives_the_same_file(fmt, mlp_static, tmp_path, capsys, calib):
    path = tmp_path / "calib.pt"
    torch.save(calib if fmt == "pt tensor" else {"inputs": calib}, path)
    out = tmp_path / "q.safetensors"
    code, _, err = cli(capsys, "quantize", DIGITS_PT, *STATIC[:2], "--calib", path, *STATIC[4:], "-o", out)
    assert code == 0, err
    assert out.read_bytes() == mlp_static[1].read_bytes()


# ----------------------------------------------------------------------------- option errors


# name -> (options after the encoder source, exit code, phrases in the error line)
OPTION_ERRORS = {
    "static without --calib": (["--mode", "static"], 1, ["static mode", "--calib"]),
    "smooth without --calib": (["--smooth", "0.5", "--kernel", "fbgemm"], 1, ["SmoothQuant", "--calib", "--inputs"]),
    "static smooth without --calib": (["--mode", "static", "--smooth", "0.5"], 1, ["--calib"]),
    "smooth above 1": ([*STATIC, "--smooth", "1.5"], 1, ["smooth", "1.5", "(0, 1]"]),
    "smooth 0": ([*STATIC, "--smooth", "0"], 1, ["smooth", "(0, 1]"]),
    "smooth with weight-only": (["--mode", "weight-only", "--calib", CALIB, "--smooth", "0.5"], 1, ["smooth", "--mode dynamic or static"]),
    "percentile 30": ([*STATIC, "--observer", "percentile", "--percentile", "30"], 1, ["percentile", "30", "(50, 100]"]),
    "percentile above 100": ([*STATIC, "--percentile", "100.5"], 1, ["percentile", "(50, 100]"]),
    "calib-samples 0": ([*STATIC, "--calib-samples", "0"], 1, ["--calib-samples"]),
    "batch-size 0": ([*STATIC, "--batch-size", "0"], 1, ["--batch-size"]),
    "calib file missing": (["--mode", "static", "--calib", "nope.safetensors"], 1, ["nope.safetensors", "does not exist"]),
    "unknown observer": ([*STATIC, "--observer", "kl"], 2, ["--observer", "'kl'"]),
    "unknown weight observer": (["--weight-observer", "kl"], 2, ["--weight-observer", "'kl'"]),
}


@pytest.mark.parametrize("case", list(OPTION_ERRORS))
def test_option_errors(case, tmp_path, capsys):
    options, want, phrases = OPTION_ERRORS[case]
    code, out, err = cli(capsys, "quantize", *ENCODER, *options, "-o", tmp_path / "q.safetensors", "--json")
    assert code == want, err
    line = assert_one_error_line(err)
    for phrase in phrases:
        assert phrase in line, (phrase, line)
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


@pytest.mark.parametrize("mode", [["--mode", "static"], ["--mode", "dynamic", "--kernel", "fbgemm"],
                                  ["--smooth", "0.5", "--kernel", "fbgemm"]], ids=["static", "dynamic", "smooth"])
def test_calibration_inputs_that_do_not_fit(mode, tmp_path, capsys):
    bad = tmp_path / "calib.safetensors"
    save_file({"inputs": torch.randn(10, 7)}, bad)
    code, out, err = cli(capsys, "quantize", *ENCODER, *mode, "--calib", bad, "-o", tmp_path / "q.safetensors")
    assert code == 1
    line = assert_one_error_line(err)
    assert "(10, 7)" in line and "do not fit" in line and "calibration" in line, line
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.safetensors"]


NAN_CASES = [
    pytest.param(["--mode", "static", "--kernel", "fbgemm"], id="static"),
    pytest.param(["--mode", "dynamic", "--smooth", "0.5", "--kernel", "fbgemm"], id="dynamic-smooth"),
    pytest.param(["--mode", "dynamic", "--kernel", "fbgemm"], id="dynamic"),
    pytest.param(["--mode", "weight-only"], id="weight-only"),
]


@pytest.mark.parametrize("mode", NAN_CASES)
def test_non_finite_calibration_values_name_the_layer(mode, tmp_path, capsys, calib):
    """DESIGN: non-finite calibration values are an error that names the layer, in any mode
    that reads them."""
    data = calib.clone()
    data[5, 20] = float("nan")
    path = tmp_path / "calib.safetensors"
    save_file({"inputs": data}, path)
    code, out, err = cli(capsys, "quantize", DIGITS_PT, *mode, "--calib", path, "-o", tmp_path / "q.safetensors")
    assert code == 1, out[-400:]
    line = assert_one_error_line(err)
    assert "'0'" in line and "calibration" in line and "non-finite" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.safetensors"]


# ----------------------------------------------------------------------------- observers


@pytest.fixture(scope="module", params=["percentile", "mse", "moving-average"])
def observer_run(request, tmp_path_factory) -> tuple[str, dict, Path]:
    name = request.param
    out = tmp_path_factory.mktemp(name) / "q.safetensors"
    extra = ["--percentile", "99.9"] if name == "percentile" else []
    return name, quantize_json(out, *ENCODER, *STATIC, "--observer", name, *extra, "--inputs", TEST_INPUTS), out


def test_observer_is_recorded_in_plan_report_and_inspect(observer_run, capsys):
    name, r, out = observer_run
    assert r["config"]["observer"] == name
    if name == "percentile":
        assert r["config"]["percentile"] == 99.9
    plan = read_qfile(out).plan.to_list()
    assert [e["name"] for e in plan] == list(ENCODER_LAYERS)
    assert all(e["observer"] == name and e["weight_observer"] == "minmax" for e in plan)
    assert all(row["observer"] == name for row in r["layers"])
    shown = cli_json(capsys, "inspect", out)["layers"]
    t = tensors(out)
    for s in shown:
        assert (s["observer"], s["weight_observer"], s["smooth"]) == (name, "minmax", None), s["name"]
        assert s["input_scale"] == float(t[f"{s['name']}.input_scale"])
        assert s["input_zero_point"] == int(t[f"{s['name']}.input_zero_point"])


def test_observer_changes_the_calibrated_ranges(observer_run, static_run):
    name, r, out = observer_run
    minmax, ranges = rows(static_run[0]), rows(r)
    differ = [n for n in ENCODER_LAYERS if ranges[n]["input_range"] != pytest.approx(minmax[n]["input_range"], rel=1e-4)]
    assert len(differ) >= 3, (name, differ)
    if name in ("percentile", "mse"):  # both clip inside the full range
        for n in ENCODER_LAYERS:
            assert within(ranges[n]["input_range"], minmax[n]["input_range"]), (n, ranges[n], minmax[n])
    if name == "percentile":  # 0.1% of each tail cut: clearly narrower somewhere
        assert any(ranges[n]["input_range"][1] < 0.9 * minmax[n]["input_range"][1] for n in ENCODER_LAYERS)
    # what the report says is what the file holds, and it is not the minmax file
    t, t_minmax = tensors(out), tensors(static_run[1])
    assert any(not torch.equal(t[f"{n}.input_scale"], t_minmax[f"{n}.input_scale"]) for n in ENCODER_LAYERS)
    for n in ENCODER_LAYERS:
        assert float(t[f"{n}.input_scale"]) == ranges[n]["input_scale"]
        assert ranges[n]["output_sqnr_db"] > 30, (n, ranges[n]["output_sqnr_db"])
    assert r["probe"]["sqnr_db"] > 35


def test_percentile_observer_matches_the_data_quantile(tmp_path, capsys, calib):
    """On the digits MLP, layer "2" sees ReLU(layer 0) over 256 x 256 values; the 99.9th
    percentile of them (1.46) is far from both the max (1.85) and the 99.99th (1.73)."""
    r = cli_json(capsys, "quantize", DIGITS_PT, *STATIC, "--observer", "percentile", "--percentile", 99.9,
                 "-o", tmp_path / "q.safetensors")
    with torch.serialization.safe_globals([torch.nn.Sequential, torch.nn.Linear, torch.nn.ReLU]):
        model = torch.load(DIGITS_PT, weights_only=True).eval()
    with torch.no_grad():
        h = model[1](model[0](calib)).flatten()
    q999, q9999 = float(torch.quantile(h, 0.999)), float(torch.quantile(h, 0.9999))
    lo, hi = rows(r)["2"]["input_range"]
    assert lo == 0.0  # over a quarter of ReLU outputs are 0
    assert hi == pytest.approx(q999, abs=0.02), (hi, q999, q9999, float(h.max()))
    assert rows(r)["2"]["input_scale"] == pytest.approx(hi / 255, rel=1e-6)


def test_weight_observer_reaches_the_weights(tmp_path, capsys):
    """absmax is symmetric whatever --asymmetric says: with it every weight zero point is 0,
    where minmax fits one per row."""
    zps = {}
    for obs in ("minmax", "absmax"):
        out = tmp_path / f"{obs}.safetensors"
        cli_json(capsys, "quantize", DIGITS_PT, "--asymmetric", "--weight-observer", obs, "--kernel", "fbgemm", "-o", out)
        assert [e["weight_observer"] for e in read_qfile(out).plan.to_list()] == [obs] * 3
        zps[obs] = torch.cat([tensors(out)[f"{n}.weight_zero_point"] for n in DIGITS_LAYERS])
    assert int((zps["minmax"] != 0).sum()) > 100
    assert int((zps["absmax"] != 0).sum()) == 0


def test_percentile_option_reaches_the_weight_observer(mlp_static, tmp_path, capsys):
    """--weight-observer percentile --percentile 99 clips the top 1% of each row of 256 weights
    (layer 2), so its scales shrink; 99.99 of 256 values is the max."""
    out = tmp_path / "q.safetensors"
    cli_json(capsys, "quantize", DIGITS_PT, *STATIC, "--weight-observer", "percentile", "--percentile", 99, "-o", out)
    assert [e["weight_observer"] for e in read_qfile(out).plan.to_list()] == ["percentile"] * 3
    t, ref = tensors(out), tensors(mlp_static[1])
    for n in DIGITS_LAYERS:
        assert bool((t[f"{n}.weight_scale"] <= ref[f"{n}.weight_scale"] * (1 + 1e-6)).all()), n
    shrunk = t["2.weight_scale"] < ref["2.weight_scale"] * 0.99
    assert float(shrunk.double().mean()) > 0.5


def test_weight_observer_mse(mlp_static, tmp_path, capsys):
    """On the digits MLP's head (layer 4, 10 rows) with layers 0 and 2 kept float: the mse
    weight observer costs ~5 s and ~3 GB per 256-row layer (minutes on the encoder; see the
    report), which the plumbing checked here does not need."""
    out = tmp_path / "q.safetensors"
    r = cli_json(capsys, "quantize", DIGITS_PT, *STATIC, "--weight-observer", "mse", "--skip", "^[02]$", "-o", out)
    assert r["config"]["weight_observer"] == "mse"
    plan = {e["name"]: e for e in read_qfile(out).plan.to_list()}
    assert [plan[n]["status"] for n in DIGITS_LAYERS] == ["skipped", "skipped", "quantized"]
    assert plan["4"]["weight_observer"] == "mse" and plan["4"]["observer"] == "minmax"
    shown = {s["name"]: s for s in cli_json(capsys, "inspect", out)["layers"]}
    for n in ("4",):
        s = shown[n]
        assert (s["weight_observer"], s["observer"], s["smooth"]) == ("mse", "minmax", None)
        assert s["input_scale"] > 0 and -128 <= s["input_zero_point"] <= 127
    t, ref = tensors(out), tensors(mlp_static[1])
    with torch.serialization.safe_globals([torch.nn.Sequential, torch.nn.Linear, torch.nn.ReLU]):
        float_sd = torch.load(DIGITS_PT, weights_only=True).state_dict()

    def weight_mse(tt: dict, n: str) -> float:
        deq = tt[f"{n}.weight"].float() * tt[f"{n}.weight_scale"][:, None]  # symmetric per channel
        return float((deq - float_sd[f"{n}.weight"]).pow(2).mean())

    for n in ("4",):
        mse_scale, minmax_scale = t[f"{n}.weight_scale"], ref[f"{n}.weight_scale"]
        assert mse_scale.shape == minmax_scale.shape == (float_sd[f"{n}.weight"].shape[0],)
        assert bool((mse_scale <= minmax_scale * (1 + 1e-6)).all()), n  # mse only clips
        assert weight_mse(t, n) <= weight_mse(ref, n) * (1 + 1e-6), n  # and never does worse than minmax
        # activations are calibrated on the float model: the same input parameters
        assert torch.equal(t[f"{n}.input_scale"], ref[f"{n}.input_scale"])
    assert t["2.weight"].dtype == torch.float32 and "2.weight_scale" not in t
    assert all(row["output_sqnr_db"] > 30 for row in r["layers"] if row["status"] == "quantized")


# ----------------------------------------------------------------------------- SmoothQuant


def test_smooth_file_report_and_inspect(smooth_run, static_run, capsys):
    r, out = smooth_run
    assert r["config"]["smooth"] == 0.5 and r["config"]["mode"] == "static"
    t = tensors(out)
    moved = 0
    for name, in_features in ENCODER_LAYERS.items():
        s = t[f"{name}.smooth_scale"]
        assert s.dtype == torch.float32 and s.shape == (in_features,), name
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all()), name
        moved += int((s != 1).sum())
        assert t[f"{name}.input_scale"].shape == () and t[f"{name}.input_zero_point"].dtype == torch.int8
    assert moved > 0.5 * sum(ENCODER_LAYERS.values())  # most channels really got a factor
    assert all(e["smooth"] == 0.5 for e in read_qfile(out).plan.to_list())
    shown = cli_json(capsys, "inspect", out)["layers"]
    assert [s["smooth"] for s in shown] == [0.5] * len(ENCODER_LAYERS)
    assert all(s["input_scale"] == rows(r)[s["name"]]["input_scale"] for s in shown)
    # the static range is observed on the smoothed inputs, so it differs from the plain one
    plain = rows(static_run[0])
    assert all(rows(r)[n]["input_range"] != plain[n]["input_range"] for n in ENCODER_LAYERS if n != "embed")
    assert all(row["output_sqnr_db"] > 30 for row in r["layers"])
    assert r["probe"]["sqnr_db"] > 35


def test_smooth_factors_follow_alpha(smooth_run, calib):
    """The embedding sees the calibration pixels themselves, so its factors can be recomputed:
    s_j = max|X_j|^0.5 / max|W_j|^0.5 over the 8 pixel columns (tokens are image rows)."""
    w = load_file(ENCODER_SD)["embed.weight"]  # (128, 8)
    x = calib.reshape(-1, 8)  # (256 * 8 tokens, 8)
    act, wmax = x.abs().amax(0), w.abs().amax(0)
    assert bool((act > 0).all()) and bool((wmax > 0).all())  # no guarded channel here
    expected = (act.pow(0.5) / wmax.pow(0.5)).clamp(1e-5, 1e5)
    got = tensors(smooth_run[1])["embed.smooth_scale"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_smooth_eval_accuracy(smooth_run, capsys):
    e = cli_json(capsys, "eval", *ENCODER, smooth_run[1], "--inputs", TEST_INPUTS, "--labels", TEST_LABELS,
                 "--repeats", 1)
    assert e["samples"] == 450
    assert e["accuracy_float"] == pytest.approx(0.9822, abs=1e-4)  # sample_models/README.md
    assert abs(e["accuracy_int8"] - e["accuracy_float"]) <= 0.01, e
    assert e["sqnr_db"] > 35, e


def test_static_smooth_is_deterministic(smooth_run, tmp_path, capsys):
    out = tmp_path / "again.safetensors"
    code, _, err = cli(capsys, "quantize", *ENCODER, *STATIC, "--smooth", "0.5", "--inputs", TEST_INPUTS, "-o", out)
    assert code == 0, err
    assert out.read_bytes() == smooth_run[1].read_bytes()


# ----------------------------------------------------------------------------- dynamic mode with data


def test_dynamic_with_calib_and_no_smooth_only_measures(tmp_path, capsys):
    """With --no-smooth, dynamic mode's calibration data only measures each layer (by default it
    also gives SmoothQuant its factors: tests/test_default_smooth.py)."""
    with_data, without = tmp_path / "with.safetensors", tmp_path / "without.safetensors"
    fbgemm = ("--kernel", "fbgemm", "--no-smooth")
    r = cli_json(capsys, "quantize", *ENCODER, "--mode", "dynamic", "--calib", CALIB, *fbgemm, "-o", with_data)
    r0 = cli_json(capsys, "quantize", *ENCODER, "--mode", "dynamic", *fbgemm, "-o", without)
    assert r["calibration"] == {"file": str(CALIB), "samples": 256, "batch_size": 32, "used_for": "measuring the first batch"}
    assert r0["calibration"] is None
    for row, row0 in zip(r["layers"], r0["layers"]):
        assert row["mode"] == "dynamic" and row["input_scale"] is None and row["input_range"] is None
        assert isinstance(row["output_sqnr_db"], float) and math.isfinite(row["output_sqnr_db"]), row["name"]
        assert row["output_sqnr_db"] > 30, row["name"]
        assert row0["output_sqnr_db"] is None
        assert row["weight_sqnr_db"] == row0["weight_sqnr_db"]
    t = tensors(with_data)
    assert not [k for k in t if k.endswith(("input_scale", "input_zero_point", "smooth_scale"))]
    assert with_data.read_bytes() == without.read_bytes()  # the data changed nothing in the file


# ----------------------------------------------------------------------------- eval of static files


def test_eval_static_file(static_run, tmp_path, capsys):
    r, out = static_run
    e = cli_json(capsys, "eval", *ENCODER, out, "--inputs", TEST_INPUTS, "--labels", TEST_LABELS, "--repeats", 1)
    assert e["top1_agreement"] >= 0.99, e
    assert abs(e["accuracy_int8"] - e["accuracy_float"]) <= 0.01, e
    assert e["kernels"] and sum(e["kernels"].values()) == len(ENCODER_LAYERS)
    assert e["source_matches"] is True
    # the probe's 64 samples through the reloaded file: exactly the in-memory model's error
    probe = tmp_path / "probe.safetensors"
    save_file({"inputs": load_file(TEST_INPUTS)["inputs"][:64].contiguous()}, probe)
    e64 = cli_json(capsys, "eval", *ENCODER, out, "--inputs", probe, "--repeats", 1)
    assert e64["samples"] == 64
    assert e64["sqnr_db"] == r["probe"]["sqnr_db"] and e64["max_abs_err"] == r["probe"]["max_abs_err"]


def test_digits_mlp_static_accuracy(mlp_static, capsys):
    r, out, _ = mlp_static
    assert r["calibration"]["samples"] == 256 and r["config"]["mode"] == "static"
    assert [row["name"] for row in r["layers"]] == list(DIGITS_LAYERS)
    e = cli_json(capsys, "eval", DIGITS_PT, out, "--inputs", TEST_INPUTS, "--labels", TEST_LABELS, "--repeats", 1)
    assert e["accuracy_float"] == pytest.approx(0.9778, abs=1e-4)  # sample_models/README.md
    assert abs(e["accuracy_int8"] - e["accuracy_float"]) <= 0.01, e
    assert e["top1_agreement"] >= 0.99
