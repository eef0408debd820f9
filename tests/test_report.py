"""Metrics and report rendering."""

import json
import math

import pytest
import torch

from conftest import SAMPLES, fbgemm_fallback
from qlin_cli.api import QuantizeOptions, quantize_checkpoint
from qlin_cli.config import QuantConfig
from qlin_cli.errors import InputError
from qlin_cli.kernels import KernelChoice
from qlin_cli.plan import PlanEntry
from qlin_cli.quantize import Fallback, FallbackStep, LayerResult
from qlin_cli.report import Calibration, OutputComparison, Probe, QuantizeReport, compare_outputs, json_safe, layer_note, to_markdown
from qlin_cli.scheme import PER_TENSOR, LayerScheme


def test_compare_outputs_numbers():
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out = torch.tensor([[0.5, 0.0], [0.0, 2.0]])
    m = compare_outputs(ref, out)
    assert math.isclose(m["sqnr_db"], 10 * math.log10(5 / 0.25), rel_tol=1e-6)
    assert math.isclose(m["max_abs_err"], 0.5) and math.isclose(m["mse"], 0.25 / 4)
    assert math.isclose(m["cosine"], 1.0) and m["top1_agreement"] == 1.0
    m = compare_outputs(ref, torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
    assert m["top1_agreement"] == 0.5 and math.isclose(m["cosine"], 0.5)
    assert compare_outputs(torch.ones(2, 3, 4), torch.ones(2, 3, 4))["top1_agreement"] is None
    with pytest.raises(InputError, match="differ in shape"):
        compare_outputs(torch.ones(2, 3), torch.ones(3, 2))


def _whole(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """compare_outputs as it was before it gathered batches: every output at once, in float64."""
    flat_r, flat_o = ref.reshape(ref.shape[0], -1).double(), out.reshape(out.shape[0], -1).double()
    return {
        "sqnr_db": 10 * math.log10(float(ref.double().pow(2).sum()) / float((ref.double() - out.double()).pow(2).sum())),
        "cosine": float(torch.nn.functional.cosine_similarity(flat_r, flat_o, dim=1, eps=1e-12).mean()),
        "max_abs_err": float((ref - out).abs().max()),
        "mse": float((ref.double() - out.double()).pow(2).mean()),
        "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).double().mean()) if ref.dim() == 2 else None,
    }


@pytest.mark.parametrize("shape", [(37, 10), (9, 5, 300)])
@pytest.mark.parametrize("batch", [1, 4, 64])
@pytest.mark.parametrize("slice_values", [700, 256])
def test_batches_compare_as_the_whole_output(shape, batch, slice_values, monkeypatch):
    """Gathered batch by batch (and in float64 slices of a few samples, or of part of one where
    a sample is larger than a slice: 1,024 tokens of logits), the numbers are the whole outputs'
    to float rounding: an LM's logits need not be kept to be compared."""
    monkeypatch.setattr(OutputComparison, "SLICE", slice_values)  # 700: 2 samples of the 3-D case; 256: part of one
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(shape, generator=gen)
    out = ref + 0.05 * torch.randn(shape, generator=gen)
    comparison = OutputComparison()
    for i in range(0, shape[0], batch):
        comparison.add(ref[i : i + batch], out[i : i + batch])
    got, want = comparison.metrics(), _whole(ref, out)
    assert comparison.shape == shape
    for key, value in want.items():
        assert value is None and got[key] is None or math.isclose(got[key], value, rel_tol=1e-5), (key, got[key], value)
    with pytest.raises(InputError, match=r"change shape between batches: \(10,\) per sample, then \(11,\)"):
        c = OutputComparison()
        c.add(torch.ones(2, 10), torch.ones(2, 10))
        c.add(torch.ones(2, 11), torch.ones(2, 11))


def _result(name, out_f, in_f, scheme=None, reason="", choice=None, bytes_float=0, bytes_int8=0, weight_sqnr=None,
            output_sqnr=None):
    entry = PlanEntry(name, in_f, out_f, True, "float32", scheme=scheme, reason=reason)
    return LayerResult(entry, choice, weight_sqnr, bytes_float, bytes_int8, output_sqnr)


def _report(layers, calibration=True, fallback=None):
    return QuantizeReport(
        source="m.pt", source_kind="module", output="m.int8.safetensors", format="qlin", config=QuantConfig(),
        device="cpu", calibration=Calibration("c.safetensors", 8, 4, "measuring the first batch") if calibration else None,
        layers=tuple(layers),
        probe=Probe("8 samples", "output", "", {"sqnr_db": 41.5, "cosine": 0.99999, "max_abs_err": 0.01, "mse": 1e-4,
                                                "top1_agreement": 1.0}),
        fallback=fallback, size_float_bytes=400, size_int8_bytes=100,
    )


def test_json_safe_and_markdown():
    assert json_safe({"a": [float("inf"), -float("inf"), 1.0]}) == {"a": ["inf", "-inf", 1.0]}
    fallback = Fallback(40.0, 38.5, 41.5, (FallbackStep("head", "float", 30.0, 41.5),))
    report = _report([
        _result("fc", 4, 8, LayerScheme(), choice=KernelChoice("int_mm", "auto: per-token int8 activations", True, False),
                bytes_float=144, bytes_int8=56, weight_sqnr=44.0, output_sqnr=41.0),
        _result("head", 2, 4, reason="matches --skip 'head'", bytes_float=40, bytes_int8=40),
    ], fallback=fallback)
    md = to_markdown(report)
    assert md.startswith("# qlin quantize m.pt -> m.int8.safetensors\n")
    assert ("| layer | weight shape | scale shape | kernel | weight SQNR dB | output SQNR dB | bytes float -> int8 "
            "| note |") in md
    # the kernel's reason is no note when it is auto's ordinary choice
    assert "| fc | (4, 8) | (4,) | int_mm | 44.00 | 41.00 | 144 -> 56 |  |" in md
    assert "| head | (2, 4) | - | float | - | - | 40 -> 40 | matches --skip 'head' |" in md
    assert "- layers: 1 of 2 quantized, 1 kept float" in md
    assert "SQNR 41.50 dB" in md and "4.00x smaller" in md
    assert "- accuracy fallback to 40 dB: all int8 gave 38.50 dB; head float -> 41.50 dB" in md
    # the JSON twin: the old dict's keys, from the same objects
    d = report.to_dict()
    assert [r["name"] for r in d["layers"]] == ["fc", "head"]
    assert d["layers"][0]["scale_shape"] == [4] and d["layers"][1]["scale_shape"] is None
    assert d["layers"][1]["reason"] == "matches --skip 'head'" and d["layers"][1]["status"] == "skipped"
    assert d["totals"]["layers_quantized"] == 1 and d["totals"]["compression"] == 4.0
    assert d["totals"]["linear_bytes_float"] == 184 and d["totals"]["kernels"] == {"int_mm": 1}
    assert d["fallback"] == {"target_sqnr_db": 40.0, "initial_sqnr_db": 38.5, "final_sqnr_db": 41.5,
                             "steps": [{"layer": "head", "to": "float", "alone_sqnr_db": 30.0, "sqnr_db_after": 41.5}],
                             "sensitivity_db": {}}


def test_layer_notes_in_the_markdown():
    """The note column (report.layer_note): a skipped layer's reason; for a quantized one how an
    nn.Linear subclass was captured, the kernel's reason only when it is a fallback or keeps the
    layer in float ('dequant'), and 'batch-dependent' when its rows depend on the batch."""
    per_tensor = LayerScheme(act_granularity=PER_TENSOR, kernel="fbgemm")
    affine = "affine map of ScaledLinear (its own forward), fit 140 dB"
    fallback = "fallback: fbgemm runs on CPU only"
    small = "auto: kept in float: int8 is slower than float for dynamic layers under 131,072 weights on CPU (8x4)"
    report = _report([
        _result("sub", 4, 8, LayerScheme(), reason=affine,
                choice=KernelChoice("int_mm", "auto: per-token", True, False)),
        _result("forced", 4, 8, per_tensor, choice=KernelChoice("int_mm", fallback, False, True)),
        _result("requested", 4, 8, per_tensor, choice=KernelChoice("fbgemm", "requested", False, False)),
        _result("small", 4, 8, LayerScheme(), choice=KernelChoice("dequant", small, False, False)),
        _result("tied", 4, 8, reason="weight tied to embed"),
    ], calibration=False)
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in to_markdown(report).splitlines()
            if line.startswith("| ") and not line.startswith("| layer ")}
    assert set(rows) == {"sub", "forced", "requested", "small", "tied"}
    note = {name: line.rsplit(" | ", 1)[1].removesuffix(" |").removesuffix("|").strip() for name, line in rows.items()}
    assert note == {
        "sub": affine,
        "forced": f"{fallback}; batch-dependent",
        "requested": "batch-dependent",
        "small": f"{small}; batch-dependent",
        "tied": "weight tied to embed",
    }
    assert "output SQNR dB" not in to_markdown(report)  # no calibration data: no output SQNR column
    assert layer_note("skipped", "weight tied to embed", None) == "weight tied to embed"
    assert layer_note("quantized", "", KernelChoice("int_mm", "auto: per-token", True, False)) == ""


def test_report_files_of_a_real_run(tmp_path):
    """quantize_checkpoint returns the report it writes: the .md file is to_markdown(report),
    with one row per Linear layer, and the JSON file is report.to_dict()."""
    out, path = tmp_path / "m.int8.safetensors", tmp_path / "report.json"
    report = quantize_checkpoint(SAMPLES / "digits_mlp.pt", QuantConfig(skip=("2$",), layers=[{"match": "^4$", "kernel": "fbgemm"}]),
                                 QuantizeOptions(output=out, report=path))
    assert isinstance(report, QuantizeReport)
    md = (tmp_path / "report.md").read_text()
    assert md == to_markdown(report)
    assert json.loads(path.read_text()) == json_safe(report.to_dict())
    assert [(r.name, r.status) for r in report.layers] == [("0", "skipped"), ("2", "skipped"), ("4", "quantized")]
    for r in report.layers:
        assert md.count(f"| {r.name} |") == 1
        cells = next(line for line in md.splitlines() if line.startswith(f"| {r.name} |")).split(" | ")
        note = layer_note(r.status, r.plan.reason, r.choice)
        assert cells[3] == (r.kernel or "float") and cells[-1] == f"{note} |"
        if r.name == "2":
            assert note == "matches --skip '2$'"
        elif r.name == "0":  # under 2**17 weights `auto` keeps it float, and the note says why, shape (out, in)
            assert r.kernel is None and cells[3] == "float" and note.startswith("kept float for speed:") and "(256, 64)" in note
        else:  # the kernel named by a rule: int8 whatever the size, nothing to note
            assert r.kernel in ("fbgemm", fbgemm_fallback()) and note == ("" if r.kernel == "fbgemm" else r.kernel_reason)
    assert "- note: 1 of 3 Linear layers are too small for int8" in md
