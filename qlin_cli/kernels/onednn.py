"""`onednn`: dynamic per-token (asymmetric) activations on oneDNN's u8 x s8 GEMM
(`onednn.qlinear_pointwise`, VNNI), with the codes and the epilogue computed by qlin's fused C++
kernels (native.py, native_kernels.cpp); CPU, float32. Where it cannot run, a request falls back
to fbgemm, and `auto` says why in fbgemm's reason ("not fused: ...")."""

from __future__ import annotations

import copy

import torch

from . import native
from .common import EMPTY as _EMPTY
from .common import reduce_range
from .common import weight_row_sums as _weight_row_sums
from .registry import Kernel, KernelChoice

__all__ = ["ONEDNN_UNTRACEABLE", "KERNEL"]

# What torch.jit.trace and torch.export cannot record, said plainly instead of torch's own error
# deep inside the kernel: the fused kernels are C++ functions that torch's dispatcher does not know.
ONEDNN_UNTRACEABLE = (
    "qlin's fused onednn kernel cannot be traced or exported (its C++ functions are not torch ops): "
    "set QLIN_NATIVE=0 before loading the model to run the fbgemm kernel instead, which torch.export exports"
)


def _onednn_missing(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused per-token oneDNN kernel cannot run this layer here, or None."""
    if device.type != "cpu":
        return "the oneDNN kernel runs on CPU only"
    if dtype != torch.float32:
        return f"the oneDNN kernel takes float32 activations, not {dtype}"
    if not hasattr(torch.ops.onednn, "qlinear_pointwise") or "onednn" not in torch.backends.quantized.supported_engines:
        return "this torch build has no oneDNN quantized linear"
    if reduce_range():
        return "full-range uint8 activations can saturate without VNNI"
    return native.unavailable_reason()


class _Onednn:
    """Dynamic per-token (asymmetric) activations times int8 weights, in three steps:

        quantize_rows: u[m] = rne((x[m] - lo[m]) / w[m] * 255) in [0, 255] (the codes of the
            fbgemm per-token path, bit for bit; SmoothQuant's division folded in),
            x ~ a[m] * u + c[m] with a = w / 255, c = lo
        GEMM: y[m, n] = s[n] * sum_k u[m, k] * qw[n, k] (int32 sums, one float rounding each)
        epilogue: y = a[m] * (y - rowsum(u)[m] * s[n] * z[n]) + c[m] * wsum[n] + b[n]

    Up to `max_rows` rows (a sentence, a decode step): one C++ call does all three
    (native_kernels.cpp, `pertoken_linear`: its own VNNI GEMM over the layer's own int8 weight,
    the epilogue on the accumulators in registers, threads only where the work pays for them),
    ~4 us fixed cost instead of ~45. More rows: qlin's `quantize_rows`, oneDNN's u8 x s8 GEMM
    (`onednn.qlinear_pointwise`) and `epilogue_`, three calls and three parallel regions. Both
    compute the same codes, the same int32 sums and the same float operations in the same order:
    the same bits (tested), so a row's result never depends on the batch (batch-invariant).
    """

    def __init__(self, weight, scale, zero_point, bias, smooth):
        n, _ = weight.shape
        s = scale.float().reshape(-1).expand(n).contiguous()
        zp = zero_point.to(torch.int32).reshape(-1).expand(n)
        self.packed = torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
        self.scale, self.gemm_zero_point = s, torch.zeros(n, dtype=torch.int32)
        self.zs = (s * zp.float()).contiguous() if bool(zp.any()) else _EMPTY  # asymmetric weights
        self.wsum = _weight_row_sums(weight, scale, zero_point).contiguous()
        self.bias = _EMPTY if bias is None else bias.float().contiguous()
        self.smooth = _EMPTY if smooth is None else smooth.float().contiguous()
        self.weight = weight.contiguous()  # the layer's own int8 buffer (no copy): pertoken_linear reads it
        kernels = native.load()  # looked up once here, not at each call; no module object is kept
        self.quantize_rows, self.epilogue_ = kernels.quantize_rows, kernels.epilogue_
        self.linear, self.max_rows = kernels.pertoken_linear, kernels.pertoken_max_rows

    def __deepcopy__(self, memo) -> "_Onednn":
        return copy.copy(self)  # its tensors are never written; oneDNN's packed weight cannot be copied

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            raise RuntimeError(ONEDNN_UNTRACEABLE)
        if x.shape[0] <= self.max_rows:  # one call; quantizing is part of it, so no codes are cached
            return self.linear(x, self.weight, self.scale, self.wsum, self.bias, self.zs, self.smooth)
        return self._three_calls(x)

    def _three_calls(self, x: torch.Tensor) -> torch.Tensor:
        """quantize_rows, oneDNN's GEMM, epilogue_. Every call quantizes its own input: codes
        shared between layers that read one tensor (Q, K, V) were keyed by the tensor's address,
        shape, strides and version, and a buffer refilled behind torch's back (through numpy)
        keeps all four, so a second model reused the first one's codes."""
        q, a, c, rowsum = self.quantize_rows(x.float().contiguous(), self.smooth)
        y = torch.ops.onednn.qlinear_pointwise(
            q, 1.0, 0, self.packed, self.scale, self.gemm_zero_point, None, 1.0, 0, torch.float32, "none", [], "")
        y = self.epilogue_(y, a, c, self.wsum, self.bias, rowsum, self.zs, None)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class _OnednnKernel(Kernel):
    name, activations, rank = "onednn", "int8", 10

    def refusal(self, scheme, target):
        if not scheme.per_token:
            return "the oneDNN kernel runs dynamic per-token layers only"
        return _onednn_missing(target.device, target.dtype)

    def offer(self, scheme, target, why, fallback):
        if fallback or not scheme.per_token or target.device.type != "cpu":
            return None
        # fewest passes and parallel regions per layer: fused quantize, one GEMM, fused epilogue
        why_not = _onednn_missing(target.device, target.dtype)
        if why_not is not None:
            return why_not
        return KernelChoice(self.name, "auto: per-token int8 activations, fused oneDNN", True, False)

    def pack(self, layer, scheme, device, dtype):
        return _Onednn(layer.weight, layer.scale, layer.zero_point, layer.bias, layer.smooth)


KERNEL = _OnednnKernel()
