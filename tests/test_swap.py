"""Finding and swapping nn.Linear layers; QuantizedLinear; accuracy on the sample models."""

import pytest
import torch
import torch.nn as nn

from conftest import load_digits_mlp, load_encoder
from qlin_cli import QuantConfig, QuantizedLinear, quantize_model
from qlin_cli.config import PER_CHANNEL
from qlin_cli.errors import InputError
from qlin_cli.primitives import sqnr_db


class ScaledLinear(nn.Linear):
    """A unit-scaling style layer: its forward is not x @ W.T + b."""

    def forward(self, x):
        return super().forward(x) / self.in_features**0.5


class GainLinear(nn.Linear):
    """Output times a learned scalar, plus a constant: still affine."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        return self.gain * nn.functional.linear(x, self.weight) + 0.5


class SquashLinear(nn.Linear):
    """Not affine: tanh of the linear map."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16, bias=False))])
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 4), "b": self.shared})
        self.scaled = ScaledLinear(16, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        x = self.shared(x) + self.scaled(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.blocks[0](x)
        return self.heads["a"](self.heads["b"](x))


def test_swaps_every_plain_linear_and_skips_with_reasons(device):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 5, 16)
    ref = model(x)
    result = quantize_model(model, QuantConfig(), device=device)
    by_name = {r.name: r for r in result.layers}
    assert set(by_name) == {"shared", "blocks.0.0", "blocks.0.2", "heads.a", "scaled", "attn.out_proj"}
    assert by_name["shared"].aliases == ["heads.b"] and by_name["shared"].status == "quantized"
    assert model.shared is model.heads["b"] and isinstance(model.shared, QuantizedLinear)
    assert by_name["scaled"].status == "quantized" and "affine map of ScaledLinear" in by_name["scaled"].reason
    assert isinstance(model.scaled, QuantizedLinear)
    assert "MultiheadAttention" in by_name["attn.out_proj"].reason
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
        result = quantize_model(model)
        out = model(x)
    rec = result.layers[0]
    assert rec.status == "quantized" and f"affine map of {cls.__name__}" in rec.reason and rec.has_bias
    assert sqnr_db(ref, out) > 35  # the subclass's own function is kept
    assert rec.weight_sqnr_db > 35
    loaded = load_quantized(build(), save_quantized(result, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_non_affine_subclass_is_kept_float_with_the_reason():
    model = nn.Sequential(SquashLinear(8, 8), nn.Linear(8, 2))
    result = quantize_model(model)
    assert result.layers[0].status == "skipped" and type(model[0]) is SquashLinear
    assert "not affine (an affine fit gives" in result.layers[0].reason


def test_skip_patterns_keep_layers_float():
    model = load_digits_mlp()
    result = quantize_model(model, QuantConfig(skip=(r"^4$",)))
    assert [r.status for r in result.layers] == ["quantized", "quantized", "skipped"]
    assert result.layers[2].reason == "matches --skip '^4$'" and type(model[4]) is nn.Linear


def test_layer_records_sizes_and_sqnr():
    model = load_digits_mlp()
    result = quantize_model(model, QuantConfig(kernel="fbgemm"))
    first = result.layers[0]
    assert (first.out_features, first.in_features) == (256, 64)
    assert first.bytes_float == 256 * 64 * 4 + 256 * 4
    assert first.bytes_int8 == 256 * 64 + 256 * 4 + 256 + 256 * 4  # weight, scale, zero point, bias
    assert 38 < first.weight_sqnr_db < 60
    assert first.kernel in ("int_mm", "fbgemm") and first.batch_invariant


def test_model_without_linear_is_an_error():
    with pytest.raises(InputError, match="no nn.Linear layer"):
        quantize_model(nn.Sequential(nn.ReLU()))


def test_non_finite_weight_names_the_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(InputError, match=r"layer '1': weight has 1 non-finite"):
        quantize_model(model)


def test_bare_linear_root_is_returned_swapped():
    lin = nn.Linear(8, 4)
    result = quantize_model(lin)
    assert isinstance(result.model, QuantizedLinear) and result.layers[0].name == ""


def test_quantized_linear_shapes_dtypes_and_nd_inputs():
    lin = nn.Linear(512, 1024)
    q = QuantizedLinear.from_float(lin, mode="dynamic", granularity=PER_CHANNEL, symmetric=True,
                                   act_granularity="token").pack("cpu")
    assert q.weight.shape == (1024, 512) and q.weight.dtype == torch.int8
    assert q.weight_scale.shape == (1024,) and q.weight_zero_point.shape == (1024,)
    assert set(q.state_dict()) == {"weight", "weight_scale", "weight_zero_point", "bias"}
    x = torch.randn(2, 3, 512)
    assert q(x).shape == (2, 3, 1024)
    with pytest.raises(RuntimeError, match="before pack"):
        QuantizedLinear.from_float(lin, mode="dynamic", granularity=PER_CHANNEL, symmetric=True,
                                   act_granularity="token")(x)


@pytest.mark.parametrize(
    "config",
    [QuantConfig(), QuantConfig(granularity="tensor"), QuantConfig(kernel="fbgemm"), QuantConfig(mode="weight-only")],
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
        quantize_model(model)
        out = model(inputs)
    assert sqnr_db(ref, out) > 35
    assert torch.nn.functional.cosine_similarity(ref, out).mean() > 0.999


def test_recipe_rules_apply_per_layer(digits_test):
    from safetensors.torch import load_file

    from conftest import SAMPLES

    calib = load_file(SAMPLES / "digits_calib.safetensors")["inputs"]
    config = QuantConfig(mode="static", layers=[{"match": "^4$", "skip": True}, {"match": "^2$", "mode": "dynamic"}])
    result = quantize_model(load_digits_mlp(), config, calib=calib)
    modes = [(r.name, r.status, r.mode) for r in result.layers]
    assert modes == [("0", "quantized", "static"), ("2", "quantized", "dynamic"), ("4", "skipped", None)]
    assert result.layers[2].reason == "recipe rule match='^4$' skips it"
    assert result.layers[1].input_scale is None and result.layers[0].input_scale > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(kernel="fbgemm"), QuantConfig(mode="weight-only")],
                         ids=["dynamic", "fbgemm", "weight-only"])
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
    if config.kernel == "fbgemm":  # fbgemm takes float32 only: a reported fallback
        assert result.layers[0].kernel == "int_mm" and "fallback: fbgemm takes float32" in result.layers[0].kernel_reason
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
    quantize_model(model)
    assert sqnr_db(ref, model(x).detach()) > 35
