"""B-bit and group-wise weights: the scheme, the math, the packed file (format
version 2, version 1 still loading), the kernels against the dequantized float reference, recipe
rules that mix widths, the accuracy fallback that widens before it gives up int8, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from qlin_cli import QuantConfig, load_quantized, quantize_model, save_quantized
from qlin_cli.errors import ConfigError
from qlin_cli.kernels import KernelChoice, LayerTensors, native, pack, select_kernel
from qlin_cli.kernels.int4pack import int4pack_missing
from qlin_cli.primitives import choose_qparams, dequantize, half_scales, qrange, quantize, sqnr_db
from qlin_cli.qfile import pack_bits, read_qfile, unpack_bits
from qlin_cli.quantize import LayerResult
from qlin_cli.scheme import PER_CHANNEL, PER_TENSOR, LayerScheme, PerGroup

from conftest import cli

DATA = Path(__file__).parent / "data"
SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
DIGITS_PT = SAMPLES / "digits_mlp.pt"


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 96), nn.GELU(), nn.Linear(96, 32)).eval()


# -- scheme and shapes ----------------------------------------------------------------------------


def test_scale_shapes_per_tensor_channel_and_group_of_a_1024x512_weight():
    shape = (1024, 512)
    assert PER_TENSOR.scale_shape(shape) == ()
    assert PER_CHANNEL.scale_shape(shape) == (1024,)
    assert PerGroup(128).scale_shape(shape) == (1024, 4)
    assert PerGroup(100).scale_shape(shape) == (1024, 6)  # 5 groups of 100, a last one of 12
    layer = quantize_model(nn.Linear(512, 1024), QuantConfig(bits=4, group_size=128)).model
    assert tuple(layer.weight_scale.shape) == (1024, 4) and tuple(layer.weight_zero_point.shape) == (1024, 4)
    assert layer.weight.dtype == torch.int8 and tuple(layer.weight.shape) == (1024, 512)


def test_group_size_selects_weight_only_and_explicit_modes_are_refused():
    assert LayerScheme(group_size=64).mode == "weight-only"
    assert QuantConfig(bits=4, group_size=32).mode == "weight-only"
    assert QuantConfig(mode="dynamic").with_changes(group_size=32).mode == "weight-only"
    assert LayerScheme(mode="dynamic", group_size=32).mode == "dynamic"  # W4A8: tests/test_lowbit_dynamic.py
    with pytest.raises(ConfigError, match="run weight-only or dynamic .* not static"):
        LayerScheme(mode="static", group_size=32)
    assert LayerScheme(bits=4, mode="static").bits == 4  # per-channel B-bit runs in every mode


@pytest.mark.parametrize("keys, message", [
    ({"bits": 1}, "bits = 1 is not valid: use a whole number from 2 to 8"),
    ({"bits": 9}, "bits = 9 is not valid"),
    ({"bits": 4.0}, "bits = 4.0 is not valid"),
    ({"group_size": 0}, "group_size = 0 is not valid"),
    ({"group_size": -8}, "group_size = -8 is not valid"),
    ({"group_size": True}, "group_size = True is not valid"),
    ({"group_size": 32, "granularity": "tensor"}, "drop `granularity` 'tensor'"),
    ({"group_size": 32, "kernel": "weight_only"}, "grouped weights take kernel 'auto', 'lowbit' or 'int4pack'"),
    ({"bits": 4, "group_size": 48, "kernel": "int4pack"}, "'int4pack' .* takes `bits` 4 with `group_size` 32, 64, 128 or 256"),
    ({"kernel": "lowbit"}, "kernel 'lowbit' needs `mode` weight-only"),
])
def test_bad_bits_and_groups_are_one_line_config_errors(keys, message):
    with pytest.raises(ConfigError, match=message):
        LayerScheme(**keys)


def test_recipe_round_trip_with_bits_and_groups():
    c = QuantConfig(bits=4, group_size=64, symmetric=False,
                    layers=[{"match": r"^2$", "bits": 8, "granularity": "channel"}, {"match": r"^4$", "group_size": 32}])
    assert QuantConfig.from_dict(json.loads(c.to_json())) == c
    assert c.for_layer("0").granularity == PerGroup(64) and c.for_layer("0").bits == 4
    two = c.for_layer("2")
    assert two.granularity == PER_CHANNEL and two.group_size is None and two.bits == 8 and two.mode == "weight-only"
    assert c.for_layer("4").group_size == 32 and c.for_layer("4").bits == 4


# -- the math -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_ranges_and_last_short_group(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(6, 100) * torch.linspace(0.1, 3, 100)  # K = 100, G = 32: groups 32, 32, 32, 4
    g = PerGroup(32)
    scale, zp = choose_qparams(w, g, symmetric, bits)
    assert scale.shape == (6, 4) and zp.shape == (6, 4)
    q = quantize(w, scale, zp, symmetric, bits, 32)
    qmin, qmax = qrange(bits, symmetric)
    assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax
    # group scales are float16 values (`half_scales`)
    assert scale.dtype == torch.float32 and torch.equal(scale.half().float(), scale)
    if symmetric:  # s = amax / (2^(B-1) - 1) per group rounded up to a float16, the last group over its own 4 channels
        for s, exact in ((scale[:, 3], w[:, 96:].abs().amax(1) / qmax), (scale[:, 0], w[:, :32].abs().amax(1) / qmax)):
            assert bool((s >= exact).all()) and bool((s <= exact * (1 + 2.0**-10)).all())
            assert torch.equal(s, half_scales(exact))
        assert bool((zp == 0).all())
    deq = dequantize(q, scale, zp, 32)
    # round to nearest: every error within half a step of its group
    step = scale.repeat_interleave(32, dim=1)[:, :100]
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 3, 8, 33, 100])
def test_pack_bits_round_trip_is_exact(bits, k):
    torch.manual_seed(k)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, k), dtype=torch.int8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, -(-k * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, k), q)


def test_pack_bits_layout_is_the_documented_one():
    q = torch.tensor([[-8, 7, 0, -1, 3]], dtype=torch.int8)  # offset binary: 0, 15, 8, 7, 11
    assert pack_bits(q, 4).tolist() == [[0 | 15 << 4, 8 | 7 << 4, 11]]
    q2 = torch.tensor([[-2, -1, 0, 1, 1]], dtype=torch.int8)  # 0, 1, 2, 3 | 3
    assert pack_bits(q2, 2).tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6, 3]]
    q3 = torch.tensor([[3, -4, 1]], dtype=torch.int8)  # 7, 0, 5: bits 111 000 101 -> byte0 = 0b01000111, byte1 = 0b1
    assert pack_bits(q3, 3).tolist() == [[0b01000111, 0b1]]


# -- the file -------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [
    dict(bits=4, group_size=32), dict(bits=4, group_size=64, symmetric=False), dict(bits=3, group_size=48),
    dict(bits=2, group_size=96), dict(bits=8, group_size=96), dict(bits=4), dict(bits=6, granularity="tensor"),
    dict(bits=5, mode="dynamic", symmetric=False),
])
def test_file_round_trip_is_bit_exact_and_sized_by_bits(tmp_path, keys):
    x = torch.randn(5, 256)
    if LayerScheme(**keys).mode == "dynamic":  # a kernel named: `auto` keeps dynamic layers this small float
        keys = {**keys, "kernel": "int_mm"}
    res = quantize_model(mlp(), QuantConfig(**keys))
    y = res.model(x)
    path = save_quantized(res, tmp_path / "q.safetensors")
    loaded = load_quantized(mlp(1), path)
    assert torch.equal(loaded(x), y)
    for (k, a), (k2, b) in zip(res.model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    bits = keys.get("bits", 8)
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["plan"])[0]["bits"] == bits
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored["0.weight"] == ("U8" if bits < 8 else "I8")
    # the file follows the bits: within 5% of weights x B / 8 + scales + zero points + the rest
    weights = sum(r.plan.out_features * r.plan.in_features for r in res.layers)
    rest = sum(t.numel() * t.element_size() for k, t in res.model.state_dict().items() if not k.endswith(".weight"))
    assert path.stat().st_size <= 1.05 * (weights * bits / 8 + rest) + 4096  # + the JSON header


def test_version_1_files_still_load_bit_identically():
    for name, config, calib in [
        ("digits_mlp.v1.dynamic.safetensors", QuantConfig(), None),
        ("digits_mlp.v1.static.safetensors", QuantConfig(mode="static", symmetric=False, granularity="tensor"),
         SAMPLES / "digits_calib.safetensors"),
    ]:
        qf = read_qfile(DATA / name)
        assert qf.metadata["format_version"] == "1"
        assert all(e.scheme.bits == 8 and e.scheme.group_size is None for e in qf.plan.quantized)
        from qlin_cli.sources import load_source, load_tensors

        loaded = load_quantized(load_source(DIGITS_PT).model, DATA / name)
        data = None if calib is None else load_tensors(calib, "calibration data")
        # the file's own plan: an earlier qlin marked `auto` layers this small quantized (this one keeps
        # them float), and such a file must load and compute what its plan says, int8
        fresh = quantize_model(load_source(DIGITS_PT).model, config, calib=data, plan=qf.plan).model
        for (k, a), (k2, b) in zip(fresh.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b), (name, k)
        x = torch.randn(4, 64)
        assert torch.equal(loaded(x), fresh(x))


def test_damaged_packed_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    res = quantize_model(nn.Sequential(nn.Linear(33, 16)), QuantConfig(bits=3, group_size=8))
    path = save_quantized(res, tmp_path / "q.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["0.weight"] = tensors["0.weight"][:, :-1].contiguous()
    save_file(tensors, tmp_path / "short.safetensors", metadata=meta)
    with pytest.raises(Exception, match=r"0.weight is torch.uint8 \(16, 12\), the plan says torch.uint8 \(16, 13\)"):
        read_qfile(tmp_path / "short.safetensors")
    tensors = load_file(path)
    tensors["0.weight"][:, -1] |= 0x80  # 33 * 3 = 99 bits: bit 99 of each row is past the end
    save_file(tensors, tmp_path / "tail.safetensors", metadata=meta)
    with pytest.raises(Exception, match="bits set past the end of its rows"):
        read_qfile(tmp_path / "tail.safetensors")


# -- kernels --------------------------------------------------------------------------------------

# the least SQNR (dB) of a kernel's output against the float layer built from the dequantized
# weight: weight-only kernels compute that float layer (to float rounding), activation-quantizing
# ones add int8 activation error
KERNEL_BOUND = {"lowbit": 90, "int4pack": 60, "dequant": 90, "weight_only": 60, "fbgemm": 30, "onednn": 30, "int_mm": 30}


@pytest.mark.parametrize("bits, group, kernel", [
    (4, 32, "auto"), (4, 128, "auto"), (4, 40, "auto"), (3, 32, "auto"), (8, 64, "auto"), (2, None, "auto"),
    (4, None, "auto"), (4, 32, "int4pack"), (4, 64, "dequant"), (4, None, "weight_only"), (5, 16, "lowbit"),
])
@pytest.mark.parametrize("symmetric", [True, False])
def test_kernels_match_the_dequantized_float_layer(bits, group, kernel, symmetric):
    torch.manual_seed(bits)
    n, k = 48, 160
    w = torch.randn(n, k)
    g = PerGroup(group) if group else PER_CHANNEL
    scale, zp = choose_qparams(w, g, symmetric, bits)
    q = quantize(w, scale, zp, symmetric, bits, group)
    bias = torch.randn(n)
    reference = nn.Linear(k, n)
    with torch.no_grad():
        reference.weight.copy_(dequantize(q, scale, zp, group))
        reference.bias.copy_(bias)
    scheme = LayerScheme(mode="weight-only", bits=bits, group_size=group, symmetric=symmetric,
                         kernel="auto" if kernel in ("auto", "dequant") else kernel)
    if kernel == "dequant":
        choice = KernelChoice("dequant", "test", False, False)
    else:
        choice = select_kernel(scheme, device="cpu", dtype=torch.float32, in_features=k, out_features=n)
        if kernel != "auto":  # lowbit falls back, reported, where the fused kernels are not built
            assert choice.name == kernel or (kernel == "lowbit" and native.unavailable_reason()), choice
    run = pack(choice, LayerTensors(q, scale, zp, bias), scheme, device="cpu")
    x = torch.randn(7, k)
    assert sqnr_db(reference(x), run(x)) > KERNEL_BOUND[choice.name], choice
    if choice.batch_invariant:
        assert torch.equal(run(x[2:3]), run(x)[2:3])


def test_int4pack_rules_checked_for_both_devices():
    assert int4pack_missing("cpu", torch.float32, 64, 256, 4, 64) is None
    assert "divisible by 16" in int4pack_missing("cpu", torch.float32, 40, 256, 4, 64)
    assert "divisible by the group size" in int4pack_missing("cpu", torch.float32, 64, 200, 4, 64)
    assert "groups of 32, 64, 128, 256, not 16" in int4pack_missing("cpu", torch.float32, 64, 256, 4, 16)
    assert "4-bit weights in groups" in int4pack_missing("cpu", torch.float32, 64, 256, 8, 64)
    assert int4pack_missing("cuda", torch.bfloat16, 64, 256, 4, 64) is None
    assert "bfloat16 activations, not float32" in int4pack_missing("cuda", torch.float32, 64, 256, 4, 64)
    assert "out_features % 8" in int4pack_missing("cuda", torch.bfloat16, 36, 256, 4, 64)
    # a layer the int4 kernel cannot take falls back, reported, on both devices
    scheme = LayerScheme(bits=4, group_size=64, kernel="int4pack")
    choice = select_kernel(scheme, device="cpu", dtype=torch.float32, in_features=200, out_features=64)
    assert choice.fallback and "divisible by the group size" in choice.reason and choice.name in ("lowbit", "dequant")
    cuda = select_kernel(scheme, device="cuda", dtype=torch.bfloat16, in_features=256, out_features=64)
    assert cuda.name == "int4pack"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int4pack_on_cuda():
    res = quantize_model(mlp().cuda().to(torch.bfloat16), QuantConfig(bits=4, group_size=32), device="cuda")
    assert all(r.kernel == "int4pack" for r in res.layers)


# -- recipes, fallback, reports, CLI -------------------------------------------------------------


def test_recipe_rules_mix_widths_and_group_sizes_in_one_model(tmp_path):
    config = QuantConfig(bits=4, group_size=64, layers=[
        {"match": r"^2$", "bits": 8, "granularity": "channel", "mode": "dynamic", "kernel": "int_mm"},
        {"match": r"^4$", "bits": 2, "group_size": 32},
    ])
    res = quantize_model(mlp(), config)
    by = {r.name: r for r in res.layers}
    assert (by["0"].plan.scheme.bits, by["0"].plan.scheme.group_size) == (4, 64)
    assert (by["2"].plan.scheme.bits, by["2"].plan.scheme.mode) == (8, "dynamic")
    assert (by["4"].plan.scheme.bits, by["4"].plan.scheme.group_size) == (2, 32)
    path = save_quantized(res, tmp_path / "mixed.safetensors")
    qf = read_qfile(path)
    assert [(e.scheme.bits, e.scheme.group_size) for e in qf.plan.quantized] == [(4, 64), (8, None), (2, 32)]
    assert by["0"].weight_sqnr_db > by["4"].weight_sqnr_db + 6  # 4 bits is ~12 dB above 2 bits
    x = torch.randn(3, 256)
    assert torch.equal(load_quantized(mlp(1), path)(x), res.model(x))


def test_min_sqnr_widens_low_bit_layers_to_8_bits_before_float():
    from qlin_cli.fallback import quantize_to_target

    torch.manual_seed(3)
    data = torch.randn(64, 256)
    model = mlp()
    reference = mlp()(data)
    res = quantize_to_target(model, QuantConfig(bits=2, group_size=32), min_sqnr_db=25.0, eval_inputs=data)
    steps = res.fallback.steps
    assert steps and steps[0].to == "8-bit" and steps[0].from_bits == 2
    assert res.fallback.final_sqnr_db >= 25.0
    widened = [s.layer for s in steps if s.to == "8-bit"]
    for r in res.layers:
        if r.name in widened:
            assert r.plan.scheme.bits == 8 and r.plan.scheme.group_size is None and r.status == "quantized"
    assert sqnr_db(reference, res.model(data)) >= 25.0


def test_layer_result_bytes_follow_the_bits():
    res = quantize_model(nn.Sequential(nn.Linear(256, 128, bias=False)), QuantConfig(bits=4, group_size=128))
    r: LayerResult = res.layers[0]
    assert r.bytes_int8 == 128 * 128 + 128 * 2 * 4 + 128 * 2  # packed weights + scales + zero points


def test_cli_quantize_and_inspect_show_groups(tmp_path, capsys):
    out = tmp_path / "q4.safetensors"
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", out, "--bits", "4", "--group-size", "32", "--json")
    assert code == 0, stderr
    r = json.loads(stdout)
    assert r["config"]["mode"] == "weight-only" and r["config"]["group_size"] == 32 and r["config"]["bits"] == 4
    assert "note: --group-size selected weight-only mode" in stderr
    assert [l["scale_shape"] for l in r["layers"]] == [[256, 2], [256, 8], [10, 8]]
    code, stdout, stderr = cli(capsys, "inspect", out, "--json")
    assert code == 0, stderr
    layers = json.loads(stdout)["layers"]
    assert layers[1]["scale_shape"] == [256, 8] and layers[1]["weight_dtype"] == "int4 (packed in uint8)"
    assert layers[1]["bits"] == 4 and layers[1]["group_size"] == 32
    code, stdout, stderr = cli(capsys, "inspect", DIGITS_PT, "--group-size", "128", "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)["layers"]
    assert [l["scale_shape_per_group"] for l in rows] == [[256, 1], [256, 2], [10, 2]]
    assert [l["scale_shape_per_channel"] for l in rows] == [[256], [256], [10]]


@pytest.mark.parametrize("args, message", [
    (["--bits", "1"], "bits = 1 is not valid"),
    (["--bits", "9"], "bits = 9 is not valid"),
    (["--group-size", "0"], "group_size = 0 is not valid"),
    (["--group-size", "-4"], "group_size = -4 is not valid"),
    (["--group-size", "512"], "layer '0' has 64 input channels, fewer than --group-size 512"),
    (["--mode", "static", "--group-size", "32"], "drop --mode static or --group-size"),
    (["--bits", "4", "--group-size", "48", "--kernel", "int4pack"], "takes --bits 4 with --group-size 32, 64, 128 or 256"),
])
def test_cli_bad_bits_and_groups_are_one_line_errors(tmp_path, capsys, args, message):
    out = tmp_path / "x.safetensors"
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", out, *args)
    assert code == 1, (code, stderr)
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("note: ")]
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr and not out.exists()
