"""The run's data, chosen once (jobs/run_data.py): for each combination of calibration data,
eval inputs, an `inputs` file and the kind of model, which samples serve as the probe, as
SmoothQuant's data and as the measurement data, and what the report calls each."""

import pytest
import torch
from safetensors.torch import save_file

from job_models import TextToy, mlp
from qlin_cli.errors import InputError
from qlin_cli.jobs.options import QuantizeOptions
from qlin_cli.jobs.run_data import CalibrationData, Samples, choose_data, load_data, read_calibration

CPU = torch.device("cpu")


def calibration(n: int = 100, name: str = "c.safetensors") -> CalibrationData:
    x = torch.randn(n, 16)
    return CalibrationData(Samples(x, f"{n} samples of {name}"), f"data/{name}", None)


def inputs_file(tmp_path, n: int) -> torch.Tensor:
    x = torch.randn(n, 16)
    save_file({"inputs": x}, tmp_path / "i.safetensors")
    return x


def test_nothing_given_probes_a_random_normal_batch_that_calibrates_nothing():
    data = choose_data(mlp(), None, None, None, CPU)
    assert data.probe.description == "a random normal batch (8, 16)" and data.probe.inputs.shape == (8, 16)
    assert torch.equal(data.probe.inputs, torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))
    assert data.smoothing is None and data.calibration is None and not data.probe_given
    assert data.measurement is data.probe  # --sensitivity alone measures on the probe
    assert data.calibration_run(needed=False) is None


def test_calibration_data_serves_every_purpose():
    cal = calibration(100)
    data = choose_data(mlp(), cal, None, None, CPU)
    assert data.probe.description == "64 samples of c.safetensors (the calibration data)"
    assert torch.equal(data.probe.inputs, cal.samples.inputs[:64])
    assert data.smoothing is cal.samples and data.smoothing.description == "100 samples of c.safetensors"
    assert data.measurement.description == "100 samples of c.safetensors (the calibration data)"
    assert data.measurement.inputs is cal.samples.inputs
    assert data.calibration_run(needed=False) is cal.samples.inputs


def test_eval_inputs_are_the_probe_and_the_measurement_and_calibration_smooths():
    cal, ev = calibration(100), Samples(torch.randn(30, 16), "e.safetensors")
    data = choose_data(mlp(), cal, ev, None, CPU)
    assert data.probe.description == "30 samples of e.safetensors" and torch.equal(data.probe.inputs, ev.inputs)
    assert data.measurement.description == "30 samples of e.safetensors" and data.measurement.inputs is ev.inputs
    assert data.smoothing is cal.samples


def test_an_inputs_file_is_the_probe_the_others_keep_their_roles(tmp_path):
    x = inputs_file(tmp_path, 80)
    cal = calibration(100)
    data = choose_data(mlp(), cal, None, tmp_path / "i.safetensors", CPU)
    assert data.probe.description == "64 samples of i.safetensors" and torch.equal(data.probe.inputs, x[:64])
    assert data.probe_given and data.smoothing is cal.samples
    assert data.measurement.description == "100 samples of c.safetensors (the calibration data)"


def test_an_inputs_file_alone_is_realistic_enough_for_smoothquant(tmp_path):
    inputs_file(tmp_path, 10)
    data = choose_data(mlp(), None, None, tmp_path / "i.safetensors", CPU)
    assert data.probe.description == "10 samples of i.safetensors"
    assert data.smoothing is data.probe and data.measurement is data.probe
    # with no calibration data, calibration runs on SmoothQuant's data only where the plan needs it
    assert data.calibration_run(needed=True) is data.probe.inputs and data.calibration_run(needed=False) is None


def test_a_non_finite_inputs_file_is_refused(tmp_path):
    save_file({"inputs": torch.full((4, 16), float("nan"))}, tmp_path / "i.safetensors")
    with pytest.raises(InputError, match="inputs .*i.safetensors"):
        choose_data(mlp(), None, None, tmp_path / "i.safetensors", CPU)


def test_a_text_model_is_probed_with_seeded_token_ids_that_smoothquant_may_use():
    data = choose_data(TextToy(), None, None, None, CPU)
    assert data.probe.description == "random token ids (32, 8) with an all-ones attention mask"
    ids = data.probe.inputs["input_ids"]
    assert ids.shape == (32, 8) and int(ids.max()) < 50 and torch.equal(data.probe.inputs["attention_mask"], torch.ones_like(ids))
    assert data.smoothing is data.probe and data.measurement is data.probe


def test_load_data_cuts_the_calibration_and_names_each_file(tmp_path):
    save_file({"inputs": torch.randn(50, 16)}, tmp_path / "c.safetensors")
    save_file({"inputs": torch.randn(7, 16)}, tmp_path / "e.safetensors")
    o = QuantizeOptions(calib=tmp_path / "c.safetensors", calib_samples=20, eval_inputs=tmp_path / "e.safetensors")
    cal, ev = load_data(read_calibration(o, tmp_path), o, mlp(), CPU)
    assert cal.samples.inputs.shape == (20, 16) and cal.samples.description == "20 samples of c.safetensors"
    assert cal.file == str(tmp_path / "c.safetensors") and cal.text is None
    assert ev.inputs.shape == (7, 16) and ev.description == "e.safetensors"
    assert load_data(read_calibration(QuantizeOptions(), tmp_path), QuantizeOptions(), mlp(), CPU) == (None, None)


def test_non_finite_eval_inputs_are_refused(tmp_path):
    save_file({"inputs": torch.full((3, 16), float("inf"))}, tmp_path / "e.safetensors")
    o = QuantizeOptions(eval_inputs=tmp_path / "e.safetensors")
    with pytest.raises(InputError, match="eval inputs"):
        load_data(None, o, mlp(), CPU)


def test_a_calibration_text_is_cut_into_windows_and_says_how():
    from pathlib import Path

    from qlin_cli.sources import load_source

    samples = Path(__file__).resolve().parents[1] / "sample_models"
    folder, text = samples / "docs_lm", samples / "docs_calib.txt"
    o = QuantizeOptions(calib_text=text, max_length=64, calib_samples=4)
    cal, ev = load_data(read_calibration(o, folder), o, load_source(folder).model, CPU)
    assert ev is None and cal.file == str(text)
    assert cal.samples.inputs["input_ids"].shape == (4, 64) and cal.samples.description == "4 samples of docs_calib.txt"
    assert cal.text.startswith("causal-lm text: ") and cal.text.endswith(" tokens, windows of 64 tokens, stride 32")
