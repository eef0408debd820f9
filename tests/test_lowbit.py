"""n-bit group-wise weight-only linear: the 4-bit packing, the fused C++ kernel
(`native_kernels.cpp`, `lowbit_linear`, its AVX-512 path and its portable scalar path) against a
float64 reference, its batch invariance, and the torch-op reference path (lowbit.py)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlin_cli.kernels import lowbit, native
from qlin_cli.primitives import sqnr_db

KERNELS = native.load()
needs_native = pytest.mark.skipif(
    KERNELS is None or not hasattr(KERNELS, "lowbit_linear"),
    reason=f"qlin's fused kernels are not built here: {native.unavailable_reason()}")
# both compiled paths: the one lowbit_linear runs (AVX-512 where built with it) and the scalar one
PATHS = ["lowbit_linear", "_lowbit_linear_scalar"]


def _operands(n, k, group, bits, asym, bias, seed=0):
    """Random codes over the whole range, scales, zero points (asymmetric) and bias."""
    g = torch.Generator().manual_seed(seed)
    ngroups = -(-k // group)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    w = lowbit.pack_int4(q) if bits == 4 else q
    scale = torch.rand(n, ngroups, generator=g) * 0.1 + 1e-3
    zp = torch.randint(lo, hi + 1, (n, ngroups), generator=g, dtype=torch.int8) if asym else torch.empty(0, dtype=torch.int8)
    b = torch.randn(n, generator=g) if bias else torch.empty(0)
    return w, scale, zp, b


def _float64_check(x, w, bits, scale, zp, group, b, y):
    """y equals x.double() @ w_deq.double().T (+ b) to float32 rounding, elementwise."""
    k = x.shape[1]
    wd = lowbit.dequantize(w, bits, scale, zp, group, k).double()
    ref = x.double() @ wd.T
    mag = x.double().abs() @ wd.abs().T
    if b.numel():
        ref, mag = ref + b.double(), mag + b.double().abs()
    err = (y.double() - ref).abs()
    assert (err <= 1e-5 * mag + 1e-30).all(), float((err / (mag + 1e-30)).max())


# packing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 7, 100, 101])
def test_pack_unpack_round_trip(k):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-8, 8, (13, k), generator=g, dtype=torch.int8)
    q[0, :] = -8
    q[1, :] = 7
    packed = lowbit.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (13, (k + 1) // 2)
    assert torch.equal(lowbit.unpack_int4(packed, k), q)
    # the documented layout: byte k // 2, low nibble for even k, high for odd k, code q + 8
    codes = (q.to(torch.int16) + 8).to(torch.uint8)
    assert torch.equal(packed & 15, codes[:, 0::2])
    assert torch.equal(packed[:, : k // 2] >> 4, codes[:, 1::2])
    if k % 2:
        assert (packed[:, -1] >> 4 == 0).all()  # the unused last high nibble


def test_pack_rejects_values_out_of_range():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        lowbit.pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        lowbit.pack_int4(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="ceil"):
        lowbit.unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 8)


# the kernel against float64 -------------------------------------------------------------------

SHAPES = [(128, 32), (128, 64), (256, 128), (96, 96), (100, 32), (1100, 64)]  # (K, G); G = K: per channel


@needs_native
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("k,group", SHAPES)
def test_kernel_equals_float64_reference(path, bits, asym, k, group):
    fn = getattr(KERNELS, path)
    for m, bias in itertools.product([1, 3, 17], [False, True]):
        w, scale, zp, b = _operands(19, k, group, bits, asym, bias, seed=m)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + m))
        y = fn(x, w, bits, scale, zp, group, b)
        assert y.shape == (m, 19) and y.dtype == torch.float32
        _float64_check(x, w, bits, scale, zp, group, b, y)


@needs_native
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k,group", [(37, 5), (101, 7), (64, 1), (50, 48), (33, 1000)])
def test_kernel_any_group_size(path, k, group):
    """Group sizes that are not multiples of 16 (odd group starts in a 4-bit row), one weight per
    group, and a group larger than K."""
    fn = getattr(KERNELS, path)
    for bits, asym in [(4, True), (8, True), (3, False)]:
        w, scale, zp, b = _operands(9, k, group, bits, asym, True)
        x = torch.randn(5, k)
        _float64_check(x, w, bits, scale, zp, group, b, fn(x, w, bits, scale, zp, group, b))


@needs_native
@pytest.mark.parametrize("path", PATHS)
def test_empty_batch_and_empty_k(path):
    fn = getattr(KERNELS, path)
    w, scale, zp, b = _operands(7, 64, 32, 4, True, True)
    assert fn(torch.empty(0, 64), w, 4, scale, zp, 32, b).shape == (0, 7)
    y = fn(torch.empty(3, 0), torch.empty(7, 0, dtype=torch.uint8), 4, torch.empty(7, 0),
           torch.empty(0, dtype=torch.int8), 32, b)
    assert torch.equal(y, b.expand(3, 7))


@needs_native
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits,k,group", [(4, 1100, 64), (4, 1029, 100), (8, 1100, 1100)])
def test_batch_invariant_bit_for_bit(path, bits, k, group):
    """A row of y is the same whatever the other rows of x are (the same M rows computed in one
    call, one at a time and in batches of other sizes): exact equality."""
    fn = getattr(KERNELS, path)
    w, scale, zp, b = _operands(37, k, group, bits, True, True)
    x = torch.randn(23, k) * torch.rand(23, 1) * 4
    y = fn(x, w, bits, scale, zp, group, b)
    one = torch.cat([fn(x[i : i + 1].clone(), w, bits, scale, zp, group, b) for i in range(23)])
    assert torch.equal(y, one)
    parts = torch.cat([fn(x[i : i + 5].clone(), w, bits, scale, zp, group, b) for i in range(0, 23, 5)])
    assert torch.equal(y, parts)


@needs_native
def test_thread_count_does_not_change_results():
    w, scale, zp, b = _operands(600, 1100, 64, 4, True, True)
    x = torch.randn(6, 1100)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = KERNELS.lowbit_linear(x, w, 4, scale, zp, 64, b)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(KERNELS.lowbit_linear(x, w, 4, scale, zp, 64, b), one)
    finally:
        torch.set_num_threads(threads)


# the reference path ----------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 300), (8, 300), (2, 64)])
def test_reference_path_equals_the_kernel(bits, group):
    w, scale, zp, b = _operands(64, 300, group, bits, True, True)
    x = torch.randn(9, 300)
    native_y = KERNELS.lowbit_linear(x, w, bits, scale, zp, group, b)
    reference = lowbit.lowbit_linear_reference(x, w, bits, scale, zp, group, b)
    assert sqnr_db(reference, native_y) > 100
    assert torch.equal(lowbit.lowbit_linear(x, w, bits, scale, zp, group, b), native_y)


def test_lowbit_linear_without_a_compiler_runs_the_reference(monkeypatch):
    monkeypatch.setattr(native, "load", lambda: None)
    w, scale, _, _ = _operands(16, 70, 32, 4, False, False)
    x = torch.randn(3, 70)
    y = lowbit.lowbit_linear(x, w, 4, scale, None, 32, None)
    assert torch.equal(y, lowbit.lowbit_linear_reference(x, w, 4, scale, None, 32, None))
    _float64_check(x, w, 4, scale, torch.empty(0, dtype=torch.int8), 32, torch.empty(0), y)


# bad arguments: a clear error from C++, never a crash -----------------------------------------


@needs_native
@pytest.mark.parametrize("path", PATHS)
def test_bad_arguments_raise(path):
    fn = getattr(KERNELS, path)
    w, scale, zp, b = _operands(8, 64, 32, 4, True, True)
    x = torch.randn(2, 64)
    cases = [
        ((x.double(), w, 4, scale, zp, 32, b), "x must be a contiguous float32"),
        ((x.t(), w, 4, scale, zp, 32, b), "x must be a contiguous float32"),
        ((x[0], w, 4, scale, zp, 32, b), "x must be a contiguous float32"),
        ((x, w[:, :31].contiguous(), 4, scale, zp, 32, b), r"ceil\(K/2\)"),
        ((x, w, 8, scale, zp, 32, b), "bits=4"),
        ((x, w.to(torch.int8), 4, scale, zp, 32, b), r"int8 w must be \(N, K\)"),
        ((x, w.float(), 4, scale, zp, 32, b), "uint8 \\(packed 4-bit\\) or int8"),
        ((x, torch.zeros(8, 64, dtype=torch.int8), 9, scale, zp, 32, b), "bits must be in 2..8"),
        ((x, w, 4, scale[:, :1].contiguous(), zp, 32, b), "scale must be contiguous float32"),
        ((x, w, 4, scale.double(), zp, 32, b), "scale must be contiguous float32"),
        ((x, w, 4, scale, zp.to(torch.uint8), 32, b), "zero_point must be contiguous int8"),
        ((x, w, 4, scale, zp, 0, b), "group_size must be >= 1"),
        ((x, w, 4, scale, zp, 32, b[:3]), "bias must be contiguous float32"),
        ((x, w, 4, scale, zp, 32, b.double()), "bias must be contiguous float32"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            fn(*args)


# the build without AVX-512 ----------------------------------------------------------------------

_NO_AVX512_RUNNER = """
import os, sys
from qlin_cli.kernels import native
native.CFLAGS = native.CFLAGS + ("-mno-avx512f",)
kernels = native.load()
assert kernels is not None and kernels.lowbit_avx512 is False, native.unavailable_reason()
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", sys.argv[1]]))
"""


@pytest.mark.skipif(os.environ.get("QLIN_TEST_NO_AVX512_BUILD") != "1",
                    reason="builds the kernels a second time (~30-60 s): set QLIN_TEST_NO_AVX512_BUILD=1")
def test_the_build_without_avx512_passes_this_file(tmp_path):
    """The module as a CPU without AVX-512 gets it (-mno-avx512f: the scalar path is what
    lowbit_linear runs) passes every test above."""
    env = {k: v for k, v in os.environ.items() if k != "QLIN_TEST_NO_AVX512_BUILD"}
    env["QLIN_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", _NO_AVX512_RUNNER, __file__], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
