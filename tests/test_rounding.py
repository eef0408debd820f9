"""Rounding methods (rounding.py): GPTQ and AWQ against round-to-nearest on small layers, with
exact cases where the math is exact (a diagonal Hessian makes GPTQ round to nearest; AWQ's alpha 0
is round-to-nearest); AWQ's folds keep the model's output; the methods through quantize_model, the
qlin file, the CLI, recipes, the report, --min-sqnr and the compressed-tensors export (which
transformers loads)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from conftest import cli, cli_json

from qlin_cli.config import QuantConfig
from qlin_cli.errors import ConfigError
from qlin_cli.primitives import dequantize, sqnr_db
from qlin_cli.qfile import load_quantized, save_quantized
from qlin_cli.qlinear import QuantizedLinear
from qlin_cli.quantize import quantize_model
from qlin_cli.rounding import InputStats, apply_awq, awq_search, gptq, round_to_nearest
from qlin_cli.scheme import LayerScheme

GEN = torch.Generator().manual_seed(0)


def _inputs(n=512, k=64, outliers=(3, 17), gain=20.0) -> torch.Tensor:
    """Correlated inputs `(n, k)` with a few large channels, as a transformer's are."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.3 * torch.randn(n, k, generator=g)
    x[:, list(outliers)] *= gain
    return x


def _weight(out=48, k=64) -> torch.Tensor:
    return torch.randn(out, k, generator=torch.Generator().manual_seed(2)) * 0.1


def _stats(x: torch.Tensor) -> InputStats:
    st = InputStats.empty(x.shape[1])
    st.update(x)
    return st


def _out_sqnr(w, values, scale, zp, g, x) -> float:
    return sqnr_db(x @ w.t(), x @ dequantize(values, scale, zp, g).t())


# ---------------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("keys", [
    dict(bits=3, group_size=16), dict(bits=4, group_size=32, symmetric=False), dict(bits=4, mode="weight-only"),
    dict(bits=3, group_size=16, act_order=True), dict(bits=8), dict(bits=8, mode="static"),
])
def test_gptq_beats_round_to_nearest_on_the_calibration_inputs(keys):
    x, w = _inputs(), _weight()
    scheme = LayerScheme(rounding="gptq", **keys)
    ours = gptq(w, _stats(x).hessian(), scheme)
    rtn = round_to_nearest(w, scheme)
    lo, hi = -(1 << (scheme.bits - 1)), (1 << (scheme.bits - 1)) - 1
    assert ours[0].dtype == torch.int8 and int(ours[0].min()) >= lo and int(ours[0].max()) <= hi
    assert ours[1].shape == rtn[1].shape and ours[2].shape == rtn[2].shape
    gain = _out_sqnr(w, *ours, scheme.group_size, x) - _out_sqnr(w, *rtn, scheme.group_size, x)
    assert gain > 1.0, gain


@pytest.mark.parametrize("keys", [dict(bits=4, group_size=16), dict(bits=3, mode="weight-only"),
                                  dict(bits=4, group_size=16, act_order=True)])
def test_gptq_with_a_diagonal_hessian_rounds_to_nearest(keys):
    """No correlation between inputs: nothing to compensate, so GPTQ's values and scales are
    round-to-nearest's, exactly."""
    w = _weight()
    scheme = LayerScheme(rounding="gptq", **keys)
    h = torch.diag(torch.rand(64, generator=GEN, dtype=torch.float64) + 0.5)
    for a, b in zip(gptq(w, h, scheme), round_to_nearest(w, scheme)):
        assert torch.equal(a, b)


def test_act_order_with_groups_keeps_the_float_weights_scales():
    """Static groups: every group's scale is fixed from the float weights, so the layout is the
    plain grouped one (no group index) whatever order the columns are rounded in."""
    x, w = _inputs(), _weight()
    scheme = LayerScheme(rounding="gptq", bits=4, group_size=16, act_order=True)
    _, scale, zp = gptq(w, _stats(x).hessian(), scheme)
    _, rtn_scale, rtn_zp = round_to_nearest(w, scheme)
    assert torch.equal(scale, rtn_scale) and torch.equal(zp, rtn_zp)


def test_block_size_changes_nothing_but_float_rounding():
    x, w = _inputs(), _weight()
    h = _stats(x).hessian()
    a = gptq(w, h, LayerScheme(rounding="gptq", bits=4, group_size=16, gptq_block_size=7))[0]
    b = gptq(w, h, LayerScheme(rounding="gptq", bits=4, group_size=16))[0]
    assert (a == b).float().mean() > 0.99


def test_input_stats_add_up_over_batches_and_scale():
    x = _inputs(100)
    one, two = _stats(x), InputStats.empty(64)
    two.update(x[:37])
    two.update(x[37:])
    assert two.tokens == 100 and torch.allclose(one.gram, two.gram, rtol=1e-5, atol=1e-3)
    assert torch.allclose(one.abs_sum, two.abs_sum, rtol=1e-5, atol=1e-3)
    s = torch.rand(64, generator=GEN) + 0.5
    assert torch.allclose(one.scaled(s).gram, _stats(x / s).gram, rtol=1e-4, atol=1e-3)


def test_from_float_needs_the_hessian_for_gptq():
    lin = nn.Linear(64, 48)
    with pytest.raises(ValueError, match="Hessian"):
        QuantizedLinear.from_float(lin, LayerScheme(rounding="gptq", bits=4, group_size=16))


# ----------------------------------------------------------------------------------------- AWQ


def test_awq_search_never_does_worse_than_round_to_nearest():
    x, w = _inputs(), _weight()
    scheme = LayerScheme(rounding="awq", bits=3, group_size=16)
    choice = awq_search(["l"], [w], [scheme], _stats(x))
    assert 0 < choice.alpha < 1 and choice.error < 0.8 * choice.error_rtn
    d = w - dequantize(*round_to_nearest(w, scheme), 16)
    assert choice.error_rtn == pytest.approx(float(((x.double() @ d.double().t()) ** 2).sum()), rel=1e-4)
    flat = awq_search(["l"], [w], [scheme], _stats(torch.ones(8, 64)))  # no salient channel: nothing to gain
    assert flat.alpha == 0.0 and flat.error == flat.error_rtn


class _Block(nn.Module):
    """norm -> (a, b) reading its output; a -> GELU -> c; b -> d (foldable into b)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(64)
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.c, self.d = nn.Linear(64, 32), nn.Linear(64, 32)
        with torch.no_grad():  # salient channels in the inputs of a and b, and of d
            self.norm.weight[[3, 17]] = 20.0
            self.b.weight[[5, 9]] *= 10

    def forward(self, x):
        h = self.norm(x)
        return self.c(torch.nn.functional.gelu(self.a(h))) + self.d(self.b(h) * 3.0)


def test_awq_folds_into_the_norm_and_the_linear_before_else_keeps_the_factors_per_layer():
    model, x = _Block().eval(), torch.randn(64, 64, generator=GEN)
    reference = model(x)
    from qlin_cli.plan import make_plan
    entries = make_plan(model, QuantConfig(rounding="awq", bits=3, group_size=16, awq_grid=10)).quantized
    kept, folded, notes, alphas = apply_awq(model, entries, x, batch_size=64)
    assert sqnr_db(reference, model(x)) > 60  # the folds leave the model as it was
    assert all(0 < alphas[n] < 1 for n in "abcd"), alphas
    assert notes["a"] == notes["b"] == f"AWQ alpha {alphas['a']:g} folded into norm"  # one block: one alpha
    assert notes["d"] == f"AWQ alpha {alphas['d']:g} folded into b"  # b's output rows take d's factors
    assert notes["c"].startswith(f"AWQ alpha {alphas['c']:g} kept per layer")  # GELU between a and c
    assert set(kept) == {"c"} and set(folded) == {"a", "b", "d"}
    assert not any(apply_awq(model, entries, x, batch_size=64, per_layer=False)[0].values())  # no per-layer factors


@pytest.mark.parametrize("rounding", ["awq", "awq+gptq", "gptq"])
def test_the_methods_through_quantize_model_and_the_qlin_file(rounding, tmp_path):
    """Each method beats round-to-nearest's model output on the calibration data, the plan says
    which method each layer has, and the file loads back to the same outputs (a layer with AWQ
    factors kept per layer divides its inputs in the weight-only kernel)."""
    x = torch.randn(64, 64, generator=GEN)
    outs = {}
    for r in ("rtn", rounding):
        model = _Block().eval()
        reference = model(x)
        result = quantize_model(model, QuantConfig(rounding=r, bits=3, group_size=16), calib=x)
        outs[r] = sqnr_db(reference, result.model(x))
    assert outs[rounding] > outs["rtn"] + 0.5, outs
    assert {e.scheme.rounding for e in result.plan.quantized} == {rounding}
    rows = {r.name: r.to_dict() for r in result.layers}
    assert all(row["rtn_output_sqnr_db"] is not None for row in rows.values())
    if "awq" in rounding:
        assert result.plan.entries[2].scheme.smooth is not None  # c: factors kept per layer
        assert result.model.c.smooth_scale is not None
    path = save_quantized(result, tmp_path / "m.safetensors")
    loaded = load_quantized(_Block(), path)
    assert torch.equal(loaded(x), result.model(x))
    meta = json.loads(__import__("safetensors").safe_open(path, "pt").metadata()["plan"])
    assert {e["rounding"] for e in meta if e["status"] == "quantized"} == {rounding}


def test_round_to_nearest_files_carry_no_rounding_keys():
    assert "rounding" not in QuantConfig().to_dict() and "rounding" not in LayerScheme().to_dict()
    assert "rounding" not in QuantConfig(bits=4, group_size=32).scheme.to_dict()


def test_min_sqnr_widens_gptq_layers_to_8_bits_round_to_nearest():
    from qlin_cli.fallback import quantize_to_target
    x = torch.randn(64, 64, generator=GEN)
    model = _Block().eval()
    result = quantize_to_target(model, QuantConfig(rounding="awq+gptq", bits=2, group_size=16), min_sqnr_db=40.0,
                                eval_inputs=x, calib=x)
    widened = [st.layer for st in result.fallback.steps if st.to == "8-bit"]
    assert widened and result.fallback.final_sqnr_db >= 40.0
    for r in result.layers:
        if r.name in widened:
            assert r.plan.scheme.bits == 8 and r.plan.scheme.rounding == "awq"


# ------------------------------------------------------------------------------ options, CLI


@pytest.mark.parametrize("keys, message", [
    (dict(rounding="awq"), "AWQ scales the weights of weight-only layers"),
    (dict(rounding="bogus"), "rounding = 'bogus' is not valid"),
    (dict(rounding="gptq", gptq_damp=0), "gptq_damp"),
    (dict(rounding="gptq", gptq_block_size=0), "gptq_block_size"),
    (dict(rounding="awq", mode="weight-only", smooth=0.5), "drop `smooth`"),
])
def test_bad_combinations_are_one_clear_error(keys, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**keys)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (heads = key-value heads, so v_proj can take o_proj's factors) with two
    outlier channels in its norms, and token ids."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    tf.utils.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("rounding")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            norm.weight[[3, 40]] *= 20
    model.save_pretrained(root / "llama")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, root / "ids.safetensors")
    return root / "llama", root / "ids.safetensors"


def test_cli_rounding_option_recipe_rules_and_report(llama, tmp_path, capsys):
    folder, ids = llama
    recipe = tmp_path / "r.toml"
    recipe.write_text('bits = 4\ngroup_size = 32\nrounding = "gptq"\n\n[[layers]]\nmatch = "mlp"\nrounding = "awq"\n'
                      '\n[[layers]]\nmatch = "o_proj"\nact_order = true\ngptq_damp = 0.05\n')
    report = cli_json(capsys, "quantize", folder, "--config", recipe, "--calib", ids, "-o", tmp_path / "q.safetensors",
                      "--report", tmp_path / "r.html")
    methods = {r["name"].rsplit(".", 1)[-1]: r["rounding"] for r in report["layers"] if r["status"] == "quantized"}
    assert methods == {"q_proj": "gptq", "k_proj": "gptq", "v_proj": "gptq", "o_proj": "gptq",
                       "gate_proj": "awq", "up_proj": "awq", "down_proj": "awq", "lm_head": "gptq"}
    o_proj = next(r for r in report["layers"] if r["name"].endswith("o_proj"))
    assert o_proj["act_order"] is True and o_proj["gptq_damp"] == 0.05
    assert all(r["output_sqnr_db"] > r["rtn_output_sqnr_db"] - 0.5 for r in report["layers"] if r["status"] == "quantized")
    assert "round to nearest" in (tmp_path / "r.html").read_text()
    rows = {r["name"]: r for r in cli_json(capsys, "inspect", tmp_path / "q.safetensors")["layers"]}
    assert rows["model.layers.0.self_attn.o_proj"]["act_order"] is True
    assert rows["model.layers.0.mlp.down_proj"]["rounding"] == "awq" and "act_order" not in rows["model.layers.0.mlp.down_proj"]
    code, out, err = cli(capsys, "quantize", folder, "--bits", "4", "--rounding", "awq", "-o", tmp_path / "x.safetensors")
    assert code == 1 and err.count("\n") == 1 and "weight-only" in err
    # block by block under --stream (tests/test_stream.py), its statistics from the quantized outputs
    report = cli_json(capsys, "quantize", folder, "--mode", "weight-only", "--rounding", "gptq", "--stream",
                      "-o", tmp_path / "y.safetensors", "--json")
    assert "streamed block by block" in report["source_kind"]
    assert report["statistics_from"].startswith("quantized outputs of the blocks before")


def test_compressed_tensors_export_of_gptq_loads_in_transformers(llama, tmp_path, capsys):
    """GPTQ in activation order with groups, AWQ folded into the norms: transformers loads the
    folder and its outputs equal qlin's dequantized model's."""
    import transformers
    from safetensors.torch import load_file
    folder, ids = llama
    out = tmp_path / "ct"
    recipe = tmp_path / "r.toml"
    recipe.write_text('bits = 4\ngroup_size = 32\nrounding = "awq+gptq"\nact_order = true\n')
    report = cli_json(capsys, "quantize", folder, "--config", recipe, "--calib", ids, "--format", "compressed-tensors",
                      "-o", out)
    notes = " ".join(r["reason"] for r in report["layers"])
    assert "folded into model.layers.0.input_layernorm" in notes
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    assert not any(k.endswith("g_idx") for k in load_file(out / "model.safetensors"))
    from qlin_cli.hf import load_hf_folder
    ours = load_quantized(load_hf_folder(folder).model, out)  # qlin reads its export back
    inputs = load_file(ids)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()
    with torch.no_grad():
        a, b = ours(**inputs).logits, theirs(**inputs).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
