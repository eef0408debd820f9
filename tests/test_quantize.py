"""quantize_model: the plan carried out (layers swapped in place, aliases too), each layer's record
(sizes, SQNR, kernel), QuantizedLinear, and accuracy on the sample models. Finding layers and
deciding their fate is tested in test_plan.py."""

import copy

import pytest
import torch
import torch.nn as nn

from conftest import fbgemm_fallback, load_digits_mlp, load_encoder
from plan_models import GainLinear, Net, ScaledLinear, SquashLinear
from qlin_cli import QuantConfig, QuantizedLinear, quantize_model
from qlin_cli.errors import InputError
from qlin_cli.plan import make_plan
from qlin_cli.kernels.common import reduce_range
from qlin_cli.primitives import sqnr_db
from qlin_cli.scheme import PER_CHANNEL, PER_TOKEN, LayerScheme

INT8 = QuantConfig(kernel="fbgemm")  # these models' layers are under the size `auto` quantizes


def test_swaps_every_plain_linear_and_skips_with_reasons(device):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 5, 16)
    ref = model(x)
    plan = make_plan(model, QuantConfig(kernel="fbgemm"))
    result = quantize_model(model, QuantConfig(kernel="fbgemm"), device=device)
    assert result.plan == plan  # one record per plan entry, in order (test_plan.py checks the plan)
    by_name = {r.name: r for r in result.layers}
    assert set(by_name) == {"shared", "blocks.0.0", "blocks.0.2", "heads.a", "scaled", "attn.out_proj"}
    assert by_name["shared"].plan.aliases == ("heads.b",) and by_name["shared"].status == "quantized"
    assert model.shared is model.heads["b"] and isinstance(model.shared, QuantizedLinear)
    assert by_name["scaled"].status == "quantized" and "affine map of ScaledLinear" in by_name["scaled"].plan.reason
    assert isinstance(model.scaled, QuantizedLinear)
    assert by_name["attn.out_proj"].status == "skipped" and "MultiheadAttention" in by_name["attn.out_proj"].plan.reason
    assert type(model.attn.out_proj) is not QuantizedLinear and by_name["attn.out_proj"].kernel is None
    assert {r.name for r in result.quantized} == set(by_name) - {"attn.out_proj"}
    assert all(r.kernel is not None and r.plan.scheme == QuantConfig(kernel="fbgemm").scheme for r in result.quantized)
    assert isinstance(model.blocks[0][2], QuantizedLinear) and model.blocks[0][2].bias is None
    y = model(x.to(device)).cpu()
    assert y.shape == ref.shape and sqnr_db(ref, y) > 30


@pytest.mark.parametrize("cls", [ScaledLinear, GainLinear])
def test_affine_subclasses_are_quantized_as_their_effective_map(cls, tmp_path):
    from qlin_cli import load_quantized, save_quantized

    def build():
        torch.manual_seed(0)
        return nn.Sequential(cls(32, 16, bias=cls is ScaledLinear), nn.ReLU(), nn.Linear(16, 4)).eval()

    model = build()
    x = torch.randn(64, 32)
    with torch.no_grad():
        ref = model(x)
        result = quantize_model(model, INT8)
        out = model(x)
    rec = result.layers[0]
    assert rec.status == "quantized" and f"affine map of {cls.__name__}" in rec.plan.reason and rec.plan.has_bias
    assert isinstance(model[0], QuantizedLinear) and model[0].bias is not None
    assert sqnr_db(ref, out) > 35  # the subclass's own function is kept
    assert rec.weight_sqnr_db > 35
    loaded = load_quantized(build(), save_quantized(result, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_non_affine_subclass_is_left_in_place():
    model = nn.Sequential(SquashLinear(8, 8), nn.Linear(8, 2))
    result = quantize_model(model, INT8)
    assert result.layers[0].status == "skipped" and type(model[0]) is SquashLinear
    assert "not affine (an affine fit gives" in result.layers[0].plan.reason
    assert isinstance(model[1], QuantizedLinear)


def test_skipped_layers_stay_float_modules():
    model = load_digits_mlp()
    result = quantize_model(model, QuantConfig(kernel="fbgemm", skip=(r"^4$",)))
    assert [r.status for r in result.layers] == ["quantized", "quantized", "skipped"]
    assert result.layers[2].plan.reason == "matches --skip '^4$'" and type(model[4]) is nn.Linear
    skipped = result.layers[2]
    assert skipped.kernel is None and skipped.weight_sqnr_db is None
    assert skipped.bytes_int8 == skipped.bytes_float == 10 * 256 * 4 + 10 * 4
    assert [r.name for r in result.quantized] == ["0", "2"]


def test_layer_records_sizes_and_sqnr():
    model = load_digits_mlp()
    result = quantize_model(model, QuantConfig(kernel="fbgemm"))
    first = result.layers[0]
    assert (first.plan.out_features, first.plan.in_features) == (256, 64)
    assert first.bytes_float == 256 * 64 * 4 + 256 * 4
    assert first.bytes_int8 == 256 * 64 + 256 * 4 + 256 + 256 * 4  # weight, scale, zero point, bias
    assert 38 < first.weight_sqnr_db < 60
    assert first.kernel in (fbgemm_fallback(), "fbgemm") and first.batch_invariant


def test_non_finite_weight_names_the_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(InputError, match=r"layer '1': weight has 1 non-finite"):
        quantize_model(model, INT8)


def test_bare_linear_root_is_returned_swapped():
    lin = nn.Linear(8, 4)
    result = quantize_model(lin, INT8)
    assert isinstance(result.model, QuantizedLinear) and result.layers[0].name == ""


def test_quantized_linear_shapes_dtypes_and_nd_inputs():
    lin = nn.Linear(512, 1024)
    scheme = LayerScheme(mode="dynamic", granularity=PER_CHANNEL, symmetric=True, act_granularity=PER_TOKEN)
    q = QuantizedLinear.from_float(lin, scheme).pack("cpu")
    assert q.weight.shape == (1024, 512) and q.weight.dtype == torch.int8
    assert q.weight_scale.shape == (1024,) and q.weight_zero_point.shape == (1024,)
    assert set(q.state_dict()) == {"weight", "weight_scale", "weight_zero_point", "bias"}
    x = torch.randn(2, 3, 512)
    assert q(x).shape == (2, 3, 1024)
    with pytest.raises(RuntimeError, match="before pack"):
        QuantizedLinear.from_float(lin, scheme)(x)


@pytest.mark.parametrize(
    "config",
    [QuantConfig(kernel="onednn"), QuantConfig(kernel="int_mm", granularity="tensor"), QuantConfig(kernel="fbgemm"),
     QuantConfig(mode="weight-only")],
    ids=["dynamic-channel", "dynamic-tensor", "fbgemm", "weight-only"],
)
def test_digits_int8_accuracy_within_one_point_of_float(config, digits_test):
    inputs, labels = digits_test
    model = load_digits_mlp()
    with torch.no_grad():
        acc_float = float((model(inputs).argmax(1) == labels).float().mean())
        quantize_model(model, config)
        acc_int8 = float((model(inputs).argmax(1) == labels).float().mean())
    assert acc_float > 0.95
    assert abs(acc_int8 - acc_float) <= 0.01


def test_encoder_output_sqnr(digits_test):
    inputs, _ = digits_test
    model = load_encoder()
    with torch.no_grad():
        ref = model(inputs)
        quantize_model(model, INT8)
        out = model(inputs)
    assert sqnr_db(ref, out) > 35
    assert torch.nn.functional.cosine_similarity(ref, out).mean() > 0.999


def test_recipe_rules_apply_per_layer(digits_test):
    from safetensors.torch import load_file

    from conftest import SAMPLES

    calib = load_file(SAMPLES / "digits_calib.safetensors")["inputs"]
    config = QuantConfig(kernel="fbgemm", mode="static", layers=[{"match": "^4$", "skip": True}, {"match": "^2$", "mode": "dynamic"}])
    result = quantize_model(load_digits_mlp(), config, calib=calib)
    modes = [(r.name, r.status, r.plan.scheme and r.plan.scheme.mode) for r in result.layers]
    assert modes == [("0", "quantized", "static"), ("2", "quantized", "dynamic"), ("4", "skipped", None)]
    assert result.layers[2].plan.reason == "recipe rule match='^4$' skips it"
    assert result.plan == make_plan(load_digits_mlp(), config)
    assert result.model[0].scheme.static and not result.model[2].scheme.static and type(result.model[4]) is nn.Linear
    assert result.layers[1].input_scale is None and result.layers[0].input_scale > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [QuantConfig(kernel="int_mm"), QuantConfig(kernel="fbgemm"),
                                    QuantConfig(kernel="fbgemm", act_granularity="tensor"), QuantConfig(mode="weight-only")],
                         ids=["int_mm", "fbgemm", "fbgemm-per-tensor", "weight-only"])
def test_half_precision_models_keep_their_dtype(dtype, config, tmp_path):
    from qlin_cli import load_quantized, save_quantized

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 8)).to(dtype).eval()

    model, x = build(), torch.randn(16, 64).to(dtype)
    with torch.no_grad():
        ref = model(x)
        result = quantize_model(model, config)
        out = model(x)
    assert out.dtype == dtype and sqnr_db(ref.float(), out.float()) > 30
    if config.kernel == "fbgemm" and str(config.act_granularity) == "tensor":  # float32 copies of the rows anywhere
        assert result.layers[0].kernel == "fbgemm" and result.layers[0].kernel_reason.startswith("requested")
    elif config.kernel == "fbgemm":  # per token: float32 copies of the rows with VNNI, a reported fallback without
        layer = result.layers[0]
        if reduce_range():
            assert layer.kernel == fbgemm_fallback() and "fallback: full-range uint8" in layer.kernel_reason
        else:
            assert (layer.kernel, layer.kernel_reason) == ("fbgemm", "requested")
    loaded = load_quantized(build(), save_quantized(result, tmp_path / "h.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_transposed_non_contiguous_weight():
    lin = nn.Linear(24, 16)
    with torch.no_grad():
        lin.weight = nn.Parameter(torch.randn(24, 16).t())  # (16, 24) view, not contiguous
    assert not lin.weight.is_contiguous()
    x = torch.randn(5, 24)
    ref = lin(x).detach()
    model = nn.Sequential(lin)
    quantize_model(model, INT8)
    assert sqnr_db(ref, model(x).detach()) > 35


def test_a_reused_plan_quantizes_subclasses_as_their_own_function():
    """A plan holds no module: quantizing with `result.plan` (or a file's plan) measures a
    subclass's affine map again rather than quantizing its raw weight."""
    torch.manual_seed(0)
    first = nn.Sequential(ScaledLinear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    again = copy.deepcopy(first)
    x = torch.randn(16, 256)
    with torch.no_grad():
        ref = first(x)
    r1 = quantize_model(first, QuantConfig(kernel="fbgemm"))
    r2 = quantize_model(again, QuantConfig(kernel="fbgemm"), plan=r1.plan)
    with torch.no_grad():
        assert sqnr_db(ref, r2.model(x)) > 30 and torch.equal(r1.model(x), r2.model(x))
