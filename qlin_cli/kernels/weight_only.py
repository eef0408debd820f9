"""`weight_only`: float activations times int8 weights (B-bit values, one scale per output
channel). On CPU it runs qlin's own panel kernel (lowbit.py, `native_kernels.cpp`
lowbit_linear: batch invariant, 1.4-1.8x float32 at one token and 1.03-1.06x at 512 on one AVX2
core); on CUDA, or where qlin's kernels are not built, `torch._weight_int8pack_mm` (on CPU
0.2x float32's speed at one token and 0.1x at 16: benchmarks/RESULTS.md, "lowbit-kernel-cpu").
Where neither can run, the layer falls back to its dequantized float weight (dequant)."""

from __future__ import annotations

import functools

import torch

from . import lowbit, native
from .registry import Kernel, KernelChoice, grouped_kernels, low_bit_layer

__all__ = ["KERNEL"]


@functools.cache
def _weight_int8pack_missing(device_type: str, dtype: torch.dtype, k: int, n: int) -> str | None:
    """Run `_weight_int8pack_mm` once on zeros of this layer's shape; None if it works, else why."""
    try:
        torch._weight_int8pack_mm(
            torch.zeros(1, k, dtype=dtype, device=device_type),
            torch.zeros(n, k, dtype=torch.int8, device=device_type),
            torch.ones(n, dtype=dtype, device=device_type),
        )
    except Exception as exc:  # a probe: any failure (no such op, device, dtype, shape) means "no"
        return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return None


class _WeightOnly:
    """`torch._weight_int8pack_mm`: float activations times int8 weights `(N, K)` with per-row
    scales. Asymmetric weights subtract `rowsum(x) * s * z` afterwards."""

    def __init__(self, weight, scale, zero_point, bias, dtype):
        n = weight.shape[0]
        self.weight = weight.contiguous()
        s = scale.float().expand(n).contiguous()
        self.scale = s.to(dtype)
        zp = zero_point.to(torch.float32).expand(n)
        self.zp_scale = (s * zp).to(dtype) if bool(zp.any()) else None
        self.bias = None if bias is None else bias.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype).contiguous()
        y = torch._weight_int8pack_mm(x, self.weight, self.scale)
        if self.zp_scale is not None:
            y = y - x.sum(dim=1, keepdim=True) * self.zp_scale
        return y if self.bias is None else y.add_(self.bias)


class _WeightOnlyKernel(Kernel):
    name, activations, rank = "weight_only", "float", 60

    def scheme_problem(self, scheme):
        if scheme.group_size is not None:
            return (f"kernel 'weight_only' (torch._weight_int8pack_mm) has one scale per output channel; grouped "
                    f"weights take kernel {grouped_kernels()}")
        return None

    @staticmethod
    def _panels(target) -> bool:
        """Whether this layer runs on qlin's panel kernel (CPU, the native build loads) rather
        than on `torch._weight_int8pack_mm`."""
        return target.device.type == "cpu" and native.unavailable_reason() is None

    def refusal(self, scheme, target):
        if self._panels(target):
            return None
        missing = _weight_int8pack_missing(target.device.type, target.dtype, target.in_features, target.out_features)
        return None if missing is None else f"torch._weight_int8pack_mm cannot run ({missing})"

    def offer(self, scheme, target, why, fallback):
        if low_bit_layer(scheme):  # where the low-bit kernels cannot run: B-bit values per channel here
            if scheme.group_size is not None or self.refusal(scheme, target) is not None:
                return None
            prefix = "fallback" if fallback else "auto"
            reason = f"{prefix}: {why}; {scheme.bits}-bit values on the int8 kernel"
            return KernelChoice(self.name, reason, True, fallback)
        why_not = self.refusal(scheme, target)
        if why_not is not None:
            return why_not
        op = "qlin's panel kernel" if self._panels(target) else "torch._weight_int8pack_mm"
        return KernelChoice(self.name, f"auto: weight-only mode ({op})", True, False)

    def pack(self, layer, scheme, device, dtype):
        if device.type == "cpu" and native.unavailable_reason() is None:  # `_panels`, decided where packed
            return lowbit._LowBit(layer.weight, layer.scale, layer.zero_point, layer.bias, dtype, scheme.bits, None)
        return _WeightOnly(layer.weight, layer.scale, layer.zero_point, layer.bias, dtype)


KERNEL = _WeightOnlyKernel()
