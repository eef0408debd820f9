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
differs) and is batch invariant: a row of y depends on its row of x only, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import primitives
from ..primitives import packed_row_bytes
from . import native
from .registry import Kernel, KernelChoice, low_bit_layer

__all__ = [
    "pack_bits", "unpack_bits", "pack_int4", "unpack_int4", "dequantize", "lowbit_linear_reference", "implementation",
    "lowbit_linear", "KERNEL",
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
    """The float32 weight (N, K) that the kernel multiplies by: float32(q - z) * scale, per group
    (`primitives.dequantize` on the unpacked values)."""
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


def implementation():
    """The function that computes `lowbit_linear` here, looked up once by a caller that packs a
    layer: qlin's fused kernel where it is built (native.py; the reason it is not is said once),
    else `lowbit_linear_reference`. Both take (x, w, bits, scale, zero_point, group_size, bias)
    with an empty tensor for no zero point or no bias."""
    kernels = native.load()
    if kernels is None or not hasattr(kernels, "lowbit_linear"):
        return lowbit_linear_reference
    return kernels.lowbit_linear


def lowbit_linear(x: torch.Tensor, w: torch.Tensor, bits: int, scale: torch.Tensor,
                  zero_point: torch.Tensor | None, group_size: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ dequant(w).T + bias through qlin's fused kernel where it is built (native.py),
    else through `lowbit_linear_reference` (the same results to float rounding).

    x: float32 (M, K) contiguous (callers convert bf16/fp16 and flatten leading dimensions);
    w: uint8 (N, ceil(K/2)) packed 4-bit (bits=4) or int8 (N, K); scale float32 (N, ngroups);
    zero_point int8 (N, ngroups) or None/empty (symmetric); bias float32 (N,) or None.
    """
    return implementation()(x, w, bits, scale, _EMPTY_I8 if zero_point is None else zero_point,
                            group_size, _EMPTY_F32 if bias is None else bias)


class _LowBit:
    """qlin's fused weight-only kernel (`lowbit_linear`): float32 activations times B-bit
    weights with one scale (and zero point) per group of G input channels, unpacked on the fly.
    4-bit weights are kept packed two per byte (the file's layout); other widths as int8. Per
    channel is one group of K, per tensor one scale repeated per row. Rows are independent."""

    def __init__(self, weight, scale, zero_point, bias, dtype, bits: int, group_size: int | None):
        n, k = weight.shape
        self.run = implementation()  # looked up once here, not at each call
        self.bits = 4 if bits == 4 else 8
        self.weight = pack_int4(weight) if bits == 4 else weight.contiguous()
        self.group_size = k if group_size is None else group_size
        shape = (n, -(-k // self.group_size))
        self.scale = scale.float().reshape(-1, 1).expand(shape).contiguous() if scale.dim() < 2 else scale.float().contiguous()
        zp = zero_point.reshape(-1, 1).expand(shape).contiguous() if zero_point.dim() < 2 else zero_point.contiguous()
        self.zero_point = zp if bool(zp.any()) else _EMPTY_I8
        self.bias = _EMPTY_F32 if bias is None else bias.float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.run(x.float().contiguous(), self.weight, self.bits, self.scale, self.zero_point, self.group_size, self.bias)
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
        return KernelChoice(self.name, f"auto: {what}, fused unpack-and-dot", True, False)

    def pack(self, layer, scheme, device, dtype):
        return _LowBit(layer.weight, layer.scale, layer.zero_point, layer.bias, dtype, scheme.bits, scheme.group_size)


KERNEL = _LowBitKernel()
