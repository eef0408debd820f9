"""The per-token int8 layer in one call: `native_kernels.cpp`'s `pertoken_linear` (its AVX-512
VNNI path, its AVX2 path, its portable scalar path), which the `pertoken` kernel runs at every
row count and the `onednn` kernel up to `pertoken_max_rows` rows: against an exact reference
(quantize_rows' codes, int64 sums, epilogue_), and on VNNI CPUs against the three-call path it
replaces there (quantize_rows, oneDNN's GEMM, epilogue_): the same bits, whatever the shape, the
scheme, the batch, the threads and the activations' dtype (float32, bfloat16)."""

from __future__ import annotations

import itertools

import pytest
import torch

from qlin_cli.kernels import KernelChoice, LayerTensors, native, pack, pertoken
from qlin_cli.kernels.onednn import _onednn_missing
from qlin_cli.primitives import choose_qparams, quantize
from qlin_cli.scheme import PER_CHANNEL, PER_TENSOR, LayerScheme

WHY_NOT = pertoken.missing(torch.device("cpu"), torch.float32)
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"pertoken: {WHY_NOT}")
ONEDNN_WHY_NOT = _onednn_missing(torch.device("cpu"), torch.float32)
needs_onednn = pytest.mark.skipif(ONEDNN_WHY_NOT is not None, reason=f"onednn: {ONEDNN_WHY_NOT}")
KERNELS = native.load()
PATHS = ["pertoken_linear", "_pertoken_linear_scalar"]  # the one that runs here, and the portable one
ROWS = [1, 2, 3, 4, 7, 16, 33, 128]
SHAPES = [(96, 80), (33, 200), (384, 384), (17, 1000), (300, 65), (1, 7)]  # (out, in): in % 64 != 0 mostly


def _layer(n, k, sym=True, smooth=False, bias=True, gran=PER_CHANNEL, seed=0, kernel="pertoken"):
    """A packed per-token layer `(n, k)` with weights over the int8 range (asymmetric: zero points)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.2, 2.0, n)[:, None] / k**0.5
    if not sym:
        w += torch.rand(n, 1, generator=g)  # shifted rows: nonzero zero points
    s, z = choose_qparams(w, gran, sym)
    b = torch.randn(n, generator=g) if bias else None
    sm = torch.rand(k, generator=g) + 0.5 if smooth else None
    return _packed(quantize(w, s, z, sym), s, z, b, sm, kernel)


def _packed(q, s, z, b, smooth=None, kernel="pertoken"):
    """Kernel `kernel` packed for the layer (q, s, z, b), its input divided by `smooth` `(K,)`."""
    scheme = LayerScheme(act_granularity="token", smooth=None if smooth is None else 0.5)
    return pack(KernelChoice(kernel, "test", True, False), LayerTensors(q, s, z, b, smooth=smooth), scheme,
                device="cpu", dtype=torch.float32)


def _reference(run, x):
    """The exact result in torch: quantize_rows' codes, int64 sums (exact; int32 never overflows
    here), float32(sum) * s[n] (oneDNN's one rounding), then epilogue_ (in x's dtype)."""
    host = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    q, a, c, rowsum = KERNELS.quantize_rows(x.to(host).contiguous(), run.smooth)
    acc = (q.long() @ run.weight.long().T).to(torch.int32)
    y = acc.float() * run.scale
    out = torch.empty(y.shape, dtype=torch.bfloat16) if host == torch.bfloat16 else None
    y = KERNELS.epilogue_(y, a, c, run.wsum, run.bias, rowsum, run.zs, out)
    return y.to(x.dtype)


def _inputs(m, k, seed=1):
    """Rows of different ranges, offsets, a constant row and exact ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 5 + torch.randn(m, 1, generator=g)
    if m > 2:
        x[1] = 3.5
        x[2] = torch.arange(k) / max(k - 1, 1) * 255
    return x


def _fused(path, run, x):
    return getattr(KERNELS, path)(x, run.weight, run.scale, run.wsum, run.bias, run.zs, run.smooth, run.wsum_i)


@pytest.mark.parametrize("sym, smooth, bias", list(itertools.product([True, False], repeat=3)))
def test_one_call_is_the_exact_reference_bit_for_bit(sym, smooth, bias):
    """Both compiled paths, at every row count, against the exact reference on the same rows:
    same codes, same int32 sums, same float operations."""
    for n, k in SHAPES:
        run = _layer(n, k, sym, smooth, bias, seed=n + k)
        assert not sym == bool(run.zs.numel())  # asymmetric weights take the zero-point term
        for m in ROWS:
            x = _inputs(m, k, seed=m)
            expect = _reference(run, x)
            assert torch.equal(run(x), expect), (n, k, m)
            if m <= 33:  # the scalar path is slow
                assert torch.equal(_fused("_pertoken_linear_scalar", run, x), expect), (n, k, m)


@needs_onednn
@pytest.mark.parametrize("sym, smooth", list(itertools.product([True, False], repeat=2)))
def test_onednn_three_calls_are_the_one_call_bit_for_bit(sym, smooth):
    """On VNNI CPUs, `onednn` runs the one call up to max_rows rows and quantize_rows + oneDNN's
    GEMM + epilogue_ above: both are the exact reference."""
    for n, k in SHAPES:
        run = _layer(n, k, sym, smooth, seed=n + k, kernel="onednn")
        for m in ROWS:
            x = _inputs(m, k, seed=m)
            expect = run._three_calls(x)
            assert torch.equal(run(x), expect) and torch.equal(_reference(run, x), expect), (n, k, m)
            for path in PATHS:
                assert torch.equal(_fused(path, run, x), expect), (path, n, k, m)


def test_per_tensor_weights():
    run = _layer(40, 130, sym=False, gran=PER_TENSOR)
    x = _inputs(5, 130)
    for path in PATHS:
        assert torch.equal(_fused(path, run, x), _reference(run, x))


@pytest.mark.parametrize("w", [127, -128])
def test_sums_past_float32s_integers(w):
    """Codes of 255 times weights of 127 (or -128) over 4097 inputs: int32 sums of ~1.3e8, past
    2**24, where the conversion to float32 rounds; both paths round them alike."""
    k = 4097
    q = torch.full((33, k), w, dtype=torch.int8)
    q[1, ::3] = 0
    s, z = torch.rand(33) * 1e-2 + 1e-3, torch.zeros(33, dtype=torch.int8)
    z[::2] = 5
    run = _packed(q, s, z, torch.randn(33))
    x = torch.full((3, k), 7.0)
    x[:, 0] = -1.0  # every other code is 255
    x[1, 5::7] = 3.3
    for path in PATHS:
        assert torch.equal(_fused(path, run, x), _reference(run, x))


@pytest.mark.parametrize("sym", [True, False])
def test_the_row_sum_path_at_one_to_four_rows_is_the_exact_reference(sym):
    """The AVX2 row-sum tiles (vpmaddubsw on codes shifted by 128, plus 128 times the weight's
    integer row sums `wsum_i`) against the exact reference and the paths without row sums (the
    vpmaddwd tiles), at 1 to 4 rows (and 5, 7: one-row tiles after the 4- and 2-row ones; the
    weight rows' count N not a multiple of the tiles' 8, 4 or 2), inputs of K = 1 to 1000
    (below, at and past its 32-wide step), float32 and bfloat16 rows, symmetric and
    asymmetric weights (their extremes, 127 and -127, included; -128 takes no row sums)."""
    for n, k in [(9, 1), (8, 31), (17, 32), (23, 33), (24, 64), (40, 65), (33, 127), (70, 200), (25, 1000)]:
        run = _layer(n, k, sym, bias=n % 2 == 1, seed=n * k)
        run.weight.clamp_(-127, 127)  # an asymmetric weight's -128s (they take no row sums: below)
        run.weight[0, : (k + 1) // 2] = 127
        run.weight[-1, ::2] = -127
        run = _packed(run.weight, run.scale, torch.zeros(n, dtype=torch.int8) if sym else torch.full((n,), 3, dtype=torch.int8),
                      None if n % 2 == 0 else run.bias)
        assert run.wsum_i.dtype == torch.int32 and torch.equal(run.wsum_i, run.weight.sum(1, dtype=torch.int32))
        none = torch.empty(0, dtype=torch.int32)
        for m in (1, 2, 3, 4, 5, 7):
            for x in (_inputs(m, k, seed=m + k), _inputs(m, k, seed=m + k).bfloat16()):
                expect = _reference(run, x)
                for path in PATHS:
                    got = _fused(path, run, x)
                    without = getattr(KERNELS, path)(x, run.weight, run.scale, run.wsum, run.bias, run.zs, run.smooth,
                                                     none)
                    assert torch.equal(got.view(torch.int16) if x.dtype == torch.bfloat16 else got,
                                       expect.view(torch.int16) if x.dtype == torch.bfloat16 else expect), (path, n, k, m)
                    assert torch.equal(got, without), (path, n, k, m)


def test_weights_holding_minus_128_take_no_row_sums():
    """vpmaddubsw's sign trick negates the weight, which -128 does not survive: a weight that
    holds -128 (asymmetric 8-bit weights may) runs without row sums, and exactly."""
    q = torch.randint(-127, 128, (40, 100), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    q[5, 7] = -128
    run = _packed(q, torch.rand(40) * 1e-2 + 1e-3, torch.full((40,), -2, dtype=torch.int8), None)
    assert run.wsum_i.numel() == 0
    q[5, 7] = -127
    assert _packed(q, run.scale, torch.zeros(40, dtype=torch.int8), None).wsum_i.numel() == 40
    for m in (1, 3):
        x = _inputs(m, 100, seed=m)
        assert torch.equal(run(x), _reference(run, x))


@pytest.mark.parametrize("m", [16, 33, 128])
def test_a_row_is_the_same_alone_and_in_any_batch(m):
    """Batch invariance: each row alone, in blocks of the kernel's tile sizes, and in the whole
    batch (for `onednn` on VNNI CPUs, the oneDNN path above max_rows)."""
    for kernel in ("pertoken",) + (("onednn",) if ONEDNN_WHY_NOT is None else ()):
        run = _layer(77, 300, sym=False, smooth=True, seed=5, kernel=kernel)
        x = _inputs(m, 300, seed=6)
        full = run(x)
        for i in range(m):
            assert torch.equal(run(x[i : i + 1]), full[i : i + 1]), (kernel, i)
        for i in range(0, m - 3, 5):
            assert torch.equal(run(x[i : i + 3]), full[i : i + 3]), (kernel, i)


def test_the_thread_count_changes_no_result():
    """A layer large enough to be split over threads (1 or 16 x 1000 x 1000 multiply-adds, in
    chunks the threads take in turn) gives the same bits on 1 thread and on 2."""
    for run in (_layer(1000, 1000, sym=False, seed=7), _layer(1000, 1000, seed=7)):
        for m in (1, 16):  # one row: the row-sum tile where weights are symmetric
            x = _inputs(m, 1000, seed=8)
            threads = torch.get_num_threads()
            try:
                torch.set_num_threads(1)
                one = run(x)
                torch.set_num_threads(2)
                two = run(x)
            finally:
                torch.set_num_threads(threads)
            assert torch.equal(one, two)
            assert torch.equal(one, _reference(run, x))


@pytest.mark.parametrize("m", [1, 16, 40])
def test_bfloat16_rows_in_and_out_without_conversions(m):
    """bf16 in, bf16 out: the codes of the rows' float32 values and the float32 result rounded
    as `.to(torch.bfloat16)` rounds, bit for bit, on every path (one call, the scalar path, and
    on VNNI CPUs oneDNN's three calls, whose epilogue writes bf16)."""
    x = _inputs(m, 70).bfloat16()
    for kernel in ("pertoken",) + (("onednn",) if ONEDNN_WHY_NOT is None else ()):
        run = _layer(50, 70, seed=9, smooth=True, kernel=kernel)
        y = run(x)
        expect = run(x.float()).bfloat16()
        assert y.dtype == torch.bfloat16 and torch.equal(y.view(torch.int16), expect.view(torch.int16)), kernel
        assert torch.equal(_reference(run, x).view(torch.int16), expect.view(torch.int16))
        for path in PATHS:
            assert torch.equal(_fused(path, run, x).view(torch.int16), expect.view(torch.int16)), path


def test_bfloat16_output_rounds_as_torch_rounds():
    """The epilogue's float32 -> bf16 rounding on ties, subnormals, infinities and NaN is
    `Tensor.to(torch.bfloat16)`'s, on the vector body and the scalar tail (N = 18)."""
    v = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40, 1.00390625, 1.01171875, 3.0e38,
                      -3.4e38] * 2)
    n = v.numel()
    y, one, zero, none = v.reshape(1, n), torch.ones(1), torch.zeros(1), torch.empty(0)
    out = torch.empty(1, n, dtype=torch.bfloat16)
    KERNELS.epilogue_(y.clone(), one, zero, torch.zeros(n), none, zero, none, out)
    expect = KERNELS.epilogue_(y.clone(), one, zero, torch.zeros(n), none, zero, none, None).bfloat16()
    assert torch.equal(out.view(torch.int16), expect.view(torch.int16))


def test_inputs_of_other_dtypes_and_layouts():
    """float16 in, float16 out (computed in float32); a non-contiguous input; no rows."""
    run = _layer(50, 70, seed=9)
    x = _inputs(6, 70)
    xh = x.half()
    y = run(xh)
    assert y.dtype == torch.float16 and torch.equal(y, run(xh.float()).half())
    xt = torch.cat([x, x], dim=1)[:, ::2]  # (6, 70) with stride 2
    assert not xt.is_contiguous() and torch.equal(run(xt), run(xt.contiguous()))
    assert run(torch.empty(0, 70)).shape == (0, 50)


def test_a_buffer_refilled_through_numpy_is_quantized_again():
    """No codes are cached: a tensor changed behind torch's back (same address, shape, strides
    and version) gives the new result."""
    runs = [_layer(64, 48, seed=i) for i in range(3)]
    buf = _inputs(10, 48)
    before = [run(buf) for run in runs]
    buf.numpy()[:] *= 3
    for run, old in zip(runs, before):
        new = run(buf)
        assert not torch.equal(new, old) and torch.equal(new, _reference(run, buf.clone()))


def test_bad_operands_are_refused():
    run = _layer(32, 64)
    x = _inputs(4, 64)
    args = [run.weight, run.scale, run.wsum, run.bias, run.zs, run.smooth, run.wsum_i]
    cases = [
        ((x[:, :60], *args), "w must be contiguous int8"),
        ((x, run.weight.float(), *args[1:]), "w must be contiguous int8"),
        ((x, run.weight, run.scale[:5], *args[2:]), "must be contiguous float32"),
        ((x, *args[:3], torch.ones(3), *args[4:]), "must be contiguous float32"),
        ((x, *args[:5], torch.ones(3), args[6]), "smooth must be contiguous float32"),
        ((x, *args[:6], run.wsum_i[:5]), "wsum_i must be contiguous int32"),
        ((x, *args[:6], run.wsum_i.float()), "wsum_i must be contiguous int32"),
    ]
    for path in PATHS:
        for case, message in cases:
            with pytest.raises(RuntimeError, match=message):
                getattr(KERNELS, path)(*case)


# ----------------------------------------------------------------------------- static activations

STATIC_PATHS = ["static_linear", "_static_linear_scalar"]


def _static_from(q, s, z, b, s_x, z_x, smooth=None):
    """The static layer (q, s, z, b), activations (s_x, z_x), packed for `pertoken`
    (static_linear) and for `int_mm` (torch's `_int_mm`: the bits the static kernel must give)."""
    layer = LayerTensors(q, s, z, b, input_qparams=(torch.tensor(s_x), torch.tensor(z_x, dtype=torch.int8)),
                         smooth=smooth)
    scheme = LayerScheme(mode="static", act_granularity="tensor", smooth=None if smooth is None else 0.5)
    return [pack(KernelChoice(name, "test", True, False), layer, scheme, device="cpu", dtype=torch.float32)
            for name in ("pertoken", "int_mm")]


def _static_pair(n, k, sym=True, smooth=False, bias=True, z_x=0, s_x=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    if not sym:
        w += torch.rand(n, 1, generator=g)
    s, z = choose_qparams(w, PER_CHANNEL, sym)
    b = torch.randn(n, generator=g) if bias else None
    sm = torch.rand(k, generator=g) + 0.5 if smooth else None
    return _static_from(quantize(w, s, z, sym), s, z, b, s_x, z_x, sm)


def _static_inputs(m, k, seed=1):
    """Values past the int8 range both ways, exact .5 ties of x / s_x, a NaN and infinities."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 4
    if m > 2:
        x[1, : min(k, 40)] = torch.arange(min(k, 40)) * 0.025 - 0.5  # multiples of s_x / 2: ties
        x[2, 0] = float("nan")
        x[2, -1] = float("inf")
        x[0, k // 2] = -float("inf")
    return x


def _static_fused(path, run, x):
    return getattr(KERNELS, path)(x, run.weight, run.out_scale, run.corr, run.zw, run.bias, run.divisor,
                                  run.zero_point, run.wsum_i)


@pytest.mark.parametrize("sym, smooth, bias", list(itertools.product([True, False], repeat=3)))
@pytest.mark.parametrize("z_x", [0, -7, 100])
def test_static_layers_give_int_mms_bits(sym, smooth, bias, z_x):
    """Static activations through qlin's GEMM (the path built here, and the portable one) are the
    int_mm kernel's codes, integers and roundings: its result bit for bit, at every shape and row
    count (the AVX2 tiles with row sums included), with NaN, infinities and ties."""
    for n, k in SHAPES:
        run, ref = _static_pair(n, k, sym, smooth, bias, z_x, seed=n + k)
        assert bool(run.zw.numel()) == (not sym) and (run.wsum_i.numel() or not sym)  # symmetric: no -128
        for m in ROWS:
            x = _static_inputs(m, k, seed=m)
            expect = ref(x)
            assert not expect.isnan().any()  # a NaN input is code 0, as torch converts it
            assert torch.equal(run(x), expect), (n, k, m)
            if m <= 33:
                assert torch.equal(_static_fused("_static_linear_scalar", run, x), expect), (n, k, m)


def test_static_sums_past_float32s_integers_and_int8s_ends():
    """Codes at both ends of int8 (z_x = -128) times weights holding -128 (so no row-sum tile)
    over 4097 inputs, with zero points: sums past 2**24 that both kernels round alike; and each
    row alone gives the bits it has in the batch."""
    k = 4097
    q = torch.full((33, k), 127, dtype=torch.int8)
    q[0] = -128
    q[1, ::3] = 0
    s, z = torch.rand(33) * 1e-2 + 1e-3, torch.zeros(33, dtype=torch.int8)
    z[::2] = 5
    run, ref = _static_from(q, s, z, torch.randn(33), 1e-3, -128)
    assert not run.wsum_i.numel() and run.zw.numel()
    x = torch.full((5, k), 7.0)
    x[1, ::3] = -7.0
    x[3] = 0.0
    full = ref(x)
    for path in STATIC_PATHS:
        assert torch.equal(_static_fused(path, run, x), full), path
    for i in range(5):
        assert torch.equal(run(x[i : i + 1]), full[i : i + 1]), i


@pytest.mark.parametrize("m", [1, 40])
def test_static_bfloat16_and_other_inputs(m):
    """bf16 rows in, bf16 out (int_mm computes in float32 and rounds with .to); float16 in,
    float16 out; a strided input; no rows; the thread count changes no bit."""
    run, ref = _static_pair(50, 1000, smooth=True, z_x=3, seed=4)
    x = _static_inputs(m, 1000)
    xb = x.bfloat16()
    y = run(xb)
    assert y.dtype == torch.bfloat16 and torch.equal(y.view(torch.int16), ref(xb).view(torch.int16))
    assert torch.equal(run(x.half()), ref(x.half()))
    xt = torch.cat([x, x], dim=1)[:, ::2]
    assert torch.equal(run(xt), ref(xt.contiguous()))
    assert run(torch.empty(0, 1000)).shape == (0, 50)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, ref(x))


def test_static_bad_operands_are_refused():
    run, _ = _static_pair(32, 64)
    x = _static_inputs(4, 64)
    args = [run.weight, run.out_scale, run.corr, run.zw, run.bias, run.divisor, run.zero_point, run.wsum_i]
    cases = [
        ((x[:, :60], *args), "x \\(M, K\\) with K < 65536"),
        ((x, *args[:2], run.corr.float(), *args[3:]), "corr and zw must be contiguous int32"),
        ((x, *args[:3], torch.ones(3, dtype=torch.int32), *args[4:]), "corr and zw must be contiguous int32"),
        ((x, *args[:5], torch.ones(3), *args[6:]), "divisor must be contiguous float32"),
        ((x, *args[:6], 128, args[7]), "zero_point must be in"),
        ((x, *args[:4], torch.ones(3), *args[5:]), "must be contiguous float32"),
    ]
    for path in STATIC_PATHS:
        for case, message in cases:
            with pytest.raises(RuntimeError, match=message):
                getattr(KERNELS, path)(*case)
