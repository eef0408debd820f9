"""`int4pack`: torch's 4-bit group-wise weight-only kernels, `_weight_int4pack_mm_for_cpu` (float
activations) and on CUDA `_weight_int4pack_mm` (bfloat16), for groups of 32 to 256. `auto` picks
it on CUDA; on CPU qlin's own lowbit kernel reads the same weights packed."""

from __future__ import annotations

import torch

from .registry import Kernel, KernelChoice, low_bit_layer

__all__ = ["INT4PACK_GROUPS", "int4pack_missing", "KERNEL"]


INT4PACK_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4 kernels take


def int4pack_missing(device_type: str, dtype: torch.dtype, n: int, k: int, bits: int,
                     group_size: int | None) -> str | None:
    """Why `torch._weight_int4pack_mm` (CUDA: bfloat16 activations) or `_for_cpu` cannot run a
    layer `(n, k)` of this scheme, or None: their shape rules, checked here (and tested on CPU
    for both devices) rather than by a failing call."""
    if bits != 4 or group_size is None:
        return "torch's int4 kernels take 4-bit weights in groups"
    if group_size not in INT4PACK_GROUPS:
        return f"torch's int4 kernels take groups of {', '.join(map(str, INT4PACK_GROUPS))}, not {group_size}"
    if k % group_size:
        return f"torch's int4 kernels need in_features ({k}) divisible by the group size ({group_size})"
    if device_type == "cuda":
        if dtype != torch.bfloat16:
            return f"torch's CUDA int4 kernel takes bfloat16 activations, not {str(dtype).removeprefix('torch.')}"
        if n % 8 or k % 32:
            return f"torch's CUDA int4 kernel needs out_features % 8 == 0 and in_features % 32 == 0 ({n}x{k})"
        return None
    if device_type != "cpu":
        return f"torch's int4 kernels run on CPU and CUDA, not {device_type}"
    if n % 16:
        return f"torch's CPU int4 kernel needs out_features divisible by 16 ({n})"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch's CPU int4 kernel takes float activations, not {dtype}"
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return "this torch build has no _weight_int4pack_mm_for_cpu"
    return None


class _Int4Pack:
    """torch's 4-bit group-wise kernels: `_weight_int4pack_mm_for_cpu` (float activations) and,
    on CUDA, `_weight_int4pack_mm` (bfloat16; untested here, no GPU). Their weight is the unsigned
    nibble u = q + 8 and their dequantization (u - 8) * s + z, so qlin's zero point z_q (in q
    units) becomes z = -s * z_q; scales and zeros are laid out `(K / G, N, 2)`."""

    def __init__(self, weight, scale, zero_point, bias, dtype, group_size: int, device: torch.device):
        u = weight.to(torch.int32) + 8  # (N, K) in [0, 15]
        s = scale.float()
        z = -s * zero_point.float()
        self.scales_zeros = torch.stack([s.t(), z.t()], dim=-1).contiguous().to(dtype)  # (K/G, N, 2)
        if device.type == "cuda":
            k = weight.shape[1]
            tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
            u8 = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8)  # CUDA's layout: even k in the high nibble
            self.packed, self.op = torch._convert_weight_to_int4pack(u8, tiles), torch._weight_int4pack_mm
        else:
            self.packed, self.op = torch._convert_weight_to_int4pack_for_cpu(u, 1), torch._weight_int4pack_mm_for_cpu
        self.group_size, self.dtype = group_size, dtype
        self.bias = None if bias is None else bias.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x.to(self.dtype).contiguous(), self.packed, self.group_size, self.scales_zeros)
        y = y if self.bias is None else y.add_(self.bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class _Int4PackKernel(Kernel):
    name, activations, rank, low_bit = "int4pack", "float", 50, True

    def scheme_problem(self, scheme):
        if scheme.bits != 4 or scheme.group_size not in INT4PACK_GROUPS:
            groups = f"{', '.join(map(str, INT4PACK_GROUPS[:-1]))} or {INT4PACK_GROUPS[-1]}"
            return f"kernel 'int4pack' (torch._weight_int4pack_mm) takes `bits` 4 with `group_size` {groups}"
        return None

    def batch_invariant(self, scheme):
        return False

    def refusal(self, scheme, target):
        return int4pack_missing(target.device.type, target.dtype, target.out_features, target.in_features,
                                scheme.bits, scheme.group_size)

    def offer(self, scheme, target, why, fallback):
        if fallback or target.device.type != "cuda" or not low_bit_layer(scheme) or self.refusal(scheme, target):
            return None
        return KernelChoice(self.name, "auto: 4-bit groups on CUDA", False, False)

    def pack(self, layer, scheme, device, dtype):
        return _Int4Pack(layer.weight, layer.scale, layer.zero_point, layer.bias, dtype, scheme.group_size, device)


KERNEL = _Int4PackKernel()
