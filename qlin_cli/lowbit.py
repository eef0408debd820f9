"""n-bit group-wise weight-only linear: the 4-bit packing, the reference math, and the entry
point that runs qlin's fused C++ kernel (`native_kernels.cpp`, `lowbit_linear`) where it is built.

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

from . import native

__all__ = ["pack_int4", "unpack_int4", "dequantize", "lowbit_linear_reference", "lowbit_linear"]

_EMPTY_F32 = torch.empty(0)
_EMPTY_I8 = torch.empty(0, dtype=torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) in [-8, 7] -> uint8 (N, ceil(K/2)), the layout in the module docstring."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int4 takes int8 (N, K) values, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4: values must be in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    n, k = q.shape
    codes = (q.to(torch.int16) + 8).to(torch.uint8)  # (N, K) in [0, 15]
    if k % 2:
        codes = F.pad(codes, (0, 1))  # the unused high nibble of the last byte is 0
    codes = codes.reshape(n, -1, 2)
    return (codes[..., 0] | (codes[..., 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 (N, ceil(K/2)) -> int8 (N, K) in [-8, 7]: the inverse of `pack_int4`."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4 takes uint8 (N, ceil(K/2)) = (N, {(k + 1) // 2}), "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    low = (packed & 15).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :k]


def dequantize(w: torch.Tensor, bits: int, scale: torch.Tensor, zero_point: torch.Tensor | None,
               group_size: int, k: int) -> torch.Tensor:
    """The float32 weight (N, K) that the kernel multiplies by: float32(q - z) * scale, per group."""
    if w.dtype == torch.uint8 and bits != 4 or w.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"w must be uint8 packed 4-bit (bits=4) or int8 (N, K), got {w.dtype} with bits={bits}")
    q = unpack_int4(w, k) if w.dtype == torch.uint8 else w
    s = scale.repeat_interleave(group_size, dim=1)[:, :k]
    qf = q.float()
    if zero_point is not None and zero_point.numel():
        qf = qf - zero_point.float().repeat_interleave(group_size, dim=1)[:, :k]
    return qf * s


def lowbit_linear_reference(x: torch.Tensor, w: torch.Tensor, bits: int, scale: torch.Tensor,
                            zero_point: torch.Tensor | None, group_size: int,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """`lowbit_linear` in torch ops: x (M, K) float32, the operands as in the module docstring
    -> y (M, N) float32."""
    k = x.shape[-1]
    weight = dequantize(w, bits, scale, zero_point, group_size, k)
    return F.linear(x, weight, bias if bias is not None and bias.numel() else None)


def lowbit_linear(x: torch.Tensor, w: torch.Tensor, bits: int, scale: torch.Tensor,
                  zero_point: torch.Tensor | None, group_size: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ dequant(w).T + bias through qlin's fused kernel where it is built (native.py),
    else through `lowbit_linear_reference` (the same results to float rounding).

    x: float32 (M, K) contiguous (callers convert bf16/fp16 and flatten leading dimensions);
    w: uint8 (N, ceil(K/2)) packed 4-bit (bits=4) or int8 (N, K); scale float32 (N, ngroups);
    zero_point int8 (N, ngroups) or None/empty (symmetric); bias float32 (N,) or None.
    """
    kernels = native.load()
    if kernels is None or not hasattr(kernels, "lowbit_linear"):
        return lowbit_linear_reference(x, w, bits, scale, zero_point, group_size, bias)
    return kernels.lowbit_linear(x, w, bits, scale, _EMPTY_I8 if zero_point is None else zero_point,
                                 group_size, _EMPTY_F32 if bias is None else bias)
