"""`int_mm`: `torch._int_mm` (int32 accumulation) with int8 activations, dynamic (asymmetric, per
token or per tensor: scale and offset) or static; CPU and CUDA. Never refused: it is where fbgemm
and onednn fall back to where qlin's own GEMM (`pertoken`) cannot take the layer (CUDA, per-tensor
activations, no C++ build). On CPU torch's `_int_mm` is a plain loop (8-50x slower than float32 from
16 tokens): `auto` takes it for static layers only where neither fbgemm (VNNI) nor qlin's own GEMM
(`pertoken`'s `static_linear`, int_mm's bits) runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..primitives import QMAX, QMIN, quantize_activations
from .common import static_operands, weight_row_sums
from .registry import Kernel, KernelChoice

__all__ = ["IntMMRules", "INT_MM_RULES", "KERNEL"]


@dataclass(frozen=True)
class IntMMRules:
    """Shape rules of `torch._int_mm` on a device; packing pads to meet them.

    Padding K and N with zeros leaves every integer dot product unchanged, and padding M adds
    rows that are dropped, so padded results are bit-identical to unpadded ones.
    """

    k_multiple: int = 1
    n_multiple: int = 1
    min_m: int = 1


# CUDA's _int_mm wants M > 16 and K, N multiples of 8; the CPU kernel takes any shape.
INT_MM_RULES = {"cpu": IntMMRules(), "cuda": IntMMRules(k_multiple=8, n_multiple=8, min_m=17)}


class _IntMM:
    """`torch._int_mm` with int8 activations: dynamic (asymmetric, per token or per tensor:
    x ~ a * qx + c, see `primitives.activation_qparams`), or static with a calibrated scale s_x
    and zero point z_x.

    With the weight `(N, K)` int8, its scale s[n] and zero point z[n], and activations qx:
        acc[m, n] = sum_k (qx[m, k] - z_x) * (qw[n, k] - z[n])
                  = qx @ qw.T - z_x * colsum[n] - z[n] * rowsum(qx)[m] + K * z_x * z[n]
        static:   y[m, n] = s_x * s[n] * acc[m, n] + b[n]
        dynamic:  y[m, n] = a[m] * s[n] * acc[m, n] + c[m] * wsum[n] + b[n]   (z_x = 0)
    where wsum[n] = s[n] * sum_k (qw[n, k] - z[n]) is the dequantized weight's row sum.
    The weight is stored transposed `(K, N)` and contiguous, padded to the device's shape rules;
    colsum, wsum and the scale products are computed once here. `smooth` `(K,)` (SmoothQuant)
    divides the activations before they are quantized.
    """

    def __init__(self, weight, scale, zero_point, bias, per_token: bool, rules: IntMMRules,
                 act_qparams=None, smooth=None):
        n, k = weight.shape
        self.n, self.k, self.per_token, self.min_m = n, k, per_token, rules.min_m
        self.pad_k, self.pad_n = -k % rules.k_multiple, -n % rules.n_multiple
        self.wt = F.pad(weight, (0, self.pad_k, 0, self.pad_n)).t().contiguous()  # (Kp, Np)
        self.scale = scale.float().reshape(-1) if scale.dim() else scale.float()  # (N,) or ()
        zp = zero_point.to(torch.int32)
        self.zero_point = zp if bool(zp.any()) else None
        self.bias = None if bias is None else bias.float()
        self.smooth = None if smooth is None else smooth.float()
        self.static = act_qparams is not None
        self.wsum = None if self.static else weight_row_sums(weight, self.scale, zp)
        if self.static:
            z_x = int(act_qparams[1])
            self.act_divisor, self.out_scale = static_operands(scale, act_qparams, smooth)  # () or (K,); () or (N,)
            self.act_zero_point = z_x
            correction = torch.zeros(n, dtype=torch.int32, device=weight.device)
            if z_x:
                correction += z_x * weight.sum(dim=1, dtype=torch.int32)  # no int32 copy of the weight
            if z_x and self.zero_point is not None:
                correction -= k * z_x * self.zero_point
            self.correction = correction if bool(correction.any()) else None

    def _quantize(self, x: torch.Tensor):
        """int8 `(M, K)`, and for dynamic activations their scale and offset `(M, 1)` or `()`."""
        if self.static:
            q = torch.round(x.float() / self.act_divisor)
            if self.act_zero_point:
                q.add_(self.act_zero_point)
            return q.clamp_(QMIN, QMAX).to(torch.int8), None, None
        if self.smooth is not None:
            x = x.float() / self.smooth
        return quantize_activations(x, self.per_token)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        q, a, c = self._quantize(x)
        padded = self.pad_k or m < self.min_m
        acc = torch._int_mm(F.pad(q, (0, self.pad_k, 0, max(0, self.min_m - m))) if padded else q, self.wt)
        if padded or self.pad_n:  # (M', Np) int32, exact -> (M, N)
            acc = acc[:m, : self.n]
        if self.zero_point is not None:
            acc = acc - q.sum(dim=1, keepdim=True, dtype=torch.int32) * self.zero_point
        if self.static and self.correction is not None:
            acc = acc - self.correction
        y = acc.to(torch.float32)
        if self.static:
            y.mul_(self.out_scale)
        else:
            y.mul_(a)
            y.mul_(self.scale)
            y.addcmul_(c, self.wsum)  # (M, 1) x (N,): no (M, N) temporary
        if self.bias is not None:
            y.add_(self.bias)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class _IntMMKernel(Kernel):
    name, activations, rank = "int_mm", "int8", 30

    def batch_invariant(self, scheme):
        return scheme.static or scheme.per_token

    def offer(self, scheme, target, why, fallback):
        if fallback:
            return KernelChoice(self.name, f"fallback: {why}", self.batch_invariant(scheme), True)
        what = "static" if scheme.static else "per-token" if scheme.per_token else "per-tensor"
        return KernelChoice(self.name, f"auto: {what} int8 activations", self.batch_invariant(scheme), False)

    def pack(self, layer, scheme, device, dtype):
        rules = INT_MM_RULES.get(device.type, IntMMRules())
        return _IntMM(layer.weight, layer.scale, layer.zero_point, layer.bias, scheme.per_token, rules,
                      layer.input_qparams, layer.smooth)


KERNEL = _IntMMKernel()
