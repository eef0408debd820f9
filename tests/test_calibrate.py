"""Calibration, static int8 and SmoothQuant."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from conftest import SAMPLES, load_digits_mlp, load_encoder
from qlin_cli import QuantConfig, load_quantized, quantize_model, read_qfile, save_quantized
from qlin_cli.calibrate import SAMPLE_ROWS, calibrate, input_hooks, smooth_factors
from qlin_cli.errors import ConfigError, InputError
from qlin_cli.plan import make_plan
from qlin_cli.primitives import sqnr_db


@pytest.fixture(scope="module")
def calib():
    return load_file(SAMPLES / "digits_calib.safetensors")["inputs"]


def test_static_needs_calibration_data():
    with pytest.raises(ConfigError, match="static mode needs calibration data: pass `calib`"):
        quantize_model(load_digits_mlp(), QuantConfig(kernel="fbgemm", mode="static"))
    with pytest.raises(ConfigError, match="SmoothQuant"):
        quantize_model(load_digits_mlp(), QuantConfig(kernel="fbgemm", smooth=0.5))


def test_hooks_are_removed_even_when_the_forward_fails():
    model = load_digits_mlp()
    layers = {"0": model[0], "2": model[2]}
    with pytest.raises(RuntimeError):
        with input_hooks(layers, lambda name, x: None):
            model(torch.randn(2, 3))  # wrong input size
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    with pytest.raises(InputError, match="do not fit the model during calibration"):
        planned = make_plan(model, QuantConfig(kernel="fbgemm", mode="static", skip=["^4$"])).quantized
        assert [e.name for e in planned] == list(layers)
        calibrate(model, planned, torch.randn(8, 3))
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_static_file_round_trip_is_bit_identical(tmp_path, calib, digits_test, device):
    config = QuantConfig(kernel="fbgemm", mode="static", smooth=0.5, observer="percentile")
    model = load_encoder()
    result = quantize_model(model, config, calib=calib, device=device)
    path = save_quantized(result, tmp_path / "s.safetensors")
    t = load_file(path)
    assert t["blocks.0.fc1.input_scale"].shape == () and t["blocks.0.fc1.input_scale"].dtype == torch.float32
    assert t["blocks.0.fc1.input_zero_point"].shape == () and t["blocks.0.fc1.input_zero_point"].dtype == torch.int8
    assert t["blocks.0.fc1.smooth_scale"].shape == (128,)
    plan = {e["name"]: e for e in read_qfile(path).plan.to_list()}
    assert plan["head"]["observer"] == "percentile" and plan["head"]["smooth"] == 0.5
    loaded = load_quantized(load_encoder(), path, device=device)
    x = digits_test[0][:64].to(device)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_static_layers_report_ranges_and_output_sqnr(calib):
    result = quantize_model(load_digits_mlp(), QuantConfig(mode="static", kernel="fbgemm"), calib=calib)
    first = result.layers[0]
    lo, hi = first.input_range
    assert lo == float(calib.min()) and hi == float(calib.max())  # minmax on the model's inputs
    assert first.input_scale == pytest.approx((hi - min(lo, 0)) / 255)
    assert all(r.output_sqnr_db > 35 for r in result.layers)
    assert all(r.batch_invariant for r in result.layers)


@pytest.mark.parametrize("kernel", ["int_mm", "fbgemm", "pertoken"])
def test_static_mode_is_batch_invariant(kernel, calib, digits_test):
    model = load_encoder()
    result = quantize_model(model, QuantConfig(mode="static", kernel=kernel), calib=calib)
    if result.layers[0].kernel != kernel:
        pytest.skip(result.layers[0].kernel_reason)
    x = digits_test[0][:40]
    q = model.blocks[0].fc1
    rows = torch.randn(300, 128)
    for batch in (1, 7, 32, 300):
        others = rows[:batch] * 1000
        full = torch.cat([others, rows[:1]])
        assert torch.equal(q(full)[-1:], q(rows[:1]))
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    float_model = load_encoder()
    with torch.no_grad():
        float_diff = (float_model(x) - torch.cat([float_model(x[i : i + 1]) for i in range(len(x))])).abs().max()
    assert (batched - alone).abs().max() <= float_diff


def test_calibration_memory_is_bounded(calib):
    model = load_digits_mlp()
    big = calib.repeat(8, 1)  # 2048 samples
    planned = make_plan(model, QuantConfig(kernel="fbgemm", mode="static", observer="mse", skip=["^[24]$"])).quantized
    (stats,) = calibrate(model, planned, big, batch_size=64)
    assert stats.sample.shape[0] <= SAMPLE_ROWS and stats.input_qparams is not None


def test_smooth_factors_formula_and_guards():
    act = torch.tensor([4.0, 0.0, 1.0])
    w = torch.tensor([[1.0, 2.0, 0.0], [-0.25, 1.0, 0.0]])
    s = smooth_factors(act, w, 0.5)
    assert s.tolist() == [2.0, 1.0, 1.0]  # sqrt(4)/sqrt(1); dead input -> 1; zero column -> 1


def _outlier_model_and_data():
    """A trained-looking MLP whose inputs have a few channels 50-100x larger than the rest."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
            m.bias.zero_()
    gains = torch.ones(64)
    gains[[3, 17, 40, 51]] = torch.tensor([50.0, 80.0, 100.0, 60.0])
    calib = torch.randn(512, 64, generator=g) * gains
    test = torch.randn(256, 64, generator=g) * gains
    with torch.no_grad():  # keep the function sane: the outlier channels meet small weights
        model[0].weight[:, [3, 17, 40, 51]] /= gains[[3, 17, 40, 51]]
    return model.eval(), calib, test


def test_smoothquant_clearly_improves_static_int8_on_activation_outliers():
    model, calib, test = _outlier_model_and_data()
    with torch.no_grad():
        ref = model(test)
    scores = {}
    for smooth in (None, 0.5):
        m = _outlier_model_and_data()[0]
        quantize_model(m, QuantConfig(kernel="fbgemm", mode="static", smooth=smooth), calib=calib)
        with torch.no_grad():
            scores[smooth] = sqnr_db(ref, m(test))
    assert scores[0.5] > scores[None] + 6.0, scores
