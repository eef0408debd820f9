"""A sample's result must not depend on the rest of its batch (per-token dynamic int8 is the
default); per-tensor activations are opt-in and batch-dependent."""

import pytest
import torch

from conftest import load_digits_mlp, load_encoder
from qlin_cli import QuantConfig, quantize_model


def _alone_vs_batched(model, x):
    """Max abs difference between each sample run alone and inside the batch."""
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])
    return float((batched - alone).abs().max())


@pytest.mark.parametrize("load", [load_encoder, load_digits_mlp], ids=["encoder", "mlp"])
def test_default_int8_model_is_no_more_batch_dependent_than_float(load, digits_test):
    x = digits_test[0][:48]
    float_diff = _alone_vs_batched(load(), x)
    model = load()
    # auto's per-token kernel, named: the sample models' layers are under the size auto quantizes
    result = quantize_model(model, QuantConfig(kernel="onednn"))
    assert len(result.quantized) == len(result.layers) and all(r.batch_invariant for r in result.quantized)
    assert _alone_vs_batched(model, x) <= float_diff


def test_per_tensor_activations_are_batch_dependent_and_reported(digits_test):
    x = digits_test[0][:48]
    model = load_encoder()
    result = quantize_model(model, QuantConfig(act_granularity="tensor", kernel="fbgemm"))
    assert all(r.batch_invariant is False for r in result.quantized)
    assert _alone_vs_batched(model, x) > 1e-3
