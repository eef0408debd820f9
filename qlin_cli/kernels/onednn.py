"""`onednn`: dynamic per-token (asymmetric) activations on oneDNN's u8 x s8 GEMM
(`onednn.qlinear_pointwise`, VNNI), with the codes and the epilogue computed by qlin's fused C++
kernels (native.py, native_kernels.cpp); CPU, float32 or bfloat16 activations (float16:
converted to float32 and the result rounded back). Up to 16 rows it
runs the `pertoken` kernel's one call. Where it cannot run (no VNNI: oneDNN's u8 GEMM would
saturate), a request falls back to `pertoken` (qlin's own exact GEMM) or fbgemm, and `auto` says
why in that kernel's reason."""

from __future__ import annotations

import torch

from . import native
from .common import ACCEPTED, reduce_range
from .pertoken import HOSTS, UNTRACEABLE, Pertoken, refuse_tracing
from .registry import Kernel, KernelChoice

__all__ = ["ONEDNN_UNTRACEABLE", "KERNEL"]

ONEDNN_UNTRACEABLE = UNTRACEABLE  # (the name tests and users know)


def _onednn_missing(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused per-token oneDNN kernel cannot run this layer here, or None."""
    if device.type != "cpu":
        return "the oneDNN kernel runs on CPU only"
    if dtype not in ACCEPTED:
        return f"the oneDNN kernel takes float32, bfloat16 or float16 activations, not {dtype}"
    if not hasattr(torch.ops.onednn, "qlinear_pointwise") or "onednn" not in torch.backends.quantized.supported_engines:
        return "this torch build has no oneDNN quantized linear"
    if reduce_range():
        return "full-range uint8 activations can saturate without VNNI"
    return native.unavailable_reason()


class _Onednn(Pertoken):
    """Dynamic per-token (asymmetric) activations times int8 weights, in three steps
    (activations float32 or bfloat16, read and written in their own dtype: a bf16 row's codes
    are its float32 copy's, and the bf16 output is the float32 result rounded as torch rounds;
    float16 rows are converted to float32 and the result rounded back):

        quantize_rows: u[m] = rne((x[m] - lo[m]) / w[m] * 255) in [0, 255] (the codes of the
            fbgemm per-token path, bit for bit; SmoothQuant's division folded in),
            x ~ a[m] * u + c[m] with a = w / 255, c = lo
        GEMM: y[m, n] = s[n] * sum_k u[m, k] * qw[n, k] (int32 sums, one float rounding each)
        epilogue: y = a[m] * (y - rowsum(u)[m] * s[n] * z[n]) + c[m] * wsum[n] + b[n]

    Up to `max_rows` rows (a sentence, a decode step): one C++ call does all three (the
    `pertoken` kernel's `pertoken_linear`: its own VNNI GEMM over the layer's own int8 weight,
    the epilogue on the accumulators in registers, threads only where the work pays for them),
    ~4 us fixed cost instead of ~45. More rows: qlin's `quantize_rows`, oneDNN's u8 x s8 GEMM
    (`onednn.qlinear_pointwise`) and `epilogue_`, three calls and three parallel regions. Both
    compute the same codes, the same int32 sums and the same float operations in the same order:
    the same bits (tested), so a row's result never depends on the batch (batch-invariant).
    """

    def __init__(self, weight, scale, zero_point, bias, smooth):
        super().__init__(weight, scale, zero_point, bias, smooth)
        self.packed = torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
        self.gemm_zero_point = torch.zeros(weight.shape[0], dtype=torch.int32)
        kernels = native.load()  # looked up once here, not at each call; no module object is kept
        self.quantize_rows, self.epilogue_, self.max_rows = kernels.quantize_rows, kernels.epilogue_, kernels.pertoken_max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        refuse_tracing()
        if x.shape[0] <= self.max_rows:  # one call; quantizing is part of it, so no codes are cached
            return self.one_call(x)
        return self._three_calls(x)

    def _three_calls(self, x: torch.Tensor) -> torch.Tensor:
        """quantize_rows, oneDNN's GEMM, epilogue_. Every call quantizes its own input: codes
        shared between layers that read one tensor (Q, K, V) were keyed by the tensor's address,
        shape, strides and version, and a buffer refilled behind torch's back (through numpy)
        keeps all four, so a second model reused the first one's codes."""
        host = x.dtype in HOSTS  # read as it is, and the epilogue writes this dtype
        q, a, c, rowsum = self.quantize_rows((x if host else x.float()).contiguous(), self.smooth)
        y = torch.ops.onednn.qlinear_pointwise(
            q, 1.0, 0, self.packed, self.scale, self.gemm_zero_point, None, 1.0, 0, torch.float32, "none", [], "")
        out = y.new_empty(y.shape, dtype=x.dtype) if x.dtype == torch.bfloat16 else None
        y = self.epilogue_(y, a, c, self.wsum, self.bias, rowsum, self.zs, out)
        return y if host else y.to(x.dtype)


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
