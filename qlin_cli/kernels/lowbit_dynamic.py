"""`lowbit_dynamic`: grouped B-bit weights (2 <= B <= 8) times per-token int8 activations, with
one exact integer dot product per group ("W4A8" at 4 bits: what llama.cpp's Q4_0 x Q8_0 dot does).
`auto`'s choice for dynamic layers with `group_size`; on CPU it runs qlin's C++ kernel
(`native_kernels.cpp`, `lowbit_dynamic_linear`), elsewhere (CUDA, or no C++ build) the same math
in torch ops.

The activations get the codes of qlin's other per-token layers (`pertoken`, `onednn`:
`quantize_rows`), x[m] ~ a[m] * u[m] + c[m] with u in [0, 255] (SmoothQuant's division first);
the weights are the file's: q `(N, K)` of B bits, scale and zero point `(N, ceil(K / G))`:

    acc[m, n, g] = sum_{k in g} u[m, k] * (q[n, k] - z[n, g])          (int32, exact)
    y[m, n] = a[m] * sum_g s[n, g] * acc[m, n, g] + c[m] * wsum[n] + b[n]
    wsum[n] = sum_k s[n, k // G] * (q[n, k] - z[n, k // G])             (the dequantized row sum)

which is dequant(x) @ dequant(w).T + b. For B <= 4, a pair of products is at most 2 * 255 * 15, so
AVX2's vpmaddubsw (u8 x s8 -> int16 pair sums) is exact: 32 multiply-adds an instruction against
8 for the weight-only kernel's float FMAs. The float operations after the integer sums (one FMA
per group, then the epilogue) are the same on every path, so the scalar, AVX2 and AVX-512 VNNI
paths give the same bits and a row's result never depends on the batch.

`lowbit_dynamic_reference` (the torch path) computes dequant(codes) @ dequant(w).T through
F.linear: equal to the kernel to float rounding, batch-dependent (F.linear blocks by batch size).
On CUDA that is what runs: `torch._int_mm` has no per-group scale, and one int_mm per group would
cost more than the float matmul it replaces.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..primitives import MIN_SCALE
from ..primitives import dequantize as _dequantize
from . import native
from .common import ACCEPTED
from .common import EMPTY as _EMPTY_F32
from .lowbit import PANEL, _from_panel_rows, _narrowest, _to_panel_rows, pack_slices, packed_by_slices
from .pertoken import refuse_tracing
from .registry import Kernel, KernelChoice, Target

__all__ = [
    "DotPanels", "to_dot_panels", "from_dot_panels", "dynamic_codes", "lowbit_dynamic_reference", "MAX_GROUP",
    "isa", "KERNEL",
]

_EMPTY_I8 = torch.empty(0, dtype=torch.int8)
UNIT = 4  # consecutive k of one row that one 32-bit broadcast of codes meets
# fbgemm's reciprocal of its 1/255 scale, in float32 (quantize_rows' INV_S)
_INV_S = torch.tensor(1.0) / torch.tensor(1.0 / 255, dtype=torch.float32)


# the longest group (G, or K per channel) whose int32 sums cannot overflow: G * 255 * (|q| + |zq|)
# < 2^31 with |q| + |zq| <= 272 (lowbit_dynamic_linear checks it too)
MAX_GROUP = (1 << 31) // (255 * 272)


def _layout(k: int, g: int) -> tuple[int, int, int]:
    """(ngroups, units per group UG = ceil(G / 4), units U): a group's k start at its first unit,
    4 to a unit; the rest of its last unit is padding."""
    ngroups = -(-k // g)
    ug = -(-g // UNIT)
    last = k - (ngroups - 1) * g
    return ngroups, ug, (ngroups - 1) * ug + -(-last // UNIT)


@dataclass(frozen=True)
class DotPanels:
    """A dynamic grouped layer's operands in the kernel's layout (native_kernels.cpp,
    `lowbit_dynamic_linear`), the only copy of the weights a packed layer holds (`from_dot_panels`
    gives back the file's tensors exactly). P = ceil(N / 16) panels of 16 output rows, as the
    weight-only kernel's (`lowbit.Panels`), but each group's k in units of 4 (U units; a group of
    G takes ceil(G / 4), padded with q = 0), so that 4 weights of one row sit side by side, as
    vpmaddubsw and vpdpbusd take them:

    - `codes`: bits <= 4: uint8 (P, U, 32), byte 4i + j holding u = q + 8 of row 16p + i (low
      nibble) and of row 16p + 8 + i (high nibble) at the unit's k j; else int8 (P, U, 64), byte
      4r + j = q of row 16p + r at the unit's k j. Rows past N hold q = 0.
    - `scale` (P, ngroups, 16): float16 where every scale is a float16 value (as qlin's grouped
      scales are, `primitives.half_scales`: 2 bytes a scale instead of 4, the same numbers),
      else float32; `zq` int8 (P, ngroups, 16), z (+ 8 for nibbles), or empty where every zero
      point is 0; `wsum` float32 (N,), the dequantized weight's row sums.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zq: torch.Tensor
    wsum: torch.Tensor
    n: int
    k: int
    group_size: int
    bits: int
    scale_shape: tuple[int, ...]  # the file's: (N, ngroups), or () / (N,) run as one group of K

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zq, self.wsum))


def _dot_codes(q: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """The codes of rows q (N', K) as dot panels (see DotPanels), rows padded to whole panels and
    each group's k to whole units of 4 (`_layout`): every group but the last padded at once."""
    n, k = q.shape
    npad = -(-n // PANEL) * PANEL
    ngroups, ug, units = _layout(k, g)
    whole = max(ngroups - 1, 0)  # the groups before the last, each padded to UG units
    head = whole * g
    body = F.pad(q[:, :head].reshape(n, whole, g), (0, ug * UNIT - g)).reshape(n, whole * ug * UNIT)
    last = F.pad(q[:, head:], (0, -(k - head) % UNIT))  # the last group, to whole units
    qp = F.pad(torch.cat([body, last], 1), (0, 0, 0, npad - n))  # rows to whole panels
    qp = qp.reshape(npad // PANEL, PANEL, units, UNIT).transpose(1, 2)  # (P, U, 16, 4)
    if bits <= 4:
        u = (qp + 8).view(torch.uint8)  # in [0, 15] (qp in [-8, 7]: no overflow in int8)
        return (u[:, :, :8] | (u[:, :, 8:] << 4)).reshape(npad // PANEL, units, 32).contiguous()
    return qp.reshape(npad // PANEL, units, 64).contiguous()


def _group_sums(q: torch.Tensor, g: int) -> torch.Tensor:
    """Each row's sum of its codes per group of G (the last group may be shorter), exact int32
    (N, ceil(K / G)): a slice of rows at a time, each written into the result (the cast copy a
    sum makes stays a slice's size and is reused)."""
    n, k = q.shape
    full = k // g
    out = torch.empty(n, -(-k // g), dtype=torch.int32)
    for rows in pack_slices(n, k):
        if full:
            torch.sum(q[rows, :full * g].reshape(-1, full, g), -1, dtype=torch.int32, out=out[rows, :full])
        if k % g:
            torch.sum(q[rows, full * g:], -1, dtype=torch.int32, out=out[rows, full])
    return out


def to_dot_panels(q: torch.Tensor, bits: int, scale: torch.Tensor, zero_point: torch.Tensor | None,
                  group_size: int | None) -> DotPanels:
    """The kernel's operands from a layer's stored tensors: q int8 (N, K) B-bit values, scale
    float32 `(N, ceil(K / G))` (or `()` / `(N,)` with group_size None: one group of K), zero point
    int8 of the scale's shape (or None)."""
    n, k = q.shape
    g = k if group_size is None else group_size
    ngroups = -(-k // g)
    s2 = scale.float().reshape(-1, 1).expand(n, ngroups) if scale.dim() < 2 else scale.float()
    zp = torch.zeros((), dtype=torch.int8) if zero_point is None else zero_point
    z2 = zp.reshape(-1, 1).expand(n, ngroups) if zp.dim() < 2 else zp
    codes = packed_by_slices(n, k, lambda rows: _dot_codes(q[rows], bits, g))
    nibble = 8 if bits <= 4 else 0
    zq = (_to_panel_rows(z2.to(torch.int16) + nibble, 0).to(torch.int8) if bool(z2.any()) else _EMPTY_I8)
    # wsum: each group's exact integer sum times its scale, summed in float64, rounded once
    lengths = torch.full((ngroups,), g, dtype=torch.int64)
    lengths[-1] = k - (ngroups - 1) * g
    sums = _group_sums(q, g).to(torch.int64) - lengths * z2.to(torch.int64)
    wsum = (sums.double() * s2.double()).sum(1).float()
    return DotPanels(codes, _narrowest(_to_panel_rows(s2.contiguous(), 0.0)), zq, wsum, n, k, g, bits,
                     tuple(scale.shape))


def from_dot_panels(p: DotPanels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's stored tensors (q int8 (N, K), scale and zero point in their file shapes) rebuilt
    exactly from its panels."""
    _, ug, units = _layout(p.k, p.group_size)
    ks = torch.arange(p.k)
    pos = (ks // p.group_size) * ug * UNIT + ks % p.group_size  # where each k sits among the units' k
    npan = p.codes.shape[0]
    if p.bits <= 4:
        b = p.codes.reshape(npan, units, 8, UNIT)
        u = torch.cat([b & 15, b >> 4], dim=2)  # (P, U, 16, 4)
        qp = u.view(torch.int8) - 8  # in [-8, 7] (u in [0, 15])
    else:
        qp = p.codes.reshape(npan, units, PANEL, UNIT)
    q = qp.transpose(1, 2).reshape(npan * PANEL, units * UNIT)[:p.n, pos].contiguous()
    s2 = _from_panel_rows(p.scale.float(), p.n)
    nibble = 8 if p.bits <= 4 else 0
    z2 = ((_from_panel_rows(p.zq, p.n).to(torch.int16) - nibble).to(torch.int8) if p.zq.numel()
          else torch.zeros(s2.shape, dtype=torch.int8))

    def file_shape(t: torch.Tensor) -> torch.Tensor:
        if len(p.scale_shape) == 2:
            return t
        return t[:, 0].contiguous() if p.scale_shape else t[0, 0].clone()  # per channel, per tensor

    return q, file_shape(s2), file_shape(z2)


def dynamic_codes(x: torch.Tensor, smooth: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_rows`' codes in torch ops, code for code: x `(M, K)` (divided by `smooth` `(K,)`
    first) -> u float32 `(M, K)` holding integers in [0, 255], a and c `(M, 1)` (x ~ a * u + c)."""
    xs = x.float() if smooth is None else x.float() / smooth.float()
    lo = xs.amin(1, keepdim=True)
    width = (xs.amax(1, keepdim=True) - lo).clamp_min(MIN_SCALE)
    u = ((xs - lo) * width.reciprocal() * _INV_S).round_().clamp_(0, 255)
    return u, width / 255, lo


def lowbit_dynamic_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                             group_size: int | None, bias: torch.Tensor | None = None,
                             smooth: torch.Tensor | None = None) -> torch.Tensor:
    """The layer in torch ops: dequantized activation codes times the dequantized weight through
    F.linear, float32 `(M, K)` -> `(M, N)`; equal to the kernel to float rounding."""
    u, a, c = dynamic_codes(x, smooth)
    w = _dequantize(q, scale, zero_point, group_size)
    return F.linear(u * a + c, w, None if bias is None else bias.float())


def isa() -> str | None:
    """The instruction set `lowbit_dynamic_linear` runs here ("avx512_vnni", "avx2", "scalar"), or
    None without the native kernels."""
    kernels = native.load()
    return None if kernels is None else kernels.lowbit_dynamic_paths[-1]


class _LowBitDynamic:
    """The C++ kernel on the layer's `DotPanels` (one copy: `absorbed` names the layer's tensors
    they hold, `rebuild` gives each back exactly), float32 or bfloat16 activations read and
    written as they are (float16: converted to float32 and the result rounded back)."""

    absorbed = ("weight", "weight_scale", "weight_zero_point")

    def __init__(self, weight, scale, zero_point, bias, smooth, bits: int, group_size: int | None):
        self.panels = to_dot_panels(weight, bits, scale, zero_point, group_size)
        self.bias = _EMPTY_F32 if bias is None else bias.float().contiguous()
        self.smooth = _EMPTY_F32 if smooth is None else smooth.float().contiguous()
        self.linear = native.load().lowbit_dynamic_linear  # looked up once here

    def __deepcopy__(self, memo) -> "_LowBitDynamic":
        return copy.copy(self)  # its tensors are never written

    def rebuild(self, name: str) -> torch.Tensor:
        return dict(zip(self.absorbed, from_dot_panels(self.panels)))[name]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        refuse_tracing()
        p = self.panels
        return self.linear(x, p.codes, p.scale, p.zq, p.wsum, self.bias, self.smooth, p.n, p.k, p.group_size, 0)


class _Reference:
    """`lowbit_dynamic_reference` with the dequantized weight kept (CUDA, or no C++ build here)."""

    def __init__(self, weight, scale, zero_point, bias, smooth, group_size: int | None):
        self.weight = _dequantize(weight, scale, zero_point, group_size)
        self.bias = None if bias is None else bias.float()
        self.smooth = smooth

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u, a, c = dynamic_codes(x, self.smooth)
        y = F.linear(u.mul_(a).add_(c), self.weight, self.bias)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def _native_missing(scheme, target) -> str | None:
    """Why the C++ kernel cannot run this layer here (the torch path runs it), or None."""
    if target.device.type != "cpu":
        return f"qlin's C++ kernels run on CPU only (torch._int_mm has no per-group scale on {target.device.type})"
    if target.dtype not in ACCEPTED:
        return f"qlin's kernel takes float32, bfloat16 or float16 activations, not {target.dtype}"
    if min(scheme.group_size or target.in_features, target.in_features) > MAX_GROUP:
        return f"groups of more than {MAX_GROUP} inputs could overflow its int32 sums"
    return native.unavailable_reason()


class _LowBitDynamicKernel(Kernel):
    name, activations, rank = "lowbit_dynamic", "int8", 17
    grouped_int8 = True

    def scheme_problem(self, scheme):
        if scheme.mode != "dynamic" or str(scheme.act_granularity) == "tensor":
            return "kernel 'lowbit_dynamic' runs dynamic layers with per-token activations only"
        return None

    def _choice(self, scheme, target, said: str) -> KernelChoice:
        why = _native_missing(scheme, target)
        if why is None:
            return KernelChoice(self.name, f"{said}, qlin's {isa()} integer dot per group (batch invariant)", True, False)
        return KernelChoice(self.name, f"fallback: {why}; dequantized activations x dequantized weights (F.linear)",
                            False, True)

    def requested(self, scheme, target):
        return self._choice(scheme, target, "requested")

    def offer(self, scheme, target, why, fallback):
        if fallback or scheme.group_size is None:
            return None
        return self._choice(scheme, target, f"auto: {scheme.bits}-bit groups of {scheme.group_size} x per-token int8")

    def pack(self, layer, scheme, device, dtype):
        target = Target(device, dtype, layer.weight.shape[1], layer.weight.shape[0])
        if _native_missing(scheme, target) is None:
            return _LowBitDynamic(layer.weight, layer.scale, layer.zero_point, layer.bias, layer.smooth, scheme.bits,
                                  scheme.group_size)
        return _Reference(layer.weight, layer.scale, layer.zero_point, layer.bias, layer.smooth, scheme.group_size)


KERNEL = _LowBitDynamicKernel()
