"""The typed records a quantize or inspect report carries: each one's `to_dict()` is the JSON
the report shows, key for key and in order; the sensitivities have one home, which the JSON's
two places and the HTML chart read."""

from qlin_cli.config import QuantConfig
from qlin_cli.jobs.inspect import GATHER
from qlin_cli.kernels import KernelChoice
from qlin_cli.quantize import Fallback, FallbackStep, LayerSensitivity, Sensitivity
from qlin_cli.report import Calibration, InspectRow, Probe, QuantizeReport, Smoothing
from qlin_cli.report_html import to_html
from qlin_cli.scheme import LayerScheme


def items(d: dict) -> list:
    return list(d.items())  # compares the order of the keys too


def test_calibration():
    assert items(Calibration("c.safetensors", 64, 32, "calibration").to_dict()) == [
        ("file", "c.safetensors"), ("samples", 64), ("batch_size", 32), ("used_for", "calibration")]
    text = "causal-lm text: 6,183 tokens, windows of 64 tokens, stride 32"
    assert items(Calibration("t.txt", 4, 8, "measuring the first batch", text).to_dict()) == [
        ("file", "t.txt"), ("samples", 4), ("batch_size", 8), ("text", text), ("used_for", "measuring the first batch")]
    assert Calibration(None, 32, 32, "SmoothQuant factors from the probe (x)").to_dict()["file"] is None


def test_probe_measured_and_not():
    metrics = {"sqnr_db": 40.0, "cosine": 0.9999, "max_abs_err": 0.1, "mse": 0.001, "top1_agreement": None}
    assert items(Probe("8 samples", "logits", "", metrics).to_dict()) == [
        ("description", "8 samples"), ("compared", "logits"), ("note", ""), *metrics.items()]
    assert Probe("none", None, "not measured").to_dict() == {"description": "none", "compared": None, "note": "not measured"}


def test_smoothing():
    assert items(Smoothing((0.5, 0.7), 3, 2, "256 samples of c.safetensors", folded=1).to_dict()) == [
        ("alpha", [0.5, 0.7]), ("layers", 3), ("default", 2), ("data", "256 samples of c.safetensors"), ("folded", 1)]
    assert Smoothing((0.5,), 1, 0, "x").to_dict()["folded"] is None


def test_fallback_steps_say_from_which_width_only_when_widened():
    widened = FallbackStep("fc", "8-bit", 13.5, 20.0, from_bits=2)
    assert items(widened.to_dict()) == [("layer", "fc"), ("to", "8-bit"), ("from_bits", 2), ("alone_sqnr_db", 13.5),
                                        ("sqnr_db_after", 20.0)]
    assert items(FallbackStep("head", "float", 30.0, 41.5).to_dict()) == [
        ("layer", "head"), ("to", "float"), ("alone_sqnr_db", 30.0), ("sqnr_db_after", 41.5)]
    fb = Fallback(40.0, 38.5, 41.5, (widened,))
    assert items(fb.to_dict()) == [("target_sqnr_db", 40.0), ("initial_sqnr_db", 38.5), ("final_sqnr_db", 41.5),
                                   ("steps", [widened.to_dict()])]


def test_sensitivity_ranking_and_latest():
    ranking = (LayerSensitivity("b", 20.0), LayerSensitivity("a", 30.0))
    s = Sensitivity(18.0, latest=(LayerSensitivity("a", 31.0), LayerSensitivity("b", 20.0)), ranking=ranking,
                    data="100 samples of e.safetensors")
    assert items(s.to_dict()) == [("data", "100 samples of e.safetensors"), ("all_int8_sqnr_db", 18.0),
                                  ("layers", [{"layer": "b", "alone_sqnr_db": 20.0}, {"layer": "a", "alone_sqnr_db": 30.0}])]
    assert items(s.by_layer()) == [("a", 31.0), ("b", 20.0)]


def _report(fallback=None, sensitivity=None) -> QuantizeReport:
    return QuantizeReport(source="m.pt", source_kind="module", output="o.safetensors", format="qlin",
                          config=QuantConfig(), device="cpu", calibration=None, layers=(), probe=Probe("none", None, ""),
                          fallback=fallback, size_float_bytes=4, size_int8_bytes=1, sensitivity=sensitivity)


def test_the_report_shows_the_sensitivities_where_it_always_has():
    """--sensitivity: the ranking as `sensitivity`; --min-sqnr: the latest by layer inside
    `fallback` (as `sensitivity_db`), and the chart draws those."""
    latest = (LayerSensitivity("a", 31.0),)
    asked = Sensitivity(18.0, latest, ranking=(LayerSensitivity("a", 30.0),), data="d")
    fb = Fallback(40.0, 18.0, 18.0, ())
    only_target = _report(fb, Sensitivity(18.0, latest)).to_dict()
    assert "sensitivity" not in only_target and only_target["fallback"]["sensitivity_db"] == {"a": 31.0}
    assert list(only_target["fallback"])[-1] == "sensitivity_db"
    both = _report(fb, asked).to_dict()
    assert both["sensitivity"] == asked.to_dict() and both["fallback"]["sensitivity_db"] == {"a": 31.0}
    only_asked = _report(None, asked).to_dict()
    assert only_asked["fallback"] is None and only_asked["sensitivity"]["layers"] == [{"layer": "a", "alone_sqnr_db": 30.0}]
    neither = _report().to_dict()
    assert "sensitivity" not in neither and neither["fallback"] is None
    assert [t.title.split(":")[0] for t in _report(fb, asked).tables()][1:] == ["sensitivity on d"]
    assert len(_report(fb, Sensitivity(18.0, latest)).tables()) == 1  # the table lists a ranking asked for


def test_inspect_rows_keep_the_old_keys_in_order():
    scheme = LayerScheme(mode="static")
    row = InspectRow("fc", "quantized", "", (4, 8), ("alias",), weight_dtype="int8", scale_shape=(4,),
                     zero_point_shape=(4,), scale_min=0.01, scale_max=0.02, scheme=scheme,
                     choice=KernelChoice("fbgemm", "requested", True, False), input_scale=0.1, input_zero_point=3)
    assert items(row.to_dict()) == [
        ("name", "fc"), ("status", "quantized"), ("reason", ""), ("weight_shape", [4, 8]), ("aliases", ["alias"]),
        ("weight_dtype", "int8"), ("scale_shape", [4]), ("zero_point_shape", [4]), *scheme.to_dict().items(),
        ("scale_min", 0.01), ("scale_max", 0.02), ("kernel", "fbgemm"), ("kernel_reason", "requested"),
        ("batch_invariant", True), ("input_scale", 0.1), ("input_zero_point", 3)]
    assert items(InspectRow("head", "skipped", "matches --skip", (2, 4)).to_dict()) == [
        ("name", "head"), ("status", "skipped"), ("reason", "matches --skip"), ("weight_shape", [2, 4]), ("aliases", [])]
    table = InspectRow("embed", "quantized", "", (10, 4), embedding=True, weight_dtype="int8", scale_shape=(10,),
                       scale_min=0.1, scale_max=0.2, choice=GATHER)
    assert items(table.to_dict()) == [
        ("name", "embed"), ("status", "quantized"), ("reason", ""), ("kind", "embedding"), ("weight_shape", [10, 4]),
        ("aliases", []), ("weight_dtype", "int8"), ("scale_shape", [10]), ("zero_point_shape", None),
        ("granularity", "channel"), ("symmetric", True), ("scale_min", 0.1), ("scale_max", 0.2), ("kernel", "gather"),
        ("kernel_reason", "int8 rows dequantized on lookup"), ("batch_invariant", True), ("mode", "weight-only"),
        ("smooth", None)]
    assert items(InspectRow("embed", "skipped", "tied", (10, 4), embedding=True).to_dict()) == [
        ("name", "embed"), ("status", "skipped"), ("reason", "tied"), ("kind", "embedding"), ("weight_shape", [10, 4]),
        ("aliases", [])]


def test_the_chart_draws_the_one_home_of_the_sensitivities():
    from qlin_cli.plan import PlanEntry
    from qlin_cli.quantize import LayerResult

    layers = tuple(LayerResult(PlanEntry(n, 8, 4, True, "float32", scheme=LayerScheme()),
                               KernelChoice("int_mm", "", True, False), 40.0)
                   for n in ("a", "b"))
    sens = Sensitivity(30.0, (LayerSensitivity("a", 33.25), LayerSensitivity("b", 35.5)),
                       ranking=(LayerSensitivity("a", 33.25), LayerSensitivity("b", 35.5)), data="d")
    report = QuantizeReport(source="m.pt", source_kind="module", output="o", format="qlin", config=QuantConfig(),
                            device="cpu", calibration=None, layers=layers, probe=Probe("none", None, ""), fallback=None,
                            size_float_bytes=4, size_int8_bytes=1, sensitivity=sens)
    page = to_html(report)
    assert "a: sensitivity (model output SQNR, layer alone int8) 33.25 dB" in page
    assert "b: sensitivity (model output SQNR, layer alone int8) 35.50 dB" in page
    assert "sensitivity (model output SQNR" not in to_html(_report())
