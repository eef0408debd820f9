"""Casting an int8 model (`model.to(torch.bfloat16)`, `.float()`, `.half()`): the quantized layers
take and return the new dtype, their stored tensors keep theirs (qmodule.py), and the fused
per-token kernels serve bf16 activations without conversions."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from qlin_cli.config import QuantConfig
from qlin_cli.primitives import sqnr_db
from qlin_cli.qembedding import QuantizedEmbedding
from qlin_cli.qlinear import QuantizedLinear
from qlin_cli.quantize import quantize_model


def _bert():
    """A BERT small enough to quantize in a second, with layers above auto's kept-float bound."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=6, intermediate_size=1536,
                        vocab_size=100, max_position_embeddings=64)
    return BertModel(config).eval()


def _quantized(model, **keys):
    return quantize_model(model, QuantConfig(**keys)).model


def _stored(model):
    """The quantized layers' stored tensors, by name."""
    return {f"{name}.{k}": v.clone() for name, m in model.named_modules() if isinstance(m, QuantizedLinear)
            for k, v in m.state_dict().items()}


def test_a_bf16_cast_keeps_the_stored_tensors_and_runs_bf16_through_the_int8_layers():
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    float_model = _bert()
    with torch.no_grad():
        reference = float_model(ids).last_hidden_state
    q = _quantized(_bert())
    layers = [m for m in q.modules() if isinstance(m, QuantizedLinear)]
    kernels = [m.kernel.name for m in layers]
    stored = _stored(q)
    with torch.no_grad():
        y32 = q(ids).last_hidden_state

    assert q.to(torch.bfloat16) is q
    with torch.no_grad():
        y16 = q(ids).last_hidden_state
    assert y16.dtype == torch.bfloat16
    assert all(m.dtype == torch.bfloat16 for m in layers)
    # the same kernel serves bf16 (the fused per-token ones read and write it; others convert)
    assert [m.kernel.name for m in layers] == kernels
    after = _stored(q)
    assert after.keys() == stored.keys()
    for key, value in stored.items():  # int8 codes, float32 scales, the bias: as stored, bit for bit
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert sqnr_db(reference, y16.float()) > 25 and sqnr_db(y32, y16.float()) > 25

    q.float()  # back: the layers are packed for float32 again, from the same stored tensors
    assert all(m.dtype == torch.float32 for m in layers)
    layer, x = layers[0], torch.randn(3, 384)
    fresh = QuantizedLinear(384, layer.out_features, layer.scheme, bias=True)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), fresh.pack()(x))


def test_half_and_moves_keep_the_stored_tensors():
    q = _quantized(_bert())
    layer = next(m for m in q.modules() if isinstance(m, QuantizedLinear))
    scale = layer.weight_scale.clone()
    q.half()
    assert layer.dtype == torch.float16 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_scale, scale)
    x = torch.randn(2, 384, dtype=torch.float16)
    assert layer(x).dtype == torch.float16
    run = layer._run
    q.to("cpu")  # a move to where it is: nothing is packed again
    assert layer._run is run and layer.dtype == torch.float16
    q.to(torch.float32)
    assert layer.dtype == torch.float32 and layer.weight.dtype == torch.int8


def test_a_quantized_embedding_returns_rows_in_the_cast_dtype():
    table = torch.nn.Embedding(10, 8)
    q = QuantizedEmbedding.from_float(table)
    ids = torch.tensor([[1, 2], [3, 9]])
    rows = q(ids)
    q.to(torch.bfloat16)
    assert q.weight_scale.dtype == torch.float32 and q.weight.dtype == torch.int8
    assert q(ids).dtype == torch.bfloat16 and torch.equal(q(ids), rows.bfloat16())


@pytest.mark.parametrize("keys", [dict(granularity="channel"), dict(mode="weight-only")])
def test_other_kernels_take_bf16_too(keys):
    """Kernels without a bf16 path convert at their edges: bf16 in, bf16 out."""
    q = _quantized(_bert(), **keys).to(torch.bfloat16)
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        assert q(ids).last_hidden_state.dtype == torch.bfloat16
