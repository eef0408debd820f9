"""GPT-2's `Conv1D` layers (transformers; weight stored `(in, out)`) are quantized like
`nn.Linear`, on a GPT-2 built from a config."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from conftest import cli_json, fbgemm_fallback
from qlin_cli import QuantConfig, load_quantized, quantize_model, save_quantized
from qlin_cli.kernels.common import reduce_range
from qlin_cli.errors import FormatError
from qlin_cli.primitives import choose_qparams, quantize, sqnr_db
from qlin_cli.scheme import PER_CHANNEL

tf = pytest.importorskip("transformers")
tf.utils.logging.set_verbosity_error()

CONV = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def gpt2() -> nn.Module:
    cfg = tf.GPT2Config(vocab_size=500, n_positions=64, n_embd=128, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    model = gpt2()
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    float_c_attn = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out) = (128, 384)
    res = quantize_model(model, QuantConfig(kernel="fbgemm"))
    path = save_quantized(res, tmp_path_factory.mktemp("gpt2") / "gpt2.safetensors")
    return res, path, ids, reference, float_c_attn


def test_conv1d_layers_are_planned_and_quantized_as_linears(quantized):
    res, _, ids, reference, _ = quantized
    by = {r.name: r for r in res.layers}
    names = [f"transformer.h.{i}.{c}" for i in range(2) for c in CONV]
    assert [r.name for r in res.layers] == [*names, "lm_head"]
    for name in names:
        r = by[name]
        # fbgemm as asked; without VNNI its per-token path falls back (saturation)
        assert r.plan.module == "Conv1D" and r.status == "quantized" and r.kernel == (fbgemm_fallback() if reduce_range() else "fbgemm")
        assert "Conv1D" in r.plan.reason
    assert (by["transformer.h.0.attn.c_attn"].plan.out_features, by["transformer.h.0.attn.c_attn"].plan.in_features) == (384, 128)
    assert (by["transformer.h.0.mlp.c_proj"].plan.out_features, by["transformer.h.0.mlp.c_proj"].plan.in_features) == (128, 512)
    assert by["lm_head"].plan.module == "Linear" and by["lm_head"].status == "skipped"  # tied to wte
    with torch.no_grad():
        assert sqnr_db(reference, res.model(ids).logits) > 30


def test_the_file_stores_the_canonical_out_in_weight_and_says_conv1d(quantized):
    _, path, _, _, float_c_attn = quantized
    with safe_open(path, framework="pt") as f:
        weight = f.get_tensor("transformer.h.0.attn.c_attn.weight")
        plan = json.loads(f.metadata()["plan"])
        keys = set(f.keys())
    assert weight.dtype == torch.int8 and tuple(weight.shape) == (384, 128)
    scale, zp = choose_qparams(float_c_attn.t(), PER_CHANNEL)
    assert torch.equal(weight, quantize(float_c_attn.t(), scale, zp))  # W.T quantized, bit for bit
    assert {e["name"]: e["module"] for e in plan}["transformer.h.0.attn.c_attn"] == "Conv1D"
    assert "lm_head.weight" not in keys  # tied to the embedding: stored once


def test_reload_is_bit_identical_and_reties_the_head(quantized):
    res, path, ids, _, _ = quantized
    loaded = load_quantized(gpt2(), path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, res.model(ids).logits)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_a_linear_where_the_file_has_a_conv1d_is_refused(quantized):
    _, path, _, _, _ = quantized
    model = gpt2()
    model.transformer.h[0].attn.c_attn = nn.Linear(128, 384)
    with pytest.raises(FormatError, match="the model has no Conv1D 'transformer.h.0.attn.c_attn' of shape \\(384, 128\\)"):
        load_quantized(model, path)


def test_inspect_lists_conv1d_layers_with_out_in_shapes(tmp_path, capsys):
    path = tmp_path / "gpt2.pt"
    torch.save(gpt2(), path)
    report = cli_json(capsys, "inspect", path, "--trust-pickle")
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["transformer.h.0.attn.c_attn"]["type"] == "Conv1D"
    assert rows["transformer.h.0.attn.c_attn"]["weight_shape"] == [384, 128]
    assert rows["transformer.h.0.attn.c_attn"]["scale_shape_per_channel"] == [384]
