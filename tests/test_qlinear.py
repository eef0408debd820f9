"""QuantizedLinear on its own: buffers per scheme, the state dict as the file stores it,
from_float against float references, packing, shapes and dtypes."""

import pytest
import torch
import torch.nn as nn

from qlin_cli import QuantConfig, quantize_model, read_qfile, save_quantized
from qlin_cli.primitives import dequantize, quantize_activations, sqnr_db
from qlin_cli.qlinear import QuantizedLinear, pack_all
from qlin_cli.scheme import PER_CHANNEL, PER_TENSOR, LayerScheme

IN, OUT = 512, 256  # 2**17 weights: `auto` runs an int8 kernel on CPU (smaller layers keep a float matmul)
STATIC_QPARAMS = (torch.tensor(0.05), torch.tensor(3, dtype=torch.int8))


def linear(in_features=IN, out_features=OUT, bias=True, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def smooth_scale(in_features=IN, seed=1) -> torch.Tensor:
    return torch.rand(in_features, generator=torch.Generator().manual_seed(seed)) + 0.5


def build(lin: nn.Linear, scheme: LayerScheme) -> QuantizedLinear:
    """from_float with whatever calibration the scheme needs (fixed, not measured)."""
    return QuantizedLinear.from_float(
        lin, scheme, input_qparams=STATIC_QPARAMS if scheme.static else None,
        smooth_scale=smooth_scale(lin.in_features) if scheme.smooth is not None else None,
    )


def inputs(*shape, seed=2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def dequantized_weight(q: QuantizedLinear) -> torch.Tensor:
    """The float weight the int8 layer stands for (smooth factors folded back out)."""
    w = dequantize(q.weight, q.weight_scale, q.weight_zero_point)
    return w if q.smooth_scale is None else w / q.smooth_scale


SCHEMES = {
    "dynamic-channel": LayerScheme(),
    "dynamic-tensor": LayerScheme(granularity="tensor"),
    "dynamic-asym": LayerScheme(symmetric=False),
    "dynamic-act-tensor": LayerScheme(act_granularity="tensor"),
    "weight-only": LayerScheme(mode="weight-only"),
    "static": LayerScheme(mode="static"),
    "static-tensor-asym": LayerScheme(mode="static", granularity="tensor", symmetric=False),
    "smooth": LayerScheme(smooth=0.5),
    "static-smooth": LayerScheme(mode="static", smooth=0.5),
}


# -- buffers and the state dict ------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("bias", [True, False])
def test_buffers_per_scheme(name, bias):
    s = SCHEMES[name]
    q = QuantizedLinear(48, 32, s, bias=bias)
    sshape = (32,) if s.granularity == PER_CHANNEL else ()
    want = {
        "weight": (torch.int8, (32, 48)),
        "weight_scale": (torch.float32, sshape),
        "weight_zero_point": (torch.int8, sshape),
    }
    if bias:
        want["bias"] = (torch.float32, (32,))
    if s.static:
        want["input_scale"] = (torch.float32, ())
        want["input_zero_point"] = (torch.int8, ())
    if s.smooth is not None:
        want["smooth_scale"] = (torch.float32, (48,))
    sd = q.state_dict()
    assert set(sd) == set(want)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == want
    assert list(q.parameters()) == []  # nothing trainable: buffers only
    for absent in {"bias", "input_scale", "input_zero_point", "smooth_scale"} - set(want):
        assert getattr(q, absent) is None


def test_bias_keeps_the_float_dtype():
    q = QuantizedLinear(16, 8, LayerScheme(), bias=True, dtype=torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16 and q.weight_scale.dtype == torch.float32
    assert q.weight.dtype == torch.int8


def test_from_float_buffers_hold_the_quantized_weight():
    lin = linear()
    q = QuantizedLinear.from_float(lin, LayerScheme())
    assert q.weight.dtype == torch.int8 and q.weight.shape == (OUT, IN)
    assert int(q.weight.min()) >= -127  # symmetric: -128 is never used
    assert q.weight.abs().amax(dim=1).eq(127).all()  # symmetric minmax: each row reaches +-127
    assert not q.weight_zero_point.any()
    torch.testing.assert_close(q.weight_scale, lin.weight.detach().abs().amax(dim=1) / 127)
    assert torch.equal(q.bias, lin.bias.detach())
    assert sqnr_db(lin.weight, dequantized_weight(q)) > 38

    qa = QuantizedLinear.from_float(lin, LayerScheme(symmetric=False, granularity="tensor"))
    assert qa.weight_scale.shape == () and qa.weight_zero_point.shape == ()
    assert int(qa.weight.min()) == -128 and int(qa.weight.max()) == 127
    assert sqnr_db(lin.weight, dequantized_weight(qa)) > 30


@pytest.mark.parametrize("name", ["static-smooth", "dynamic-tensor", "weight-only"])
def test_state_dict_is_exactly_the_files_tensors(name, tmp_path):
    s = SCHEMES[name]
    model = nn.Sequential(linear(64, 32))
    calib = inputs(40, 64)
    if s.mode != "weight-only":  # a kernel named: `auto` keeps a layer this small float
        s = s.with_changes(kernel="int_mm")
    result = quantize_model(model, QuantConfig(s), calib=calib)
    q = model[0]
    assert isinstance(q, QuantizedLinear)
    path = save_quantized(result, tmp_path / "m.safetensors")
    tensors = read_qfile(path).tensors
    sd = q.state_dict()
    assert set(tensors) == {f"0.{k}" for k in sd}
    for k, v in sd.items():
        assert tensors[f"0.{k}"].dtype == v.dtype and torch.equal(tensors[f"0.{k}"], v), k


# -- from_float against float references ---------------------------------------------------------


@pytest.mark.parametrize("kernel", ["auto", "int_mm", "fbgemm"])
def test_dynamic_per_token_matches_its_float_reference(kernel, device):
    lin = linear()
    q = QuantizedLinear.from_float(lin, LayerScheme(kernel=kernel)).pack(device)
    x = inputs(64, IN)
    y = q(x.to(device)).cpu()
    w = dequantized_weight(q).cpu()
    assert sqnr_db(x @ w.T + lin.bias, y) > 35  # only the activations' rounding is left
    assert sqnr_db(lin(x), y) > 35
    # and exactly what per-token int8 activations give, up to float rounding
    qx, a, c = quantize_activations(x, per_token=True)
    assert sqnr_db((a * qx.float() + c) @ w.T + lin.bias, y) > 100


@pytest.mark.parametrize("kernel", ["auto", "int_mm"])
def test_static_matches_its_float_reference(kernel, device):
    lin = linear()
    q = build(lin, LayerScheme(mode="static", kernel=kernel)).pack(device)
    assert torch.equal(q.input_scale, STATIC_QPARAMS[0]) and int(q.input_zero_point) == 3
    x = inputs(64, IN)
    y = q(x.to(device)).cpu()
    w = dequantized_weight(q).cpu()
    xq = (torch.round(x / 0.05) + 3).clamp(-128, 127).sub(3).mul(0.05)  # the calibrated int8 grid
    assert sqnr_db(xq @ w.T + lin.bias, y) > 100
    assert sqnr_db(lin(x), y) > 30


def test_smooth_matches_its_float_reference(device):
    lin = linear()
    q = build(lin, LayerScheme(smooth=0.5, kernel="int_mm")).pack(device)
    assert torch.equal(q.smooth_scale.cpu(), smooth_scale())
    x = inputs(64, IN)
    y = q(x.to(device)).cpu()
    w = dequantized_weight(q).cpu()  # the smoothed int8 weight, factors divided back out
    assert sqnr_db(lin.weight, w) > 35
    assert sqnr_db(x @ w.T + lin.bias, y) > 35


def test_weight_only_is_float_math_on_the_int8_weight(device):
    lin = linear()
    q = QuantizedLinear.from_float(lin, LayerScheme(mode="weight-only")).pack(device)
    x = inputs(64, IN)
    y = q(x.to(device)).cpu()
    assert sqnr_db(x @ dequantized_weight(q).cpu().T + lin.bias, y) > 100
    assert sqnr_db(lin(x), y) > 40


# -- packing and running -------------------------------------------------------------------------


def test_forward_before_pack_raises():
    q = QuantizedLinear.from_float(linear(), LayerScheme())
    with pytest.raises(RuntimeError, match=r"QuantizedLinear used before pack\(\); call quantize_model or load_quantized"):
        q(inputs(2, IN))
    with pytest.raises(RuntimeError, match="before pack"):
        QuantizedLinear(8, 4, LayerScheme(), bias=False)(torch.randn(1, 8))


@pytest.mark.parametrize("name", SCHEMES)
def test_nd_inputs_give_nd_outputs_row_for_row(name):
    s = SCHEMES[name].with_changes(kernel="int_mm") if SCHEMES[name].mode != "weight-only" else SCHEMES[name]
    q = build(linear(), s).pack()
    x = inputs(3, 5, IN)
    y = q(x)
    assert y.shape == (3, 5, OUT) and y.dtype == torch.float32
    flat = q(x.reshape(15, IN))
    if s.act_granularity == PER_TENSOR and s.mode == "dynamic":
        torch.testing.assert_close(y.reshape(15, OUT), flat)  # the same call on the same rows
    else:
        assert torch.equal(y.reshape(15, OUT), flat)
    assert q(inputs(7, IN)).shape == (7, OUT)
    assert q(inputs(2, 1, 4, IN)).shape == (2, 1, 4, OUT)


def test_nd_inputs_on_the_float_fallback_kernel(monkeypatch):
    import qlin_cli.qlinear
    from qlin_cli.kernels import KernelChoice

    # weight-only mode's fallback where _weight_int8pack_mm cannot run (it can here)
    monkeypatch.setattr(qlin_cli.qlinear, "select_kernel", lambda *a, **k: KernelChoice("dequant", "fallback: test", False, True))
    q = QuantizedLinear.from_float(linear(32, 16), LayerScheme(mode="weight-only")).pack()
    assert q.kernel.name == "dequant"
    x = inputs(4, 6, 32)
    y = q(x)
    assert y.shape == (4, 6, 16)
    torch.testing.assert_close(y.reshape(24, 16), q(x.reshape(24, 32)))


@pytest.mark.parametrize("scheme", [
    LayerScheme(kernel="int_mm"), LayerScheme(), LayerScheme(mode="weight-only"),
    LayerScheme(mode="static"), LayerScheme(kernel="auto", act_granularity="tensor"),
])
def test_output_dtype_follows_bfloat16_input(scheme):
    lin = linear(dtype=torch.bfloat16)
    q = build(lin, scheme).pack()
    assert q.bias.dtype == torch.bfloat16
    x = inputs(2, 3, IN, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, OUT)
    assert sqnr_db(lin(x).float(), y.float()) > 25


def test_from_float_refuses_missing_or_unwanted_calibration():
    lin = linear(16, 8)
    with pytest.raises(ValueError, match="a scheme with smooth needs smooth_scale from calibration"):
        QuantizedLinear.from_float(lin, LayerScheme(smooth=0.5))
    with pytest.raises(ValueError, match="smooth_scale"):
        QuantizedLinear.from_float(lin, LayerScheme(), smooth_scale=torch.ones(16))
    with pytest.raises(ValueError, match="static mode needs input_qparams from calibration"):
        QuantizedLinear.from_float(lin, LayerScheme(mode="static"))
    with pytest.raises(ValueError, match="static mode needs input_qparams"):
        QuantizedLinear.from_float(lin, LayerScheme(mode="static", smooth=0.5), smooth_scale=torch.ones(16))


def test_extra_repr_mentions_mode_and_kernel():
    q = build(linear(), LayerScheme(mode="static", smooth=0.5, kernel="int_mm"))
    assert "kernel=unpacked" in repr(q)
    q.pack()
    text = repr(q)
    assert text.startswith("QuantizedLinear(") and "\n" not in text
    for part in (f"in_features={IN}", f"out_features={OUT}", "mode=static", "granularity=channel",
                 "symmetric=True", "kernel=int_mm", "smoothed"):
        assert part in text, text
    wo = QuantizedLinear.from_float(linear(), LayerScheme(mode="weight-only", granularity="tensor")).pack()
    assert "mode=weight-only" in repr(wo) and "granularity=tensor" in repr(wo)
    assert f"kernel={wo.kernel.name}" in repr(wo) and "smoothed" not in repr(wo)


def test_pack_all_is_bit_exact_with_packing_one_by_one():
    schemes = [LayerScheme(), LayerScheme(kernel="int_mm", symmetric=False), LayerScheme(mode="weight-only"),
               LayerScheme(mode="static"), LayerScheme(smooth=0.5), LayerScheme(granularity="tensor"),
               LayerScheme(act_granularity="tensor")]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the thread pool, not the one-by-one path
    try:
        together = [build(linear(seed=i), s) for i, s in enumerate(schemes)]
        pack_all(together)
    finally:
        torch.set_num_threads(threads)
    alone = [build(linear(seed=i), s).pack() for i, s in enumerate(schemes)]
    x = inputs(33, IN)
    for a, b in zip(together, alone):
        assert a.kernel == b.kernel
        ya, yb = a(x), b(x)
        assert torch.equal(ya, yb), a.kernel


def test_pack_all_of_nothing_and_one():
    pack_all([])
    q = build(linear(), LayerScheme())
    pack_all([q])
    assert q.kernel is not None and q(inputs(2, IN)).shape == (2, OUT)


@pytest.mark.parametrize("kernel", ["auto", "onednn", "fbgemm", "int_mm"])
def test_an_input_that_requires_grad_runs_every_kernel(kernel, monkeypatch):
    """After a float embedding the activations require grad; the int8 layer runs them anyway
    (no autograd through its in-place and out= ops), returns a plain tensor, and warns (once)
    that the gradient stops there."""
    import qlin_cli.qlinear
    from qlin_cli import QuantConfig, quantize_model

    monkeypatch.setattr(qlin_cli.qlinear, "_warned_no_gradient", False)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 512), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    ids = torch.randint(0, 100, (4, 8))
    with torch.no_grad():
        reference = model(ids)
    res = quantize_model(model, QuantConfig(kernel=kernel))
    with pytest.warns(UserWarning, match="QuantizedLinear has no gradient"):
        y = res.model(ids)  # no torch.no_grad() here
    assert not y.requires_grad and y.shape == (4, 8, 512)
    assert float(((reference - y).norm() / reference.norm())) < 0.05


@pytest.mark.parametrize("observer", ["minmax", "absmax", "percentile", "mse", "moving-average"])
@pytest.mark.parametrize("scheme_args", [dict(), dict(symmetric=False, bits=4), dict(mode="weight-only", bits=4, group_size=8),
                                         dict(granularity=PER_TENSOR)], ids=["channel", "asym 4-bit", "group", "tensor"])
def test_from_float_rounds_a_block_of_rows_at_a_time_with_the_same_values(monkeypatch, observer, scheme_args):
    """Rows with scales of their own are rounded in blocks (the float temporaries of a large head
    stay small): every observer gives each row the values, scales and zero points it gets with the
    whole weight at once; one scale per tensor is rounded whole."""
    import qlin_cli.qlinear as qlinear

    torch.manual_seed(0)
    layer = nn.Linear(24, 37)
    layer.weight.data[5] *= 30  # an outlier row
    scheme = LayerScheme(weight_observer=observer, **scheme_args)
    smooth = torch.rand(24) + 0.5 if scheme.mode == "dynamic" else None
    if smooth is not None:
        scheme = LayerScheme(weight_observer=observer, smooth=0.5, **scheme_args)
    whole = QuantizedLinear.from_float(layer, scheme, smooth_scale=smooth)
    monkeypatch.setattr(qlinear, "_ROUNDED_AT_ONCE", 24 * 4)  # blocks of 4 rows (the last one short)
    blocks = QuantizedLinear.from_float(layer, scheme, smooth_scale=smooth)
    for key, t in whole.state_dict().items():
        assert torch.equal(t, blocks.state_dict()[key]), key
