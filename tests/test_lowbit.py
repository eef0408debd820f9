"""Weight-only linear (int8 per channel, n-bit per group): the 4-bit packing, the kernel's panels
(exact round trip), qlin's C++ kernel (`native_kernels.cpp`, `lowbit_linear`: every instruction
set built here, AVX-512 / AVX2 / scalar, giving the same bits) against a float64 reference, its
batch invariance bit for bit, the torch-op reference path (lowbit.py), and the packed layer's one
copy of the weights with its byte-identical save."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import float16_panels
from qlin_cli.kernels import lowbit, native
from qlin_cli.primitives import half_scales, sqnr_db

KERNELS = native.load()
needs_native = pytest.mark.skipif(
    KERNELS is None or not hasattr(KERNELS, "lowbit_linear"),
    reason=f"qlin's fused kernels are not built here: {native.unavailable_reason()}")


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


# the kernel's panels: the only copy a packed layer holds, rebuilt exactly -------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_a_layer_without_outputs_packs_to_empty_panels(bits):
    from qlin_cli.kernels import lowbit_dynamic

    q, scale = torch.empty(0, 40, dtype=torch.int8), torch.empty(0, 2)
    p = lowbit.to_panels(q, bits, scale, None, 20)
    assert p.codes.shape == (0, 20 if bits == 4 else 40, 16)
    assert [t.shape for t in lowbit.from_panels(p)[:2]] == [(0, 40), (0, 2)]
    d = lowbit_dynamic.to_dot_panels(q, bits, scale, None, 20)
    assert d.codes.shape[0] == 0 and d.wsum.shape == (0,)


@pytest.mark.parametrize("bits,n,k,group,asym,shape", [
    (4, 19, 101, 32, True, "group"), (4, 16, 64, 64, False, "channel"), (3, 5, 7, 3, True, "group"),
    (8, 33, 100, 100, True, "channel"), (8, 17, 9, 9, False, "tensor"), (2, 1, 1, 1, False, "group"),
    (6, 40, 70, 16, True, "group"), (4, 70, 9, 3, True, "group"),
])
def test_panels_round_trip_exactly(bits, n, k, group, asym, shape, monkeypatch):
    monkeypatch.setattr(lowbit, "PACK_WEIGHTS", 100)  # packed in slices of whole panels (one where n <= 16)
    q, scale, zp, _ = _operands(n, k, group, bits, asym, False)
    q = lowbit.unpack_int4(q, k) if bits == 4 else q
    zp = zp if asym else torch.zeros_like(scale, dtype=torch.int8)
    if shape == "channel":
        scale, zp = scale[:, 0].contiguous(), zp[:, 0].contiguous()
    elif shape == "tensor":
        scale, zp = scale[0, 0].clone(), zp[0, 0].clone()
    p = lowbit.to_panels(q, bits, scale, zp, None if shape != "group" else group)
    assert p.codes.shape == (-(-n // 16), (k + 1) // 2 if bits <= 4 else k, 16)
    assert p.codes.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert p.zq.numel() == (p.scale.numel() if asym else 0)
    q2, s2, z2 = lowbit.from_panels(p)
    for a, b in ((q2, q), (s2, scale), (z2, zp)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# the kernel against float64 -------------------------------------------------------------------

PATHS = lowbit.PATHS
BUILT = [p for p in PATHS if KERNELS is not None and p in getattr(KERNELS, "lowbit_paths", ())]


def _run(x, w, bits, scale, zp, group, b, path="scalar"):
    """The kernel on the file's operands (w packed 4-bit or int8 (N, K)), on one built path."""
    q = lowbit.unpack_int4(w, x.shape[1]) if w.dtype == torch.uint8 else w
    p = lowbit.to_panels(q, bits, scale, zp if zp.numel() else None, group)
    return lowbit.panel_linear(x, p, b if b.numel() else None, PATHS[path])


SHAPES = [(128, 32), (128, 64), (256, 128), (96, 96), (100, 32), (1100, 64), (300, 300)]  # (K, G); G = K: per channel
# (300, 300): per channel past one k-block (KC 256 / 128): the unscaled chain stored and reloaded


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("k,group", SHAPES)
def test_kernel_equals_float64_reference_on_every_path(bits, asym, k, group):
    """Every instruction set built here gives the same bits as the scalar path, and those equal
    the float64 reference to float32 rounding; decode (M <= 4) and prefill (M > 4) included."""
    for m, bias in itertools.product([1, 3, 17], [False, True]):
        w, scale, zp, b = _operands(19, k, group, bits, asym, bias, seed=m)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + m))
        y = _run(x, w, bits, scale, zp, group, b)
        assert y.shape == (m, 19) and y.dtype == torch.float32
        _float64_check(x, w, bits, scale, zp, group, b, y)
        for path in BUILT:
            assert torch.equal(_run(x, w, bits, scale, zp, group, b, path), y), path


@needs_native
@pytest.mark.parametrize("bits,asym,group", [(8, False, 300), (8, True, 300), (8, False, 32), (4, False, 32)])
def test_decode_tiles_of_several_panels(bits, asym, group):
    """Decode (M = 1 to 4) over 6 panels (83 rows, the last panel partial), where a tile takes up
    to 4 panels at once (symmetric int8 per channel at 1 and 2 rows on AVX2; every format on
    AVX-512), then the panels left over: every path the scalar path's bits, one thread or two."""
    w, scale, zp, b = _operands(83, 300, group, bits, asym, True, seed=bits + group)
    threads = torch.get_num_threads()
    try:
        for m, t in itertools.product((1, 2, 3, 4), (1, 2)):
            torch.set_num_threads(t)
            x = torch.randn(m, 300, generator=torch.Generator().manual_seed(m))
            y = _run(x, w, bits, scale, zp, group, b)
            _float64_check(x, w, bits, scale, zp, group, b, y)
            for path in BUILT:
                assert torch.equal(_run(x, w, bits, scale, zp, group, b, path), y), (path, m, t)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bits,asym,k,group", [(4, False, 300, 32), (4, True, 1100, 64), (3, True, 101, 7),
                                                (8, False, 300, 300), (8, True, 256, 128)])
def test_float16_scales_are_held_in_two_bytes_with_the_same_bits(bits, asym, k, group):
    """Scales that are all float16 values (qlin's group scales, `half_scales`) are held as
    float16 panels: the round trip gives the file's float32 tensor exactly, the panels are
    smaller, and every path, decode (several panels a tile) and prefill, gives the bits of
    float32 panels of the same values; one scale that is not a float16 value keeps float32."""
    w, scale, zp, b = _operands(83, k, group, bits, asym, True, seed=k)
    scale = half_scales(scale)
    q = lowbit.unpack_int4(w, k) if bits == 4 else w
    p16, p32 = float16_panels(lowbit.to_panels, lowbit.from_panels, q, bits, scale, zp if asym else None, group)
    if KERNELS is None:
        return
    for m in (1, 2, 4, 17):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        y = lowbit.panel_linear(x, p32, b, PATHS["scalar"])
        _float64_check(x, w, bits, scale, zp, group, b, y)
        for path in ("scalar", *BUILT):
            assert torch.equal(lowbit.panel_linear(x, p16, b, PATHS[path]), y), (path, m)


@needs_native
@pytest.mark.parametrize("k,group", [(37, 5), (101, 7), (64, 1), (50, 48), (33, 1000), (1, 1), (1, 32)])
def test_kernel_any_group_size(k, group):
    """Group sizes that are not multiples of 16 (odd group starts in a 4-bit row), one weight per
    group, a group larger than K, K = 1; 17 rows (a partial panel)."""
    for bits, asym in [(4, True), (4, False), (8, True), (3, False), (5, True)]:
        w, scale, zp, b = _operands(17, k, group, bits, asym, True)
        for m in (2, 7):
            x = torch.randn(m, k)
            y = _run(x, w, bits, scale, zp, group, b)
            _float64_check(x, w, bits, scale, zp, group, b, y)
            for path in BUILT:
                assert torch.equal(_run(x, w, bits, scale, zp, group, b, path), y), path


@needs_native
@pytest.mark.parametrize("path", BUILT)
def test_empty_batch_and_empty_k(path):
    w, scale, zp, b = _operands(7, 64, 32, 4, True, True)
    assert _run(torch.empty(0, 64), w, 4, scale, zp, 32, b, path).shape == (0, 7)
    y = _run(torch.empty(3, 0), torch.empty(7, 0, dtype=torch.int8), 8, torch.empty(7, 0),
             torch.empty(0, dtype=torch.int8), 32, b, path)
    assert torch.equal(y, b.expand(3, 7))


@needs_native
@pytest.mark.parametrize("path", BUILT)
@pytest.mark.parametrize("bits,k,group", [(4, 1100, 64), (4, 1029, 100), (8, 1100, 1100), (3, 300, 7)])
def test_batch_invariant_bit_for_bit(path, bits, k, group):
    """A row of y is the same whatever the other rows of x are: 64 rows in one call (prefill's
    buffered path), one at a time, and in batches of 3 and 17: exact equality."""
    w, scale, zp, b = _operands(37, k, group, bits, True, True)
    p = lowbit.to_panels(lowbit.unpack_int4(w, k) if bits == 4 else w, bits, scale, zp, group)
    x = torch.randn(64, k) * torch.rand(64, 1) * 4
    y = lowbit.panel_linear(x, p, b, PATHS[path])
    for size in (1, 3, 17):
        parts = torch.cat([lowbit.panel_linear(x[i : i + size].clone(), p, b, PATHS[path]) for i in range(0, 64, size)])
        assert torch.equal(y, parts), size


@needs_native
def test_thread_count_does_not_change_results():
    w, scale, zp, b = _operands(600, 1100, 64, 4, True, True)
    threads = torch.get_num_threads()
    try:
        for m in (1, 6):
            x = torch.randn(m, 1100)
            torch.set_num_threads(1)
            one = _run(x, w, 4, scale, zp, 64, b, BUILT[-1])
            torch.set_num_threads(max(2, threads))
            assert torch.equal(_run(x, w, 4, scale, zp, 64, b, BUILT[-1]), one)
    finally:
        torch.set_num_threads(threads)


# the reference path ----------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 300), (8, 300), (2, 64)])
def test_reference_path_equals_the_kernel(bits, group):
    w, scale, zp, b = _operands(64, 300, group, bits, True, True)
    x = torch.randn(9, 300)
    native_y = _run(x, w, bits, scale, zp, group, b, BUILT[-1])
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
def test_bad_arguments_raise():
    q, scale, zp, b = _operands(8, 64, 32, 8, True, True)
    p = lowbit.to_panels(q, 8, scale, zp, 32)
    x = torch.randn(2, 64)
    ok = (x, p.codes, p.scale, p.zq, b, 8, 64, 32, 0)

    def args(i, value):
        return ok[:i] + (value,) + ok[i + 1:]

    cases = [
        (args(0, x.double()), "x must be a contiguous float32"),
        (args(0, x.t().contiguous().t()), "x must be a contiguous float32"),
        (args(0, x[:, :63].contiguous()), "x must be a contiguous float32"),
        (args(1, p.codes.float()), "codes must be uint8"),
        (args(1, p.codes[:, :10].contiguous()), "codes must be contiguous panels"),
        (args(2, p.scale[:, :1].contiguous()), "scale must be contiguous float32"),
        (args(2, p.scale.double()), "scale must be contiguous float32"),
        (args(3, p.zq.to(torch.uint8)), "zq must be contiguous int8"),
        (args(4, b[:3]), "bias must be contiguous float32"),
        (args(7, 0), "group_size >= 1"),
        (args(8, 7), "path must be"),
    ]
    for case, message in cases:
        with pytest.raises(RuntimeError, match=message):
            KERNELS.lowbit_linear(*case)
    if "avx512" not in BUILT:
        with pytest.raises(RuntimeError, match="not built for this CPU"):
            KERNELS.lowbit_linear(*args(8, 3))


# the layer: one copy of the weights, byte-identical files -------------------------------------


@needs_native
@pytest.mark.parametrize("keys", [{"mode": "weight-only", "symmetric": False}, {"bits": 4, "group_size": 8},
                                  {"bits": 3, "group_size": 4, "symmetric": False}],
                         ids=["int8-asym", "4bit-g8", "3bit-g4-asym"])
def test_packed_layers_hold_the_weights_once_and_save_the_same_bytes(keys, tmp_path):
    from conftest import load_digits_mlp as load_encoder
    from qlin_cli import QuantConfig, load_quantized, quantize_model, save_quantized
    from qlin_cli.qlinear import QuantizedLinear

    model = load_encoder()
    result = quantize_model(model, QuantConfig(**keys))
    layers = [m for m in result.model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(q.kernel.name in ("weight_only", "lowbit") for q in layers)
    for q in layers:  # the kernel's panels are the only copy; the file's tensors rebuild exactly
        assert not {"weight", "weight_scale", "weight_zero_point"} & set(q._buffers)
        assert q.weight.dtype == torch.int8 and q.weight.shape == (q.out_features, q.in_features)
        assert list(q.state_dict())[:3] == ["weight", "weight_scale", "weight_zero_point"]
        # group scales are float16 values, held as float16 panels; per-channel ones stay float32
        assert q._run.panels.scale.dtype == (torch.float16 if q.scheme.group_size else torch.float32)
    first = save_quantized(result, tmp_path / "a.safetensors")
    loaded = load_quantized(load_encoder(), first)
    again = save_quantized(type(result)(model=loaded, config=result.config, layers=result.layers),
                           tmp_path / "b.safetensors")
    assert first.read_bytes() == again.read_bytes()
    x = torch.randn(5, layers[0].in_features)
    q = layers[0]
    before = q(x)
    q.load_state_dict(q.state_dict())  # loading into a packed layer packs it again
    assert torch.equal(q(x), before) and "weight" not in q._buffers


@needs_native
def test_weight_only_runs_the_panel_kernel_on_cpu_and_torch_without_it(monkeypatch):
    from qlin_cli.kernels import select_kernel
    from qlin_cli.scheme import LayerScheme

    scheme = LayerScheme(mode="weight-only")
    choice = select_kernel(scheme, device="cpu", dtype=torch.float32, in_features=64, out_features=32)
    assert choice.name == "weight_only" and "panel kernel" in choice.reason and choice.batch_invariant
    monkeypatch.setattr(native, "unavailable_reason", lambda: "turned off")
    choice = select_kernel(scheme, device="cpu", dtype=torch.float32, in_features=64, out_features=32)
    assert choice.name == "weight_only" and "_weight_int8pack_mm" in choice.reason
