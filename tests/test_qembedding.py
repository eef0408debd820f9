"""QuantizedEmbedding (qembedding.py): an int8 table, one scale per row. The gather against the
float table, the per-row scale and its error bound, padding and all-zero rows, the buffers' round
trip through a state dict, and the refusal of a table with non-finite values."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qlin_cli.errors import InputError
from qlin_cli.primitives import MIN_SCALE, sqnr_db
from qlin_cli.qembedding import QuantizedEmbedding


def test_gather_returns_the_dequantized_rows_of_the_float_table():
    torch.manual_seed(0)
    table = nn.Embedding(500, 48, padding_idx=0)
    q = QuantizedEmbedding.from_float(table)
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (500,) and int(q.weight.abs().max()) == 127
    ids = torch.randint(0, 500, (4, 9))
    ids[0, 0] = 0
    got = q(ids)  # (4, 9, 48)
    assert got.shape == (4, 9, 48) and got.dtype == torch.float32
    assert torch.equal(got, q.dequantized()[ids])  # only the gathered rows, dequantized exactly
    err = (got - table(ids)).abs().max(dim=-1).values  # (4, 9): per row within half a step
    assert bool((err <= q.weight_scale[ids] / 2 + 1e-7).all())
    assert 40 < sqnr_db(table.weight, q.dequantized()) < 50  # 8 bits per row of a normal table: ~42 dB
    assert torch.equal(got[0, 0], torch.zeros(48))  # the padding row stays exactly zero
    half = QuantizedEmbedding.from_float(nn.Embedding(10, 8).to(torch.bfloat16))
    assert half(torch.tensor([1, 2])).dtype == torch.bfloat16  # the table's dtype is kept


def test_each_row_scale_is_its_largest_magnitude_over_127():
    g = torch.Generator().manual_seed(1)
    table = nn.Embedding(64, 32)
    with torch.no_grad():
        table.weight.copy_(torch.randn(64, 32, generator=g) * torch.rand(64, 1, generator=g) * 3)
    q = QuantizedEmbedding.from_float(table)
    w = table.weight.detach()
    assert torch.equal(q.weight_scale, w.abs().amax(1) / 127)
    assert torch.equal(q.weight, torch.round(w / q.weight_scale[:, None]).to(torch.int8))
    assert torch.equal(q.weight.abs().amax(1), torch.full((64,), 127, dtype=torch.int8))  # every row reaches 127
    err = (q.dequantized() - w).abs()  # (64, 32)
    assert bool((err <= q.weight_scale[:, None] / 2 + 1e-7).all())


def test_an_all_zero_row_gets_the_smallest_scale_and_stays_zero():
    table = nn.Embedding(6, 5)
    with torch.no_grad():
        table.weight[3] = 0.0
    q = QuantizedEmbedding.from_float(table)
    assert float(q.weight_scale[3]) == MIN_SCALE and int(q.weight[3].abs().max()) == 0
    assert torch.equal(q(torch.tensor([3, 3])), torch.zeros(2, 5))
    assert bool((q.weight_scale > 0).all())


def test_the_buffers_round_trip_through_a_state_dict():
    """What the qlin file stores (`weight` int8 (num, dim), `weight_scale` float32 (num,)) rebuilds
    a table that returns the same rows, bit for bit."""
    torch.manual_seed(2)
    q = QuantizedEmbedding.from_float(nn.Embedding(40, 12, padding_idx=5))
    state = q.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "weight": (torch.int8, (40, 12)), "weight_scale": (torch.float32, (40,))}
    fresh = QuantizedEmbedding(40, 12, padding_idx=5)
    assert not torch.equal(fresh.dequantized(), q.dequantized())  # built empty: zeros, scale 1
    fresh.load_state_dict(state)
    ids = torch.arange(40).reshape(5, 8)
    assert torch.equal(fresh(ids), q(ids)) and torch.equal(fresh.dequantized(), q.dequantized())
    assert repr(fresh) == "QuantizedEmbedding(40, 12, padding_idx=5, int8 per row)"
    assert repr(QuantizedEmbedding(3, 2)) == "QuantizedEmbedding(3, 2, int8 per row)"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_table_with_non_finite_values_is_refused_by_name(value):
    table = nn.Embedding(4, 3)
    with torch.no_grad():
        table.weight[1, 2] = value
        table.weight[2, 0] = value
    with pytest.raises(InputError) as exc:
        QuantizedEmbedding.from_float(table, name="embeddings.word_embeddings")
    assert str(exc.value) == ("embedding 'embeddings.word_embeddings': weight has 2 non-finite value(s) (NaN or Inf); "
                              "fix the model first")
