"""The quantization math against exact expectations."""

import math

import pytest
import torch

from qlin_cli.config import PER_CHANNEL, PER_TENSOR
from qlin_cli.errors import InputError
from qlin_cli.primitives import (
    MIN_SCALE,
    amin_amax,
    check_finite,
    choose_qparams,
    dequantize,
    qparams_from_range,
    quantize,
    quantize_activations,
    sqnr_db,
)


def test_qparams_shapes_per_tensor_and_per_channel_of_a_1024x512_weight():
    """A (1024, 512) weight: scale () per tensor, (1024,) per output channel (one per row)."""
    w = torch.randn(1024, 512)
    s, z = choose_qparams(w, PER_TENSOR)
    assert s.shape == () and z.shape == () and s.dtype == torch.float32 and z.dtype == torch.int8
    s, z = choose_qparams(w, PER_CHANNEL)
    assert s.shape == (1024,) and z.shape == (1024,)
    assert torch.equal(s, w.abs().amax(dim=1) / 127)  # one per row of weight


def test_symmetric_exact_values():
    w = torch.tensor([[-1.27, 0.0, 0.635, 1.0], [2.54, -0.02, 0.01, 0.0]])
    s, z = choose_qparams(w, PER_CHANNEL, symmetric=True)
    assert torch.equal(s, torch.tensor([1.27, 2.54]) / 127)
    assert torch.equal(z, torch.zeros(2, dtype=torch.int8))
    q = quantize(w, s, z)
    assert q.tolist() == [[-127, 0, 64, 100], [127, -1, 0, 0]]  # 63.5 rounds half to even -> 64
    assert int(q.min()) >= -127


def test_asymmetric_exact_values():
    # range [0, 2.55] is widened to include 0 (already), s = 2.55 / 255 = 0.01, z = -128
    x = torch.tensor([[0.0, 1.0, 2.55]])
    s, z = choose_qparams(x, PER_TENSOR, symmetric=False)
    assert math.isclose(float(s), 0.01, rel_tol=1e-6) and int(z) == -128
    q = quantize(x, s, z, symmetric=False)
    assert q.tolist() == [[-128, -28, 127]]
    assert torch.allclose(dequantize(q, s, z), x, atol=float(s) / 2)
    # zero is exactly representable
    assert float(dequantize(torch.tensor([int(z)], dtype=torch.int8), s, z)) == 0.0


def test_asymmetric_beats_symmetric_on_one_sided_data():
    x = torch.rand(64, 256)  # all positive: symmetric wastes half its range
    errs = {}
    for sym in (True, False):
        s, z = choose_qparams(x, PER_CHANNEL, sym)
        errs[sym] = sqnr_db(x, dequantize(quantize(x, s, z, sym), s, z))
    assert errs[False] > errs[True] + 4.0


def test_all_zero_row_gets_tiny_positive_scale():
    w = torch.randn(3, 8)
    w[1] = 0.0
    s, z = choose_qparams(w, PER_CHANNEL)
    assert float(s[1]) == MIN_SCALE and bool((s > 0).all())
    q = quantize(w, s, z)
    assert q[1].tolist() == [0] * 8
    assert torch.isfinite(dequantize(q, s, z)).all()
    s, z = choose_qparams(torch.zeros(4, 4), PER_TENSOR, symmetric=False)
    assert float(s) == MIN_SCALE and int(z) == -128
    assert torch.equal(dequantize(quantize(torch.zeros(4, 4), s, z, False), s, z), torch.zeros(4, 4))


def test_non_finite_is_an_error_naming_what():
    w = torch.randn(4, 4)
    w[2, 1] = float("nan")
    with pytest.raises(InputError, match=r"layer 'fc1': weight has 1 non-finite"):
        check_finite(w, "layer 'fc1': weight")
    w[0, 0] = float("inf")
    with pytest.raises(InputError, match="2 non-finite"):
        check_finite(w, "x")


@pytest.mark.parametrize("gran", [PER_TENSOR, PER_CHANNEL])
@pytest.mark.parametrize("sym", [True, False])
def test_round_trip_error_is_at_most_half_a_step(gran, sym):
    torch.manual_seed(0)
    w = torch.randn(32, 48) * torch.linspace(0.1, 3, 32)[:, None]
    s, z = choose_qparams(w, gran, sym)
    err = (dequantize(quantize(w, s, z, sym), s, z) - w).abs()
    step = s if gran is PER_TENSOR else s[:, None]
    assert bool((err <= step / 2 + 1e-6).all())


def test_amin_amax_shapes():
    x = torch.arange(12.0).reshape(3, 4) - 5
    lo, hi = amin_amax(x, PER_CHANNEL)
    assert lo.tolist() == [-5, -1, 3] and hi.tolist() == [-2, 2, 6]
    lo, hi = amin_amax(x, PER_TENSOR)
    assert float(lo) == -5 and float(hi) == 6 and lo.shape == ()


def test_qparams_from_range_matches_choose_qparams():
    x = torch.randn(5, 9)
    lo, hi = amin_amax(x, PER_CHANNEL)
    for sym in (True, False):
        a = qparams_from_range(lo, hi, sym)
        b = choose_qparams(x, PER_CHANNEL, sym)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_quantize_activations_per_token_is_per_row_math():
    torch.manual_seed(1)
    x = torch.randn(6, 10) * torch.tensor([1, 10, 100, 0.01, 1, 0])[:, None]
    x[4] = x[4].abs() + 3  # a one-sided row that does not reach 0
    q, a, c = quantize_activations(x, per_token=True)
    assert q.dtype == torch.int8 and q.shape == (6, 10) and a.shape == c.shape == (6, 1)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    assert torch.equal(a[:5], (hi - lo)[:5] / 255)
    assert torch.equal(c, lo + 128 * a)
    # every row's own min and max land on the two ends of the int8 range
    assert q[:5].amin(1).tolist() == [-128] * 5 and q[:5].amax(1).tolist() == [127] * 5
    err = (a * q.float() + c - x).abs()
    assert bool((err <= a / 2 * (1 + 1e-5) + 1e-6).all())  # round to nearest: at most half a step
    assert float(a[5]) == MIN_SCALE and q[5].tolist() == [-128] * 10  # the all-zero token
    assert float(a[5] * q[5, 0] + c[5]) == 0.0
    # per tensor: one scale and offset, the global min and max map to -128 and 127
    q, a, c = quantize_activations(x, per_token=False)
    assert a.shape == c.shape == () and int(q.min()) == -128 and int(q.max()) == 127


def test_asymmetric_activations_double_the_resolution_of_one_sided_rows():
    """A ReLU output [0, m] gets 255 steps instead of symmetric int8's 127: about 6 dB."""
    x = torch.relu(torch.randn(64, 256, generator=torch.Generator().manual_seed(2)))
    q, a, c = quantize_activations(x)
    asym = sqnr_db(x, a * q.float() + c)
    s = x.abs().amax(1, keepdim=True) / 127
    sym = sqnr_db(x, torch.round(x / s) * s)
    assert asym - sym > 5.5


def test_sqnr_db_exact():
    ref = torch.tensor([1.0, 0.0])
    assert math.isclose(sqnr_db(ref, torch.tensor([0.5, 0.0])), 10 * math.log10(4), rel_tol=1e-12)
    assert sqnr_db(ref, ref) == float("inf")
