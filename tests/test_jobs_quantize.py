"""The quantize job's stages in isolation (jobs/quantize.py), and the checks made before any
loading (jobs/options.py)."""

import logging

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import qlin_cli.jobs.options as options
from job_models import TextToy, mlp
from qlin_cli.config import QuantConfig
from qlin_cli.errors import ConfigError, InputError
from qlin_cli.jobs import quantize as job
from qlin_cli.jobs.options import Checked, QuantizeOptions, check_options
from qlin_cli.jobs.run_data import CalibrationData, RunData, Samples, choose_data
from qlin_cli.plan import make_plan
from qlin_cli.sources import SAFETENSORS, what_is

CPU = torch.device("cpu")
INT_MM = QuantConfig(kernel="int_mm")  # quantizes layers this small (auto keeps them float)


class Picky(nn.Module):
    """A model the random probe cannot run: it wants a keyword argument."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, *, x):
        return self.fc(x)


def a_job(tmp_path, config=INT_MM, **opts) -> "job._Job":
    o = QuantizeOptions(**opts)
    checked = Checked(tmp_path / "m.pt", tmp_path / "m.int8.safetensors", None, CPU, None)
    return job._Job(checked, config, o, None, None)


def with_calibration(model, n=40) -> RunData:
    cal = CalibrationData(Samples(torch.randn(n, 16), f"{n} samples of c.safetensors"), "c.safetensors", None)
    return choose_data(model, cal, None, None, CPU)


def test_plan_notes_a_pattern_that_matches_nothing_and_strict_refuses_it(tmp_path):
    config = QuantConfig(kernel="int_mm", skip=("^nothing$",))
    plan, notes = job._plan(a_job(tmp_path, config), mlp())
    assert [e.name for e in plan.quantized] == ["0", "2"] and len(notes) == 1 and "matches no layer" in notes[0]
    with pytest.raises(ConfigError, match=r"matches no layer \(`strict`\)"):
        job._plan(a_job(tmp_path, config, strict=True), mlp())


def test_smooth_by_default_with_realistic_data_only(tmp_path):
    model = mlp()
    plan = make_plan(model, INT_MM)
    smoothed, smoothing = job._smooth(a_job(tmp_path), plan, with_calibration(model))
    assert {e.scheme.smooth for e in smoothed.quantized} == {0.5}
    assert smoothing.to_dict() == {"alpha": [0.5], "layers": 2, "default": 2, "data": "40 samples of c.safetensors",
                                   "folded": None}
    random_probe = choose_data(model, None, None, None, CPU)
    assert job._smooth(a_job(tmp_path), plan, random_probe) == (plan, None)  # never from a random normal batch
    assert job._smooth(a_job(tmp_path, default_smooth=False), plan, with_calibration(model)) == (plan, None)


def test_smooth_asked_for_without_data_is_refused(tmp_path):
    model = mlp()
    config = QuantConfig(kernel="int_mm", smooth=0.7)
    with pytest.raises(ConfigError, match="SmoothQuant .* needs calibration data: .*`inputs` FILE"):
        job._smooth(a_job(tmp_path, config), make_plan(model, config), choose_data(model, None, None, None, CPU))


def test_reference_notes_a_probe_the_model_cannot_run_unless_the_user_gave_it(tmp_path):
    model = Picky()
    ref, compared, note = job._reference(model, choose_data(model, None, None, None, CPU))
    assert ref is None and compared is None and note.endswith("; pass --inputs FILE to measure it")
    save_file({"inputs": torch.randn(4, 16)}, tmp_path / "i.safetensors")
    with pytest.raises(InputError):
        job._reference(model, choose_data(model, None, None, tmp_path / "i.safetensors", CPU))
    ref, compared, note = job._reference(mlp(), with_calibration(mlp()))
    assert ref.shape == (40, 4) and compared == "output" and note == ""


def test_calibration_record_says_what_the_data_was_used_for(tmp_path):
    model = mlp()
    o = QuantizeOptions(batch_size=8)
    data = with_calibration(model)
    plain = make_plan(model, INT_MM)
    smooth, _ = plain.with_smoothing(0.5)
    assert job._calibration(o, plain, None, data) is None
    assert job._calibration(o, plain, data.calibration_run(False), data).to_dict() == {
        "file": "c.safetensors", "samples": 40, "batch_size": 8, "used_for": "measuring the first batch"}
    assert job._calibration(o, smooth, data.calibration_run(True), data).used_for == "calibration"
    probe_only = choose_data(TextToy(), None, None, None, CPU)
    record = job._calibration(o, smooth, probe_only.calibration_run(True), probe_only)
    assert record.file is None and record.samples == 32
    assert record.used_for == f"SmoothQuant factors from the probe ({probe_only.probe.description})"


def test_measure_compares_the_int8_model_with_the_reference_on_the_probe(tmp_path):
    model = mlp()
    data = with_calibration(model)
    reference = job._reference(model, data)
    result = job._quantize_or_fall_back(a_job(tmp_path), model, make_plan(model, INT_MM), None, data)
    probe = job._measure(result, data, reference)
    assert probe.description == "40 samples of c.safetensors (the calibration data)" and probe.compared == "output"
    assert probe.metrics["sqnr_db"] > 30 and list(probe.to_dict())[:3] == ["description", "compared", "note"]
    unmeasured = job._measure(result, data, (None, None, "why"))
    assert unmeasured.metrics is None and unmeasured.note == "why"


def test_sensitivity_is_named_by_the_data_it_was_measured_on(tmp_path):
    model = mlp()
    data = with_calibration(model)
    result = job._quantize_or_fall_back(a_job(tmp_path, sensitivity=True), model, make_plan(model, INT_MM), None, data)
    assert result.sensitivity.data == "40 samples of c.safetensors (the calibration data)"
    assert [s.layer for s in result.sensitivity.ranking] and result.fallback is None


def test_check_options_gives_the_paths_the_job_uses(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2, 2)}, src)
    checked = check_options(src, QuantConfig(), QuantizeOptions(model="x:y", report=tmp_path / "r.json"))
    assert checked == Checked(what_is(src), tmp_path / "m.int8.safetensors", tmp_path / "r.json", CPU, None)
    assert checked.source == src and checked.kind.kind == SAFETENSORS
    with pytest.raises(ConfigError, match="`calib_samples` needs `calib` FILE"):
        check_options(src, QuantConfig(), QuantizeOptions(calib_samples=3))
    with pytest.raises(ConfigError, match="give the JSON path"):
        check_options(src, QuantConfig(), QuantizeOptions(report=tmp_path / "r.md"))


def test_a_source_larger_than_the_memory_available_is_streamed_decided_before_loading(tmp_path, monkeypatch, caplog):
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(64, 64)}, src)
    assert isinstance(options._available_memory(), (int, type(None)))
    monkeypatch.setattr(options, "_available_memory", lambda: 100)
    with caplog.at_level(logging.WARNING, logger="qlin"):
        assert check_options(src, QuantConfig(), QuantizeOptions()).stream
    assert "more than the 0.0 GB of memory available: streamed (`stream`)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlin"):  # what needs the whole model: not streamed, said why
        assert not check_options(src, QuantConfig(embeddings=True), QuantizeOptions()).stream
    assert "cannot be streamed: `stream` quantizes the Linear layers one at a time, not embedding tables" in caplog.text
    monkeypatch.setattr(options, "_available_memory", lambda: 10**12)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlin"):
        assert not check_options(src, QuantConfig(), QuantizeOptions()).stream
    assert caplog.text == ""


def test_a_compressed_tensors_export_with_smoothquant_keeps_the_warnings(tmp_path):
    """SmoothQuant folded into the norms leaves the report's warnings as they were (they once
    became the names of the folded layers)."""
    import transformers

    from qlin_cli.api import quantize_checkpoint

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )).save_pretrained(tmp_path / "llama")
    report = quantize_checkpoint(tmp_path / "llama", QuantConfig(kernel="int_mm", skip=("^nothing$",)),
                                 QuantizeOptions(output=tmp_path / "ct", format="compressed-tensors"))
    assert report.smoothing.folded > 0 and report.smoothing.data.startswith("random token ids")
    assert len(report.notes) == 1 and report.notes[0].endswith("matches no layer")
