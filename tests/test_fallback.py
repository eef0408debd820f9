"""Accuracy-aware fallback: the most sensitive layers go back to float until a target is met."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLES, load_encoder
from qlin_cli import QuantConfig, QuantizedLinear, load_quantized, save_quantized
from qlin_cli.api import QuantizeOptions, quantize_checkpoint
from qlin_cli.errors import ConfigError
from qlin_cli.data import model_output
from qlin_cli.fallback import quantize_to_target
from qlin_cli.primitives import sqnr_db


@pytest.fixture(scope="module")
def data():
    calib = load_file(SAMPLES / "digits_calib.safetensors")["inputs"]
    test = load_file(SAMPLES / "digits_test.safetensors")["inputs"][:200]
    return calib, test


def test_fallback_reaches_the_target_on_the_sample_encoder(data, tmp_path):
    calib, test = data
    reference = model_output(load_encoder(), test, 64)
    all_int8 = quantize_to_target(load_encoder(), QuantConfig(kernel="pertoken", mode="static"), min_sqnr_db=0.0, eval_inputs=test, calib=calib)
    initial = all_int8.fallback.initial_sqnr_db
    assert all_int8.fallback.steps == () and len(all_int8.quantized) == 10
    target = initial + 2.0
    result = quantize_to_target(load_encoder(), QuantConfig(kernel="pertoken", mode="static"), min_sqnr_db=target, eval_inputs=test, calib=calib)
    fb = result.fallback
    assert fb.initial_sqnr_db == pytest.approx(initial)
    assert fb.steps and fb.final_sqnr_db >= target
    alone = [s.alone_sqnr_db for s in fb.steps]
    assert alone == sorted(alone)  # most sensitive (lowest alone SQNR) first
    assert all(s.sqnr_db_after < target for s in fb.steps[:-1])  # stops as soon as it is met
    fell = {s.layer for s in fb.steps}
    for rec in result.layers:
        module = result.model.get_submodule(rec.name)
        if rec.name in fell:
            assert rec.status == "skipped" and "accuracy fallback" in rec.plan.reason and type(module) is torch.nn.Linear
            assert rec.plan.scheme is None and rec.kernel is None
        else:
            assert isinstance(module, QuantizedLinear)
    assert sqnr_db(reference, model_output(result.model, test, 64)) == pytest.approx(fb.final_sqnr_db)
    # the saved file keeps the fallen-back layers float and reloads to the same outputs
    path = save_quantized(result, tmp_path / "fb.safetensors")
    loaded = load_quantized(load_encoder(), path)
    with torch.no_grad():
        assert torch.equal(loaded(test), result.model(test))


def test_impossible_target_writes_nothing(tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(ConfigError, match="cannot be met with any layer in int8"):
        quantize_checkpoint(
            SAMPLES / "encoder.safetensors", QuantConfig(kernel="fbgemm"), QuantizeOptions(
                output=out, model="sample_models.encoder:build", calib=SAMPLES / "digits_calib.safetensors",
                min_sqnr=300.0,
            ),
        )
    assert list(tmp_path.iterdir()) == []


def test_min_sqnr_needs_data(tmp_path):
    with pytest.raises(ConfigError, match="`min_sqnr` measures the model on data"):
        quantize_checkpoint(SAMPLES / "digits_mlp.pt", None, QuantizeOptions(output=tmp_path / "x.safetensors", min_sqnr=30.0))
