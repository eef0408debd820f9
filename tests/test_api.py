"""The Python API a user imports: quantize_checkpoint (QuantConfig + QuantizeOptions), inspect_path,
evaluate_checkpoint, and the checks quantize_checkpoint makes before it does any work."""

import json
import re

import pytest

import qlin_cli.calibrate
import qlin_cli.quantize
from conftest import SAMPLES
from qlin_cli import QuantConfig, read_qfile
from qlin_cli.api import QuantizeOptions, evaluate_checkpoint, inspect_path, quantize_checkpoint
from qlin_cli.errors import ConfigError, OutputError
from qlin_cli.report import EvalReport, InspectReport, QuantizeReport, json_safe
from qlin_cli.scheme import LayerScheme

MLP = SAMPLES / "digits_mlp.pt"
CALIB = SAMPLES / "digits_calib.safetensors"
TEST_INPUTS = SAMPLES / "digits_test.safetensors"
TEST_LABELS = SAMPLES / "digits_test_labels.safetensors"

REPORT_KEYS = ["source", "source_kind", "output", "format", "config", "device", "calibration", "layers", "probe",
               "fallback", "smoothing", "embeddings", "statistics_from", "totals", "warnings"]
TOTALS_KEYS = {"layers_total", "layers_quantized", "layers_skipped", "linear_bytes_float", "linear_bytes_int8",
               "size_float_bytes", "size_int8_bytes", "compression", "kernels", "embeddings_quantized",
               "embedding_bytes_float", "embedding_bytes_int8"}
# digits_mlp's layers are under the size `auto` quantizes (kept float for speed): name the kernel
INT8 = QuantConfig(kernel="fbgemm")
LAYERS = ["0", "2", "4"]  # digits_mlp: Linear(64, 256), ReLU, Linear(256, 256), ReLU, Linear(256, 10)
SHAPES = {"0": [256, 64], "2": [256, 256], "4": [10, 256]}


def never_calibrate(*args, **kwargs):
    raise AssertionError("calibration ran")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """digits_mlp.pt quantized with the default config and the int8 kernel named, with a report."""
    folder = tmp_path_factory.mktemp("api")
    out, report_path = folder / "mlp.int8.safetensors", folder / "report.json"
    report = quantize_checkpoint(MLP, INT8, QuantizeOptions(output=out, report=report_path))
    return report, out, report_path


def test_quantize_checkpoint_report(quantized):
    report, out, _ = quantized
    assert isinstance(report, QuantizeReport)
    d = report.to_dict()
    assert list(d) == REPORT_KEYS
    assert set(d["totals"]) == TOTALS_KEYS
    assert d["source"] == str(MLP) and d["output"] == str(out) and d["format"] == "qlin" and d["device"] == "cpu"
    assert d["config"] == INT8.to_dict()
    assert d["calibration"] is None and d["fallback"] is None and d["smoothing"] is None and d["embeddings"] == []
    t = d["totals"]
    assert (t["layers_total"], t["layers_quantized"], t["layers_skipped"]) == (3, 3, 0)
    assert t["size_int8_bytes"] == out.stat().st_size
    assert t["size_float_bytes"] == MLP.stat().st_size
    assert t["compression"] == pytest.approx(MLP.stat().st_size / out.stat().st_size)
    assert 3.0 < t["compression"] < 4.0
    assert t["linear_bytes_float"] == 4 * (64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10)
    assert sum(t["kernels"].values()) == 3
    assert [r["name"] for r in d["layers"]] == LAYERS
    for row in d["layers"]:
        assert row["weight_shape"] == SHAPES[row["name"]]
        assert row["scale_shape"] == SHAPES[row["name"]][:1]
        assert {k: row[k] for k in LayerScheme.ENTRY_KEYS} == INT8.scheme.to_dict()
        assert row["status"] == "quantized" and row["weight_sqnr_db"] > 35
    assert d["probe"]["compared"] == "output" and d["probe"]["sqnr_db"] > 30
    assert d["probe"]["description"] == "a random normal batch (8, 64)"


def test_quantize_checkpoint_writes_the_file_and_both_reports(quantized):
    report, out, report_path = quantized
    qf = read_qfile(out, verify=True)
    assert [e["name"] for e in qf.plan.to_list()] == LAYERS
    assert qf.config == INT8
    written = json.loads(report_path.read_text())
    assert written == json.loads(json.dumps(json_safe(report.to_dict())))
    assert list(written) == REPORT_KEYS
    md = report_path.with_suffix(".md")
    assert md.read_text().startswith(f"# qlin quantize {MLP} -> {out}\n")
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, report_path.name, md.name])


def test_second_call_without_force_leaves_everything_unchanged(quantized):
    _, out, report_path = quantized
    before = {p: p.read_bytes() for p in (out, report_path, report_path.with_suffix(".md"))}
    with pytest.raises(OutputError, match=rf"^output {re.escape(str(out))} exists; pass .*force.* to overwrite it$"):
        quantize_checkpoint(MLP, QuantConfig(mode="weight-only"), QuantizeOptions(output=out))
    with pytest.raises(OutputError, match="exists; pass .*force"):
        quantize_checkpoint(MLP, QuantConfig(mode="weight-only"), QuantizeOptions(output=out, report=report_path))
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(out.parent.iterdir()) == sorted(before)  # no temporaries left


def test_force_replaces(tmp_path):
    out = tmp_path / "m.safetensors"
    quantize_checkpoint(MLP, INT8, QuantizeOptions(output=out))
    first = out.read_bytes()
    quantize_checkpoint(MLP, QuantConfig(mode="weight-only"), QuantizeOptions(output=out, force=True))
    assert out.read_bytes() != first
    assert {e.scheme.mode for e in read_qfile(out).plan.quantized} == {"weight-only"}


def test_inspect_path_on_the_output(quantized):
    _, out, _ = quantized
    info = inspect_path(out)
    assert isinstance(info, InspectReport)
    assert info.config == INT8 and info.size_bytes == out.stat().st_size and not info.verified
    d = info.to_dict()
    assert [row.name for row in info.layers] == [row["name"] for row in d["layers"]] == LAYERS
    for row in d["layers"]:
        assert set(LayerScheme.ENTRY_KEYS) <= set(row)
        assert {k: row[k] for k in LayerScheme.ENTRY_KEYS} == INT8.scheme.to_dict()
        assert row["weight_shape"] == SHAPES[row["name"]] and row["weight_dtype"] == "int8"
        assert row["scale_shape"] == row["zero_point_shape"] == SHAPES[row["name"]][:1]
        assert 0 < row["scale_min"] <= row["scale_max"]
    assert d["kind"] == "qlin"
    assert inspect_path(out, verify=True).verified


EVAL_CONFIGS = {
    "default": (QuantConfig(), None),  # every layer kept float for speed
    "fbgemm": (INT8, None),
    "int_mm": (QuantConfig(kernel="int_mm"), None),
    "static": (QuantConfig(mode="static", kernel="int_mm"), CALIB),
    "weight-only": (QuantConfig(mode="weight-only", granularity="tensor"), None),
}


@pytest.mark.parametrize("name", EVAL_CONFIGS)
def test_evaluate_checkpoint_accuracy(name, tmp_path):
    config, calib = EVAL_CONFIGS[name]
    out = tmp_path / "m.safetensors"
    quantize_checkpoint(MLP, config, QuantizeOptions(output=out, calib=calib))
    ev = evaluate_checkpoint(MLP, out, TEST_INPUTS, TEST_LABELS, repeats=1)
    assert isinstance(ev, EvalReport)
    assert ev.samples == 450 and ev.output_shape == [450, 10] and ev.compared == "output"
    assert ev.accuracy_float == pytest.approx(0.9778, abs=1e-4)  # the README's float accuracy
    assert ev.accuracy_float > 0.9 and ev.accuracy_int8 > 0.9
    assert abs(ev.accuracy_float - ev.accuracy_int8) < 0.02
    assert ev.metrics["top1_agreement"] > 0.98 and ev.metrics["sqnr_db"] > 25
    assert ev.source_matches and sum(ev.kernels.values()) == (0 if name == "default" else 3)
    if name == "default":
        assert ev.metrics["sqnr_db"] == float("inf") and ev.size_int8_bytes > 0.99 * ev.size_float_bytes
    if name in ("int_mm", "static"):
        assert ev.kernels == {"int_mm": 3}


def test_static_only_through_a_rule_needs_calibration(tmp_path, monkeypatch):
    monkeypatch.setattr(qlin_cli.quantize, "calibrate", never_calibrate)
    out = tmp_path / "m.safetensors"
    config = QuantConfig(layers=[{"match": "^2$", "mode": "static"}])
    assert config.mode == "dynamic" and config.calibration_need() == "static mode"
    with pytest.raises(ConfigError) as exc:
        quantize_checkpoint(MLP, config, QuantizeOptions(output=out))
    msg = str(exc.value)
    assert msg.startswith("static mode needs calibration data: pass "), msg
    assert "calib" in msg.split(":", 1)[1], msg
    assert "SmoothQuant" not in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_smooth_only_through_a_rule_needs_calibration(tmp_path):
    with pytest.raises(ConfigError, match=r"^SmoothQuant \(.*smooth.*\) needs calibration data: pass .*calib"):
        quantize_checkpoint(MLP, QuantConfig(kernel="fbgemm", layers=[{"match": "^2$", "smooth": 0.5}]),
                            QuantizeOptions(output=tmp_path / "m.safetensors"))
    assert list(tmp_path.iterdir()) == []


def test_smooth_for_compressed_tensors_without_a_norm_exports_unsmoothed(tmp_path):
    """SmoothQuant asked for by a per-layer rule (and by default, with calibration data) cannot be
    divided inside a compressed-tensors kernel; the MLP has no norm to fold it into, so every
    layer is exported without it, says so, and the export is the --no-smooth one, byte for byte."""
    config = QuantConfig(kernel="fbgemm", layers=[{"match": "^2$", "smooth": 0.7}])
    runs = {}
    for name, default in (("on", True), ("off", False)):
        runs[name] = quantize_checkpoint(MLP, config, QuantizeOptions(output=tmp_path / name, calib=CALIB,
                                                                      format="compressed-tensors", default_smooth=default))
    d = runs["on"].to_dict()
    assert d["smoothing"] == {"alpha": [0.5, 0.7], "layers": 3, "default": 2, "data": "256 samples of digits_calib.safetensors",
                              "folded": 0}
    assert [row["reason"] for row in d["layers"]] == [
        "exported without SmoothQuant: its input does not come straight from a LayerNorm/RMSNorm"] * 3
    assert {row["smooth"] for row in d["layers"]} == {None}
    assert runs["off"].to_dict()["smoothing"]["default"] == 0  # the rule's layer still asks for it
    import torch
    from safetensors.torch import load_file  # the tensors are the --no-smooth ones, bit for bit (the
    # metadata differs: its plan records why each layer is unsmoothed)
    on, off = load_file(tmp_path / "on" / "model.safetensors"), load_file(tmp_path / "off" / "model.safetensors")
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)


def test_smooth_rule_with_qlin_format(tmp_path):
    out, report_path = tmp_path / "m.safetensors", tmp_path / "report.json"
    config = QuantConfig(kernel="fbgemm", layers=[{"match": "^2$", "smooth": 0.7}])
    report = quantize_checkpoint(MLP, config, QuantizeOptions(output=out, report=report_path, calib=CALIB))
    plan = read_qfile(out, verify=True).plan.to_list()
    # the rule's alpha for layer 2; SmoothQuant's default (0.5, from the calibration data) for the others
    assert {e["name"]: e["smooth"] for e in plan} == {"0": 0.5, "2": 0.7, "4": 0.5}
    assert {e["name"]: e["status"] for e in plan} == dict.fromkeys(LAYERS, "quantized")
    qf = read_qfile(out)
    assert qf.config == config and qf.tensors["2.smooth_scale"].shape == (256,) and qf.tensors["0.smooth_scale"].shape == (64,)
    d = report.to_dict()
    assert d["calibration"] == {"file": str(CALIB), "samples": 256, "batch_size": 32, "used_for": "calibration"}
    assert [row["smooth"] for row in d["layers"]] == [0.5, 0.7, 0.5]
    assert all(row["output_sqnr_db"] > 25 for row in d["layers"])
    assert json.loads(report_path.read_text())["config"]["layers"] == [{"match": "^2$", "smooth": 0.7}]
    ev = evaluate_checkpoint(MLP, out, TEST_INPUTS, TEST_LABELS, repeats=1)
    assert ev.accuracy_int8 > 0.9


def test_static_rule_with_calibration(tmp_path):
    out = tmp_path / "m.safetensors"
    report = quantize_checkpoint(MLP, QuantConfig(kernel="fbgemm", layers=[{"match": "^2$", "mode": "static"}]),
                                 QuantizeOptions(output=out, calib=CALIB))
    modes = {e.name: e.scheme.mode for e in read_qfile(out).plan.quantized}
    assert modes == {"0": "dynamic", "2": "static", "4": "dynamic"}
    rows = {row["name"]: row for row in report.to_dict()["layers"]}
    assert rows["2"]["input_scale"] > 0 and isinstance(rows["2"]["input_zero_point"], int)
    assert rows["2"]["observer"] == "minmax" and rows["0"]["observer"] is None
    assert rows["0"]["input_scale"] is None


def test_compile_is_an_option_that_changes_no_result_and_reports_its_time(tmp_path):
    """`load_quantized(compile=True)` / `evaluate_checkpoint(compile=True)`: the
    compiled int8 model gives the eager one's outputs (to float rounding: the work between the
    Linear layers fuses), and eval reports each model's first call, which compiles, apart."""
    import torch

    from qlin_cli import load_quantized
    from qlin_cli.sources import load_source

    out = tmp_path / "q.safetensors"
    quantize_checkpoint(MLP, QuantConfig(kernel="fbgemm"), QuantizeOptions(output=out))
    eager = load_quantized(load_source(MLP).model, out)
    compiled = load_quantized(load_source(MLP).model, out, compile=True)
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert torch.allclose(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    plain = evaluate_checkpoint(MLP, out, TEST_INPUTS, TEST_LABELS, repeats=1)
    report = evaluate_checkpoint(MLP, out, TEST_INPUTS, TEST_LABELS, repeats=1, compile=True)
    assert "compile_s" not in plain.to_dict()
    assert set(report.to_dict()["compile_s"]) == {"float", "int8"} and all(t > 0 for t in report.compile_s.values())
    assert abs(report.metrics["sqnr_db"] - plain.metrics["sqnr_db"]) < 0.5
    assert report.accuracy_int8 == pytest.approx(plain.accuracy_int8, abs=0.005)
