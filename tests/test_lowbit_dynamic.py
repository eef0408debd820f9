"""Dynamic grouped low-bit layers (W4A8 at 4 bits: per-token int8 activations times B-bit group
weights, an integer dot product per group): the scheme, the kernel's dot panels (exact round
trip), qlin's C++ kernel (`lowbit_dynamic_linear`: every path built here giving the same bits,
the activation codes of the per-token kernels, batch invariance bit for bit) against the torch
reference, the torch path, selection, and whole models through the API and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from conftest import assert_one_error_line, cli, cli_json, float16_panels
from qlin_cli import quantize_model
from qlin_cli.config import QuantConfig
from qlin_cli.errors import ConfigError
from qlin_cli.kernels import lowbit, lowbit_dynamic as ld
from qlin_cli.kernels import native, select_kernel
from qlin_cli.primitives import MIN_SCALE, dequantize, half_scales, sqnr_db
from qlin_cli.scheme import LayerScheme

KERNELS = native.load()
PATH_IDS = lowbit.PATHS  # lowbit_dynamic_linear's `path`, by the names it lists
needs_native = pytest.mark.skipif(
    KERNELS is None or not hasattr(KERNELS, "lowbit_dynamic_linear"),
    reason=f"qlin's fused kernels are not built here: {native.unavailable_reason()}")


def _operands(n, k, group, bits, asym, seed=0):
    """Random B-bit values over the whole range, group scales and zero points, bias."""
    g = torch.Generator().manual_seed(seed)
    ngroups = -(-k // group)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo + (0 if asym else 1), hi + 1, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, ngroups, generator=g) * 0.1 + 1e-3
    zp = (torch.randint(lo, hi + 1, (n, ngroups), generator=g, dtype=torch.int8) if asym
          else torch.zeros(n, ngroups, dtype=torch.int8))
    bias = torch.randn(n, generator=g)
    return q, scale, zp, bias


def _run(x, panels, bias=None, smooth=None, path=0):
    e = torch.empty(0)
    return KERNELS.lowbit_dynamic_linear(x, panels.codes, panels.scale, panels.zq, panels.wsum,
                                         e if bias is None else bias, e if smooth is None else smooth,
                                         panels.n, panels.k, panels.group_size, path)


# the scheme -------------------------------------------------------------------------------------


def test_scheme_takes_dynamic_groups_and_keeps_weight_only_the_default():
    s = LayerScheme(mode="dynamic", bits=4, group_size=32)
    assert (s.mode, s.granularity.name, s.group_size, str(s.act_granularity)) == ("dynamic", "group", 32, "token")
    assert LayerScheme.from_dict(s.to_dict()) == s
    assert LayerScheme(bits=4, group_size=32).mode == "weight-only"
    assert QuantConfig(mode="dynamic").with_changes(group_size=32).mode == "weight-only"
    assert QuantConfig(mode="dynamic").with_changes(mode="dynamic", group_size=32).mode == "dynamic"
    with pytest.raises(ConfigError, match="run weight-only or dynamic .* not static"):
        LayerScheme(mode="static", group_size=32)
    with pytest.raises(ConfigError, match="per token .* drop act_granularity 'tensor'"):
        LayerScheme(mode="dynamic", group_size=32, act_granularity="tensor")
    with pytest.raises(ConfigError, match="kernel 'pertoken' has one weight scale per output channel; grouped "
                                          "dynamic layers take kernel 'auto', 'lowbit_dynamic'"):
        LayerScheme(mode="dynamic", group_size=32, kernel="pertoken")
    with pytest.raises(ConfigError, match="'lowbit_dynamic' runs dynamic layers with per-token"):
        LayerScheme(mode="static", kernel="lowbit_dynamic")


def test_auto_picks_it_for_dynamic_groups_only():
    s = LayerScheme(mode="dynamic", bits=4, group_size=32)
    cpu = select_kernel(s, device="cpu", dtype=torch.float32, in_features=64, out_features=32)
    assert cpu.name == "lowbit_dynamic"
    if KERNELS is not None:
        assert cpu.batch_invariant and not cpu.fallback and ld.isa() in cpu.reason
    cuda = select_kernel(s, device="cuda", dtype=torch.bfloat16, in_features=64, out_features=32)
    assert cuda.name == "lowbit_dynamic" and cuda.fallback and "torch._int_mm has no per-group scale" in cuda.reason
    per_channel = select_kernel(LayerScheme(bits=4), device="cpu", dtype=torch.float32, in_features=64,
                                out_features=32)
    assert per_channel.name != "lowbit_dynamic"


# the dot panels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, n, k, group, asym", [
    (4, 17, 64, 32, False), (4, 16, 37, 8, True), (3, 5, 30, 7, True), (2, 33, 12, 12, False),
    (8, 20, 70, 16, True), (6, 3, 9, 4, False), (5, 16, 10, 3, True),
    (4, 70, 12, 4, True), (8, 50, 8, 8, False),
])
def test_dot_panels_round_trip_exactly(bits, n, k, group, asym, monkeypatch):
    monkeypatch.setattr(lowbit, "PACK_WEIGHTS", 100)  # packed in slices of whole panels (one where n <= 16)
    q, scale, zp, _ = _operands(n, k, group, bits, asym)
    p = ld.to_dot_panels(q, bits, scale, zp if asym else None, group)
    back = ld.from_dot_panels(p)
    assert torch.equal(back[0], q) and torch.equal(back[1], scale) and torch.equal(back[2], zp)
    assert p.codes.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert p.codes.shape[0] == -(-n // 16) and p.codes.shape[2] == (32 if bits <= 4 else 64)
    # the dequantized row sums, exactly (float64 of exact integer sums)
    expect = dequantize(q, scale, zp, group).double().sum(1).float()
    assert torch.allclose(p.wsum, expect, rtol=1e-6, atol=1e-6)


def test_dot_panels_documented_layout():
    """4-bit: byte 4i + j of a unit holds row i (low nibble) and row 8 + i (high nibble) at k j."""
    q = torch.arange(16 * 8).reshape(16, 8).remainder(15).sub(7).to(torch.int8)  # [-7, 7]
    p = ld.to_dot_panels(q, 4, torch.ones(16, 1), None, 8)
    assert p.codes.shape == (1, 2, 32)
    for t, i, j in [(0, 0, 0), (1, 3, 2), (0, 7, 3), (1, 5, 1)]:
        byte = int(p.codes[0, t, 4 * i + j])
        assert byte & 15 == int(q[i, 4 * t + j]) + 8 and byte >> 4 == int(q[8 + i, 4 * t + j]) + 8


# the C++ kernel ---------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("bits, n, k, group, asym", [
    (4, 40, 64, 32, False), (4, 33, 96, 32, True), (4, 16, 37, 37, False), (4, 21, 75, 10, True),
    (3, 18, 45, 7, True), (2, 16, 64, 16, False), (8, 19, 72, 24, True), (8, 16, 33, 33, False),
    (6, 17, 50, 16, True),
])
def test_kernel_paths_agree_bit_for_bit_and_match_the_reference(bits, n, k, group, asym):
    """Every instruction set built here gives the same bits; they equal the torch reference
    (dequantized codes x dequantized weights) to float rounding; odd K, K not a multiple of G,
    G = K, groups not a multiple of 4, asymmetric weights, a bias."""
    q, scale, zp, bias = _operands(n, k, group, bits, asym)
    p = ld.to_dot_panels(q, bits, scale, zp if asym else None, group)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(1))
    outs = {path: _run(x, p, bias, path=PATH_IDS[path]) for path in KERNELS.lowbit_dynamic_paths}
    outs["auto"] = _run(x, p, bias)
    first = outs["scalar"]
    for path, y in outs.items():
        assert torch.equal(y, first), path
    ref = ld.lowbit_dynamic_reference(x, q, scale, zp, group, bias)
    assert first.shape == (7, n) and first.dtype == torch.float32
    assert sqnr_db(ref, first) > 100
    # exactly the formula: the codes' integer dot per group, one FMA per group, the epilogue
    u, a, c = ld.dynamic_codes(x)
    acc = torch.einsum("mk,nk->mnk", u.double(), (q.double() - zp.double().repeat_interleave(group, 1)[:, :k]))
    groups = torch.arange(k) // group
    per_group = torch.zeros(7, n, scale.shape[1], dtype=torch.float64).index_add_(2, groups, acc)
    y64 = a.double() * (per_group * scale.double()).sum(2) + c.double() * p.wsum.double() + bias.double()
    mag = a.double() * (per_group.abs() * scale.double()).sum(2) + (c.double() * p.wsum.double()).abs() + bias.abs()
    assert ((first.double() - y64).abs() <= 1e-6 * mag).all()


@needs_native
@pytest.mark.parametrize("n, k, group, asym", [(16, 64, 32, False), (40, 96, 32, True), (50, 100, 20, False),
                                               (90, 64, 64, True), (300, 2048, 128, False)])
def test_one_row_decode_tiles_give_the_batch_s_bits(n, k, group, asym):
    """One row of codes (decode) reads several panels side by side on AVX2 (1, 3, 4, 6 and 19
    panels: runs and leftovers, a partial panel, 300 x 2048 split over threads): every path gives
    the scalar path's bits, and those of the row inside a batch."""
    q, scale, zp, bias = _operands(n, k, group, 4, asym)
    p = ld.to_dot_panels(q, 4, scale, zp if asym else None, group)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(n))
    batch = _run(x, p, bias, path=1)
    for i in (0, 4, 8):
        row = x[i:i + 1].clone()
        first = _run(row, p, bias, path=1)
        assert torch.equal(first, batch[i:i + 1])
        for path in KERNELS.lowbit_dynamic_paths:
            assert torch.equal(_run(row, p, bias, path=PATH_IDS[path]), first), path
        assert torch.equal(_run(row, p, bias), first)


@pytest.mark.parametrize("bits, n, k, group, asym", [
    (4, 40, 64, 32, False), (4, 33, 96, 32, True), (4, 300, 256, 128, False), (3, 18, 45, 7, True),
    (8, 19, 72, 24, True),
])
def test_float16_scales_are_held_in_two_bytes_with_the_same_bits(bits, n, k, group, asym):
    """Scales that are all float16 values (qlin's group scales, `half_scales`) are held as
    float16 panels: the round trip gives the file's float32 tensor exactly, the panels are
    smaller, and every path (and one row's decode tiles) gives the bits of float32 panels of the
    same values. One scale that is not a float16 value keeps the float32 panels."""
    q, scale, zp, bias = _operands(n, k, group, bits, asym)
    p16, p32 = float16_panels(ld.to_dot_panels, ld.from_dot_panels, q, bits, half_scales(scale),
                              zp if asym else None, group)
    if KERNELS is None:
        return
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(3))
    for rows in (x[:1], x[:2], x):
        expect = _run(rows, p32, bias, path=1)
        for path in (0, *(PATH_IDS[name] for name in KERNELS.lowbit_dynamic_paths)):
            assert torch.equal(_run(rows, p16, bias, path=path), expect), (path, rows.shape[0])
    assert torch.equal(_run(x.bfloat16(), p16, bias), _run(x.bfloat16(), p32, bias))


def test_quantized_group_scales_take_the_float16_panels():
    """A dynamic grouped layer quantized by qlin holds float16 scale panels (the file's scales
    stay float32, with float16 values), except where a group's scale is no normal float16 (an
    all-zero group's MIN_SCALE): that layer keeps float32 panels, with the file's values."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    cfg = QuantConfig(mode="dynamic", bits=4, group_size=32, kernel="lowbit_dynamic")
    with torch.no_grad():
        layer = quantize_model(lin, cfg).model
        lin.weight[3, :32] = 0.0
        zeroed = quantize_model(lin, cfg).model
    if KERNELS is not None:
        assert layer.kernel.name == "lowbit_dynamic"
        assert layer._run.panels.scale.dtype == torch.float16
        assert zeroed._run.panels.scale.dtype == torch.float32
    for m in (layer, zeroed):
        s = m.weight_scale
        assert s.dtype == torch.float32 and s.shape == (40, 3)
    assert torch.equal(layer.weight_scale.half().float(), layer.weight_scale)
    assert float(zeroed.weight_scale[3, 0]) == MIN_SCALE


@needs_native
def test_codes_are_the_per_token_kernels_codes():
    """The torch codes (the fallback's) are quantize_rows' (pertoken, onednn), code for code."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 83, generator=g)
    x[1] = 0.0
    x[2] = torch.arange(83) / 82 * 255
    sm = torch.rand(83, generator=g) + 0.5
    for smooth in (None, sm):
        codes, a, c, _ = KERNELS.quantize_rows(x, torch.empty(0) if smooth is None else smooth)
        u, a2, c2 = ld.dynamic_codes(x, smooth)
        assert torch.equal(u.to(torch.uint8), codes) and torch.equal(a2.reshape(-1), a) and torch.equal(c2.reshape(-1), c)


@needs_native
def test_batch_invariant_bit_for_bit():
    q, scale, zp, bias = _operands(50, 96, 32, 4, True)
    p = ld.to_dot_panels(q, 4, scale, zp, 32)
    x = torch.randn(70, 96, generator=torch.Generator().manual_seed(2))  # more than a chunk of 64 rows
    batch = _run(x, p, bias)
    for m in (0, 1, 33, 64, 69):
        assert torch.equal(_run(x[m:m + 1].clone(), p, bias), batch[m:m + 1])
    assert torch.equal(_run(x[3:7].clone(), p, bias), batch[3:7])


@needs_native
def test_bfloat16_and_smoothquant():
    """bf16 rows are read as their float32 copies and the output rounded as torch rounds; the
    SmoothQuant division is folded into the codes."""
    q, scale, zp, bias = _operands(24, 64, 16, 4, False)
    p = ld.to_dot_panels(q, 4, scale, None, 16)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y = _run(x, p, bias)
    assert y.dtype == torch.bfloat16 and torch.equal(y, _run(x.float(), p, bias).to(torch.bfloat16))
    sm = torch.rand(64, generator=torch.Generator().manual_seed(5)) + 0.5
    ys = _run(x.float(), p, bias, smooth=sm)
    ref = ld.lowbit_dynamic_reference(x.float(), q, scale, zp, 16, bias, smooth=sm)
    assert sqnr_db(ref, ys) > 100
    assert _run(x.half(), p, bias).dtype == torch.float16


@needs_native
def test_refuses_bad_operands_in_one_line():
    q, scale, zp, _ = _operands(16, 32, 8, 4, False)
    p = ld.to_dot_panels(q, 4, scale, None, 8)
    with pytest.raises(RuntimeError, match="K = 32"):
        _run(torch.randn(2, 31), p)
    with pytest.raises(RuntimeError, match="path .* is not built"):
        if "avx512_vnni" in KERNELS.lowbit_dynamic_paths:
            pytest.skip("every path is built here")
        _run(torch.randn(2, 32), p, path=3)


# layers and models ------------------------------------------------------------------------------


def _linear(k=96, n=40, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


@pytest.mark.parametrize("bits, group", [(4, 32), (3, 24), (8, 40)])
def test_layer_against_float_and_the_torch_path(monkeypatch, bits, group):
    from qlin_cli import quantize_model

    lin = _linear()
    x = torch.randn(6, 96)
    cfg = QuantConfig(mode="dynamic", bits=bits, group_size=group, kernel="lowbit_dynamic")
    q = quantize_model(lin, cfg).model
    assert q.kernel.name == "lowbit_dynamic"
    y = q(x)
    floor = {4: 20, 3: 14, 8: 35}[bits]
    assert sqnr_db(lin(x).detach(), y) > floor
    # the torch path (no C++ build): the same numbers to float rounding
    monkeypatch.setattr(native, "_load", lambda: (None, "turned off by QLIN_NATIVE=0"))
    q.pack("cpu")
    assert q.kernel.fallback and "F.linear" in q.kernel.reason
    assert sqnr_db(y, q(x)) > 90


def test_save_load_round_trip_and_same_bytes(tmp_path):
    import copy

    from qlin_cli import load_quantized, quantize_model, save_quantized
    from safetensors import safe_open

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    # a layer this small is kept float for speed under auto: the kernel is named
    cfg = QuantConfig(mode="dynamic", bits=4, group_size=16, symmetric=False, kernel="lowbit_dynamic")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    result = quantize_model(copy.deepcopy(model), cfg)
    save_quantized(result, a)
    save_quantized(quantize_model(copy.deepcopy(model), cfg), b)
    assert a.read_bytes() == b.read_bytes()
    x = torch.randn(5, 64)
    loaded = load_quantized(copy.deepcopy(model), a)
    assert torch.equal(loaded(x), result.model(x))
    assert loaded[0].kernel.name == "lowbit_dynamic" and loaded[0].scheme.mode == "dynamic"
    # one copy: the panels hold the weights; saving the loaded model gives the same bytes
    assert "weight" not in loaded[0]._buffers
    c = tmp_path / "c.safetensors"
    save_quantized(result, c)
    assert c.read_bytes() == a.read_bytes()
    with safe_open(a, "pt") as f:
        plan = json.loads(f.metadata()["plan"])
    assert "dynamic" in json.dumps(plan) and '"group_size": 16' in json.dumps(plan)


def test_cli_quantize_inspect_eval_on_the_sample_model(tmp_path, capsys):
    from conftest import ROOT

    sample = ROOT / "sample_models" / "digits_mlp.safetensors"
    arch = "sample_models.digits:build_digits_mlp"
    out = tmp_path / "w4a8.safetensors"
    cli_json(capsys, "quantize", sample, "--model", arch, "--mode", "dynamic", "--bits", "4", "--group-size", "16",
             "--kernel", "lowbit_dynamic", "-o", out)
    layers = cli_json(capsys, "inspect", out)["layers"]
    assert len(layers) == 3 and all(
        (e["mode"], e["group_size"], e["weight_dtype"], e["kernel"], e["batch_invariant"])
        == ("dynamic", 16, "int4 (packed in uint8)", "lowbit_dynamic", KERNELS is not None) for e in layers)
    ev = cli_json(capsys, "eval", sample, out, "--model", arch, "--inputs", ROOT / "sample_models" / "digits_test.safetensors",
                  "--labels", ROOT / "sample_models" / "digits_test_labels.safetensors")
    assert ev["sqnr_db"] > 20 and ev["top1_agreement"] > 0.97 and ev["kernels"] == {"lowbit_dynamic": 3}
    # the shipped recipe (its layers are under auto's size for dynamic mode: the kernel is named)
    recipe = tmp_path / "recipe.safetensors"
    cli_json(capsys, "quantize", sample, "--model", arch, "--config", "w4a8", "--kernel", "lowbit_dynamic", "-o", recipe)
    assert [(e["mode"], e["bits"], e["group_size"]) for e in cli_json(capsys, "inspect", recipe)["layers"]] == \
        [("dynamic", 4, 32)] * 3
    code, _, err = cli(capsys, "quantize", sample, "--model", arch, "--mode", "static", "--group-size", "16",
                       "-o", tmp_path / "x.safetensors")
    assert code == 1 and "not static" in assert_one_error_line(err)
    assert not (tmp_path / "x.safetensors").exists()


def test_transformers_llama_end_to_end_and_its_compressed_tensors_export(tmp_path, capsys):
    """A Llama built from a config: W4A8 through the CLI (qlin file: accuracy against float; and
    compressed-tensors: transformers loads the folder, each Linear holding qlin's dequantized weight)."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    from qlin_cli import QuantizedLinear, load_quantized
    from qlin_cli.hf import load_hf_folder

    tf.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path / "llama"
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    # --no-smooth: the export folds SmoothQuant's factors into the norms, the qlin file may keep
    # them per layer, so only unsmoothed weights are the same tensors in both
    opts = ["--mode", "dynamic", "--bits", "4", "--group-size", "32", "--kernel", "lowbit_dynamic", "--no-smooth"]
    qfile = tmp_path / "w4a8.safetensors"
    cli_json(capsys, "quantize", folder, *opts, "-o", qfile)
    model = load_quantized(load_hf_folder(folder).model, qfile)
    kernels = {m.kernel.name for m in model.modules() if isinstance(m, QuantizedLinear)}
    with torch.no_grad():
        ours, reference = model(input_ids=ids).logits, load_hf_folder(folder).model(input_ids=ids).logits
    assert kernels == {"lowbit_dynamic"} and sqnr_db(reference, ours) > 12  # 4-bit weights on a random model
    qlin_weights = {n: dequantize(m.weight, m.weight_scale, m.weight_zero_point, m.scheme.group_size)
                    for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    out = tmp_path / "ct"
    cli_json(capsys, "quantize", folder, *opts, "--format", "compressed-tensors", "-o", out)
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "int-quantized"
    assert (group["weights"]["strategy"], group["weights"]["group_size"], group["weights"]["num_bits"]) == ("group", 32, 4)
    assert (group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == ("token", True)
    with pytest.warns(UserWarning):  # transformers: the folder's config is used, `dequantize` applied
        dense = tf.AutoModelForCausalLM.from_pretrained(  # dequantized at load: float Linear layers
            out, local_files_only=True, quantization_config=tf.CompressedTensorsConfig(dequantize=True))
    for name, w in qlin_weights.items():
        assert torch.equal(dense.get_submodule(name).weight.detach(), w), name
    # compressed: decompressed on the first forward, activations fake-quantized per token
    compressed = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        ct = compressed(input_ids=ids).logits
    assert float(torch.nn.functional.cosine_similarity(ct.flatten(1), ours.flatten(1)).min()) > 0.99


@needs_native
def test_sample_encoder_rows_alone_equal_rows_in_the_batch(digits_test):
    from conftest import load_encoder
    from qlin_cli import quantize_model

    model = load_encoder()
    x = digits_test[0][:24]
    result = quantize_model(model, QuantConfig(mode="dynamic", bits=4, group_size=8, kernel="lowbit_dynamic"))
    assert result.quantized and all(r.batch_invariant for r in result.quantized)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(x.shape[0])])
    assert torch.equal(batched, alone)
