"""`lowbit`: n-bit group-wise weight-only linear: the 4-bit packing, the reference math, the entry
point that runs qlin's fused C++ kernel (`native_kernels.cpp`, `lowbit_linear`) where it is built,
and the kernel `lowbit` (CPU; `auto`'s choice there for grouped or 4-bit weights).

Weights: q (N, K) integers of B bits (2 <= B <= 8), one scale (and zero point) per group of G
consecutive input channels of a row; ngroups = ceil(K / G), the last group may be shorter, and
G = K is per channel:

    w[n, k] = float32(q[n, k] - z[n, k // G]) * scale[n, k // G]     (N, K)
    y = x @ w.T + bias                                                (M, K) -> (M, N)

4-bit layout (`pack_int4`): uint8 (N, ceil(K/2)); element k of row n is in byte k // 2, in the
low nibble for even k and the high nibble for odd k; a nibble holds q + 8 (offset binary, q in
[-8, 7]); with odd K the last high nibble of each row is 0 and unused. Other widths are int8
(N, K) holding q.

`lowbit_linear_reference` is the same math in torch ops (dequantize, then F.linear), so qlin
runs without a compiler; the fused kernel equals it to float32 rounding (its summation order
differs, and per channel it applies the scale once to each output) and is batch invariant: a row
of y depends on its row of x only, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import primitives
from ..primitives import packed_row_bytes
from . import native
from .registry import Kernel, KernelChoice, low_bit_layer

__all__ = [
    "pack_bits", "unpack_bits", "pack_int4", "unpack_int4", "dequantize", "lowbit_linear_reference", "Panels",
    "to_panels", "from_panels", "panel_linear", "lowbit_linear", "KERNEL", "PATHS",
]

_EMPTY_F32 = torch.empty(0)
_EMPTY_I8 = torch.empty(0, dtype=torch.int8)


_PACK_BLOCK = 1 << 22  # values per block of rows while packing: temporaries stay a few tens of MB


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 B-bit values `(N, K)` -> uint8 `(N, ceil(K * B / 8))` in the layout of qfile.py's
    docstring. Exact; `unpack_bits` inverts it. Eight values at a time fill B bytes (an int64
    of 8 * B bits, least significant first), so no per-bit temporaries."""
    n, k = q.shape
    nbytes = packed_row_bytes(k, bits)
    out = torch.empty(n, nbytes, dtype=torch.uint8)
    value_shifts = torch.arange(8, dtype=torch.int64) * bits  # value j of 8 at bit j * B
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    step = max(1, _PACK_BLOCK // max(1, k))
    if 8 % bits == 0 and bits < 8:  # 2 and 4 bits: whole values per byte, in uint8
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8) * bits
        for i in range(0, n, step):
            u = (q[i:i + step].to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
            u = torch.nn.functional.pad(u, (0, -k % per)).reshape(u.shape[0], nbytes, per)
            byte = u[..., 0].clone()
            for j in range(1, per):
                byte |= u[..., j] << int(shifts[j])
            out[i:i + step] = byte
        return out
    for i in range(0, n, step):
        u = q[i:i + step].to(torch.int64) + (1 << (bits - 1))  # (r, K) in [0, 2^B)
        u = torch.nn.functional.pad(u, (0, -k % 8)).reshape(u.shape[0], -1, 8)  # (r, K8, 8)
        word = (u << value_shifts).sum(-1, keepdim=True)  # (r, K8, 1): 8 * B bits
        packed = ((word >> byte_shifts) & 0xFF).reshape(u.shape[0], -1)  # (r, K8 * B)
        out[i:i + step] = packed[:, :nbytes].to(torch.uint8)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 `(N, ceil(K * B / 8))` from `pack_bits` -> int8 values `(N, K)`."""
    n, nbytes = packed.shape
    out = torch.empty(n, k, dtype=torch.int8)
    groups = -(-k // 8)  # 8 values per B bytes
    value_shifts = torch.arange(8, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    mask = (1 << bits) - 1
    step = max(1, _PACK_BLOCK // max(1, k))
    if 8 % bits == 0 and bits < 8:  # 2 and 4 bits: whole values per byte, in uint8
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8) * bits
        for i in range(0, n, step):
            b = packed[i:i + step]
            u = torch.stack([(b >> int(sh)) & mask for sh in shifts], dim=-1).reshape(-1, nbytes * per)[:, :k]
            out[i:i + step] = u.to(torch.int8) - (1 << (bits - 1))
        return out
    for i in range(0, n, step):
        b = packed[i:i + step].to(torch.int64)
        b = torch.nn.functional.pad(b, (0, groups * bits - nbytes)).reshape(b.shape[0], groups, bits)
        word = (b << byte_shifts).sum(-1, keepdim=True)  # (r, groups, 1)
        u = ((word >> value_shifts) & mask).reshape(b.shape[0], -1)[:, :k]
        out[i:i + step] = (u - (1 << (bits - 1))).to(torch.int8)
    return out


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) in [-8, 7] -> uint8 (N, ceil(K/2)), the layout in the module docstring
    (`pack_bits` at 4 bits: the qlin file's layout, so the kernel reads the file's bytes)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int4 takes int8 (N, K) values, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4: values must be in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    return pack_bits(q, 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 (N, ceil(K/2)) -> int8 (N, K) in [-8, 7]: the inverse of `pack_int4`."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4 takes uint8 (N, ceil(K/2)) = (N, {(k + 1) // 2}), "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    return unpack_bits(packed, 4, k)


def dequantize(w: torch.Tensor, bits: int, scale: torch.Tensor, zero_point: torch.Tensor | None,
               group_size: int, k: int) -> torch.Tensor:
    """The float32 weight (N, K) of the reference: float32(q - z) * scale, per group
    (`primitives.dequantize` on the unpacked values); the kernel multiplies by exactly these
    numbers where a row has several groups, and per channel by float32(q - z), scaling the sum."""
    if w.dtype == torch.uint8 and bits != 4 or w.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"w must be uint8 packed 4-bit (bits=4) or int8 (N, K), got {w.dtype} with bits={bits}")
    q = unpack_int4(w, k) if w.dtype == torch.uint8 else w
    zp = torch.zeros(scale.shape, dtype=torch.int8) if zero_point is None or not zero_point.numel() else zero_point
    return primitives.dequantize(q, scale, zp, group_size)


def lowbit_linear_reference(x: torch.Tensor, w: torch.Tensor, bits: int, scale: torch.Tensor,
                            zero_point: torch.Tensor | None, group_size: int,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """`lowbit_linear` in torch ops: x (M, K) float32, the operands as in the module docstring
    -> y (M, N) float32."""
    k = x.shape[-1]
    weight = dequantize(w, bits, scale, zero_point, group_size, k)
    return F.linear(x, weight, bias if bias is not None and bias.numel() else None)


PANEL = 16  # output rows per panel of the kernel's layout
# the `path` of lowbit_linear and lowbit_dynamic_linear (0: the best built here) by the names of the
# instruction sets their module lists as built (`lowbit_paths`, `lowbit_dynamic_paths`)
PATHS = {"scalar": 1, "avx2": 2, "avx512": 3, "avx512_vnni": 3}


@dataclass(frozen=True)
class Panels:
    """A weight-only layer's operands in the kernel's layout (`native_kernels.cpp`, lowbit_linear),
    the only copy of the weights a packed layer holds (`to_panels`; `from_panels` gives back the
    file's tensors exactly). P = ceil(N / 16) panels of 16 output rows, k-major:

    - `codes`: for bits <= 4, uint8 (P, ceil(K/2), 16): byte [p, j, r] holds u = q + 8 of row
      16p + r at k = 2j in its low nibble and at k = 2j + 1 in its high one; else int8 (P, K, 16),
      q of row 16p + r at k. Rows past N (and the high nibble past an odd K) hold q = 0.
    - `scale`: (P, ngroups, 16), float16 where every scale is a float16 value (as qlin's group
      scales are, `primitives.half_scales`: 2 bytes a scale instead of 4, the same numbers),
      else float32; `zq`: int8 (P, ngroups, 16), z (+ 8 for nibbles), or empty where every zero
      point is 0.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zq: torch.Tensor
    n: int
    k: int
    group_size: int
    bits: int
    scale_shape: tuple[int, ...]  # the file's scale shape: () per tensor, (N,) per channel, (N, ngroups)

    @property
    def nibbles(self) -> bool:
        return self.bits <= 4

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zq))


def _to_panel_rows(t: torch.Tensor, fill) -> torch.Tensor:
    """(N, C) -> (P, C, 16): rows padded to whole panels with `fill`, then each panel k-major."""
    n, c = t.shape
    pad = -n % PANEL
    if pad:
        t = torch.cat([t, t.new_full((pad, c), fill)])
    return t.reshape(t.shape[0] // PANEL, PANEL, c).transpose(1, 2).contiguous()


def _narrowest(scale: torch.Tensor) -> torch.Tensor:
    """float32 scale panels as float16 where that holds every value exactly, else as they are."""
    half = scale.to(torch.float16)
    return half if torch.equal(half.float(), scale) else scale


def _from_panel_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(P, C, 16) -> (N, C): `_to_panel_rows` undone."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n].contiguous()


PACK_WEIGHTS = 1 << 22  # weights a slice of rows packed at a time holds at least


def pack_slices(n: int, k: int) -> list[slice]:
    """Rows [0, n) in slices of whole panels of at least PACK_WEIGHTS weights: packing a slice at
    a time keeps the temporaries (copies of the codes, int32 group sums) a slice's size (a whole
    32000 x 2048 head took 680 MB beyond its 62 MB of codes). Each slice's result is written
    into one output as it is made (`packed_by_slices`), so the next slice reuses the memory the
    last one freed; 4M weights a slice loaded an 8-layer Llama at 4 bits g32 with a peak of
    0.67-0.69 GB (0.78-0.88 with 16M; 1M: 0.72-0.74) and the fastest (W4A8: 3.7 s against 4.1)."""
    step = -(-PACK_WEIGHTS // max(k, 1) // PANEL) * PANEL
    return [slice(i, i + step) for i in range(0, max(n, 1), step)]  # n = 0: one empty slice


def packed_by_slices(n: int, k: int, pack_rows) -> torch.Tensor:
    """The panels of rows [0, n), `pack_rows(rows)` of each `pack_slices` slice (whole panels),
    written into one tensor as each is made (one slice: its panels themselves). Written, not
    joined at the end: every slice's panels kept alive past its freed temporaries left holes that
    the next slice's temporaries could not reuse (a 4-bit Llama's load peaked at 0.75-1.4 GB,
    from run to run, for 0.5 GB held after it)."""
    out = None
    for rows in pack_slices(n, k):
        part = pack_rows(rows)
        if out is None:
            if rows.stop >= n:
                return part
            out = part.new_empty((-(-n // PANEL), *part.shape[1:]))
        out[rows.start // PANEL: rows.start // PANEL + part.shape[0]] = part
        del part
    return out


def _nibble_panels(q: torch.Tensor) -> torch.Tensor:
    """Rows q (N', K) of 4-bit values as nibble panels (see Panels), rows padded to whole panels."""
    u = (q + 8).view(torch.uint8)  # (N', K) in [0, 15] (q in [-8, 7]: no overflow in int8)
    if q.shape[1] % 2:
        u = torch.cat([u, u.new_full((q.shape[0], 1), 8)], dim=1)
    return _to_panel_rows(u[:, 0::2] | (u[:, 1::2] << 4), 0x88)


def to_panels(q: torch.Tensor, bits: int, scale: torch.Tensor, zero_point: torch.Tensor | None,
              group_size: int | None) -> Panels:
    """The kernel's operands from a layer's stored tensors: q int8 (N, K) B-bit values, scale
    float32 `()`, `(N,)` or `(N, ceil(K / G))`, zero point int8 of the scale's shape (or None);
    group_size None: per channel (or per tensor), G = K."""
    n, k = q.shape
    g = k if group_size is None else group_size
    ngroups = -(-k // g) if k else 0
    shape = (n, ngroups)
    s2 = scale.float().reshape(-1, 1).expand(shape) if scale.dim() < 2 else scale.float()
    zp = torch.zeros((), dtype=torch.int8) if zero_point is None else zero_point
    z2 = zp.reshape(-1, 1).expand(shape) if zp.dim() < 2 else zp
    if bits <= 4:
        codes = packed_by_slices(n, k, lambda rows: _nibble_panels(q[rows]))
    else:
        codes = _to_panel_rows(q.contiguous(), 0)
    zq = (_to_panel_rows(z2.to(torch.int16) + (8 if bits <= 4 else 0), 0).to(torch.int8) if bool(z2.any())
          else _EMPTY_I8)
    return Panels(codes, _narrowest(_to_panel_rows(s2.contiguous(), 0.0)), zq, n, k, g, bits, tuple(scale.shape))


def from_panels(p: Panels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's stored tensors (q int8 (N, K), scale and zero point in their file shapes)
    rebuilt from its panels: exactly the ones `to_panels` took."""
    if p.nibbles:
        b = _from_panel_rows(p.codes, p.n)  # (N, ceil(K/2))
        u = torch.stack([b & 15, b >> 4], dim=-1).reshape(p.n, 2 * b.shape[1])[:, :p.k]
        q = (u.to(torch.int16) - 8).to(torch.int8)
    else:
        q = _from_panel_rows(p.codes, p.n)
    s2 = _from_panel_rows(p.scale.float(), p.n)
    z2 = (_from_panel_rows(p.zq, p.n).to(torch.int16) - (8 if p.nibbles else 0)).to(torch.int8) if p.zq.numel() \
        else torch.zeros(s2.shape, dtype=torch.int8)

    def file_shape(t: torch.Tensor) -> torch.Tensor:
        if len(p.scale_shape) == 2:
            return t
        return t[:, 0].contiguous() if p.scale_shape else t[0, 0].clone()  # per channel, per tensor

    return q, file_shape(s2), file_shape(z2)


def panel_linear(x: torch.Tensor, p: Panels, bias: torch.Tensor | None = None, path: int = 0) -> torch.Tensor:
    """y = x @ dequant(w).T + bias through the native kernel (`native.load()` must have it): x
    float32 (M, K) contiguous -> (M, N). `path`: 0 the best built here; 1 scalar, 2 AVX2, 3
    AVX-512 (tests: the same bits on each)."""
    return native.load().lowbit_linear(x, p.codes, p.scale, p.zq, _EMPTY_F32 if bias is None else bias,
                                       p.n, p.k, p.group_size, path)


def lowbit_linear(x: torch.Tensor, w: torch.Tensor, bits: int, scale: torch.Tensor,
                  zero_point: torch.Tensor | None, group_size: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ dequant(w).T + bias from the file's tensors (packed here on each call: a packed
    layer keeps its `Panels`) through qlin's kernel where it is built (native.py), else through
    `lowbit_linear_reference` (the same results to float rounding).

    x: float32 (M, K) contiguous; w: uint8 (N, ceil(K/2)) packed 4-bit (bits=4) or int8 (N, K);
    scale float32 (N, ngroups); zero_point int8 (N, ngroups) or None/empty; bias float32 (N,) or None.
    """
    kernels = native.load()
    if kernels is None or not hasattr(kernels, "lowbit_linear"):
        return lowbit_linear_reference(x, w, bits, scale, zero_point, group_size, bias)
    q = unpack_int4(w, x.shape[1]) if w.dtype == torch.uint8 else w
    zp = None if zero_point is None or not zero_point.numel() else zero_point
    return panel_linear(x, to_panels(q, bits, scale, zp, group_size), bias if bias is not None and bias.numel() else None)


class _LowBit:
    """qlin's weight-only kernel (`lowbit_linear`): float32 activations times B-bit weights with
    one scale (and zero point) per group of G input channels (per channel: one group of K),
    dequantized on the fly from the kernel's panels (`Panels`: 4-bit and narrower as nibbles,
    wider as int8). Rows are independent.

    One copy: the panels are the only weights it holds; `absorbed` names the layer's tensors it
    took over, and `rebuild(name)` gives each back exactly (QuantizedLinear drops its own copies
    and asks here when saving or reading them)."""

    absorbed = ("weight", "weight_scale", "weight_zero_point")

    def __init__(self, weight, scale, zero_point, bias, dtype, bits: int, group_size: int | None):
        self.kernels = native.load()  # looked up once here, not at each call
        self.panels = to_panels(weight, bits, scale, zero_point, group_size)
        self.bias = _EMPTY_F32 if bias is None else bias.float().contiguous()
        self._zero_point_dtype = zero_point.dtype

    def rebuild(self, name: str) -> torch.Tensor:
        """The layer's tensor `name` (one of `absorbed`), rebuilt exactly from the panels."""
        return dict(zip(self.absorbed, from_panels(self.panels)))[name]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.panels
        y = self.kernels.lowbit_linear(x.float().contiguous(), p.codes, p.scale, p.zq, self.bias, p.n, p.k,
                                       p.group_size, 0)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class _LowBitKernel(Kernel):
    name, activations, rank, low_bit = "lowbit", "float", 40, True

    def refusal(self, scheme, target):
        return "qlin's fused kernels run on CPU only" if target.device.type != "cpu" else native.unavailable_reason()

    def offer(self, scheme, target, why, fallback):
        if fallback or not low_bit_layer(scheme):
            return None
        why_not = self.refusal(scheme, target)
        if why_not is not None:
            return why_not
        group = scheme.group_size
        what = f"{scheme.bits}-bit" + (f" groups of {group}" if group else " per channel"
                                       if scheme.granularity.name == "channel" else " per tensor")
        return KernelChoice(self.name, f"auto: {what}, qlin's panel kernel (batch invariant)", True, False)

    def pack(self, layer, scheme, device, dtype):
        return _LowBit(layer.weight, layer.scale, layer.zero_point, layer.bias, dtype, scheme.bits, scheme.group_size)


KERNEL = _LowBitKernel()
