"""`dequant`: a float matmul (`F.linear`) on the dequantized weight, any device. Never requested
and never chosen for a mode it does not implement faithfully: it is the reported fallback of
weight-only layers where no int8 or low-bit kernel can run. A dynamic or static layer always
quantizes its activations, on every machine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives import dequantize
from .registry import Kernel, KernelChoice, low_bit_layer

__all__ = ["KERNEL"]


class _Dequant:
    """A float matmul on the dequantized weight (no int8 arithmetic at all): weight-only mode's
    fallback (and the low-bit one's where no fused kernel runs). SmoothQuant's factors
    `(K,)` are folded back into the weight's columns; static activation parameters are unused
    (the activations stay float)."""

    def __init__(self, weight, scale, zero_point, bias, dtype, smooth=None, group_size=None):
        w = dequantize(weight, scale, zero_point, group_size)
        self.weight = (w if smooth is None else w / smooth.float()).to(dtype)
        self.bias = None if bias is None else bias.to(dtype)

    takes_any_rank = True  # F.linear takes (..., K): QuantizedLinear skips its reshape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class _DequantKernel(Kernel):
    name, activations, rank = "dequant", "float", 70
    requestable, float_weights = False, True

    def batch_invariant(self, scheme):
        return False

    def offer(self, scheme, target, why, fallback):
        if low_bit_layer(scheme):
            prefix = "fallback" if fallback else "auto"
            return KernelChoice(self.name, f"{prefix}: {why}; kept as its dequantized float weight", False, fallback)
        return KernelChoice(self.name, f"fallback: {why}", False, True)  # weight-only mode's int8 kernel is missing

    def pack(self, layer, scheme, device, dtype):
        return _Dequant(layer.weight, layer.scale, layer.zero_point, layer.bias, dtype, layer.smooth, scheme.group_size)


KERNEL = _DequantKernel()
