"""`pertoken`: dynamic per-token (asymmetric) int8 activations times int8 weights in one C++ call
at any token count (native_kernels.cpp, `pertoken_linear`): the row's codes, an exact int32 GEMM
and the epilogue, activations read and written in float32 or bfloat16 (float16: converted).

It is the per-token kernel of x86 CPUs without VNNI (AVX2 only: AMD Zen 1-3, Intel before Cascade
Lake). There, oneDNN's and fbgemm's u8 x s8 GEMMs would saturate full-range codes (vpmaddubsw's
int16 pair sums), and `torch._int_mm`, the kernel `auto` fell back to, cost 8-17x float32 per
layer (RESULTS.md, "pertoken-avx2"); qlin's AVX2 GEMM runs vpmaddubsw on codes shifted by 128
with the weight's integer row sums added back (exact for weights without -128: `wsum_i`), at every
row count, and widens both operands to int16 (vpmaddwd: exact, slower) for a weight holding -128
(RESULTS.md, "pertoken-decode", "Issue 24 on an AMD EPYC Zen 3"). Its codes, integer sums and float operations are the `onednn` kernel's, so a
file gives the same bits on a CPU with VNNI and on one without, at every batch size. Where the
kernels build without SIMD loops (an x86 CPU without AVX2, another architecture) `auto` takes its
scalar loops too: torch's `_int_mm` loop, the alternative there, was 8-15x slower ("scalar-build").

It also runs static layers (`static_linear`, `PertokenStatic`): the int_mm kernel's codes,
integer sums and roundings, so int_mm's bits, through the same GEMMs. `auto` gives it static
layers on CPUs without VNNI, where fbgemm's static GEMM would saturate and torch's CPU `_int_mm`
is a plain loop (0.02-0.26x float32 against 0.76-5.8x here: RESULTS.md "kernels-static").
"""

from __future__ import annotations

import copy

import torch

from . import native
from .common import EMPTY as _EMPTY
from .common import ACCEPTED, reduce_range, static_operands
from .common import weight_int_sums as _weight_int_sums
from .common import weight_row_sums as _weight_row_sums
from .registry import Kernel, KernelChoice

__all__ = ["HOSTS", "UNTRACEABLE", "Pertoken", "PertokenStatic", "KERNEL"]

# What torch.jit.trace and torch.export cannot record, said plainly instead of torch's own error
# deep inside the kernel: the fused kernels are C++ functions that torch's dispatcher does not know.
UNTRACEABLE = (
    "qlin's fused kernels (onednn, pertoken: per-token and static layers) cannot be traced or exported (their "
    "C++ functions are not torch ops): set QLIN_NATIVE=0 before loading the model to run the fbgemm or int_mm "
    "kernel instead, which torch.export exports"
)

# activation dtypes read and written as they are (a bf16 model's int8 layer: no conversion passes);
# float16 (common.ACCEPTED) is converted to float32 and the result rounded back once
HOSTS = (torch.float32, torch.bfloat16)


class Pertoken:
    """The layer's operands for `pertoken_linear`, prepared once: y = a[m] * (s[n] * acc[m, n] -
    rowsum(u)[m] * s[n] * z[n]) + c[m] * wsum[n] + b[n], with acc the int32 sums of the row's
    uint8 codes u (x ~ a * u + c, SmoothQuant's division folded in) times the int8 weight."""

    def __init__(self, weight, scale, zero_point, bias, smooth):
        n, _ = weight.shape
        s = scale.float().reshape(-1).expand(n).contiguous()
        zp = zero_point.to(torch.int32).reshape(-1).expand(n)
        self.scale = s
        self.zs = (s * zp.float()).contiguous() if bool(zp.any()) else _EMPTY  # asymmetric weights
        int_sums = _weight_int_sums(weight)
        self.wsum = _weight_row_sums(weight, scale, zero_point, int_sums).contiguous()
        # the integer row sums, for the AVX2 tiles' vpmaddubsw (exact only without -128 in
        # the weight: symmetric weights are in [-127, 127], asymmetric ones may reach -128)
        self.wsum_i = int_sums.contiguous() if _no_minus_128(weight) else _EMPTY_I32
        self.bias = _EMPTY if bias is None else bias.float().contiguous()
        self.smooth = _EMPTY if smooth is None else smooth.float().contiguous()
        self.weight = weight.contiguous()  # the layer's own int8 buffer (no copy): pertoken_linear reads it
        self.linear = native.load().pertoken_linear  # looked up once here; no module object is kept

    def __deepcopy__(self, memo) -> "Pertoken":
        return copy.copy(self)  # its tensors are never written (oneDNN's packed weight cannot be copied)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        refuse_tracing()
        return self.one_call(x)

    def one_call(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.scale, self.wsum, self.bias, self.zs, self.smooth, self.wsum_i)


class PertokenStatic:
    """A static layer (calibrated activation scale s_x and zero point z_x) through the same C++
    GEMMs, `static_linear`: the int_mm kernel's codes q = clamp(rne(x / d) + z_x, -128, 127), d =
    s_x (times SmoothQuant's factors), its exact integer sums of (q - z_x) * (qw - z[n]) and its
    two roundings, float(acc) * (s_x * s[n]) + b[n]: the same bits as `int_mm` (tested), at the
    speed of qlin's own GEMM where torch's CPU `_int_mm` is a plain loop (CPUs without VNNI, where
    fbgemm's static GEMM would saturate full-range codes)."""

    def __init__(self, weight, scale, zero_point, bias, act_qparams, smooth):
        n, k = weight.shape
        self.zero_point = int(act_qparams[1])
        divisor, out_scale = static_operands(scale, act_qparams, smooth)  # int_mm's own products
        self.divisor = divisor.reshape(-1).contiguous()  # (1,) or (K,)
        self.out_scale = out_scale.expand(n).contiguous()
        int_sums = _weight_int_sums(weight)
        zp = zero_point.to(torch.int64).reshape(-1).expand(n)
        o = 128 + self.zero_point  # the codes u = q + 128 stand for q - z_x = u - o
        corr = o * int_sums.long() - k * o * zp
        self.corr = ((corr + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)  # wrapping, as int32 sums do
        self.zw = zp.to(torch.int32).contiguous() if bool(zp.any()) else _EMPTY_I32
        self.wsum_i = int_sums.contiguous() if _no_minus_128(weight) else _EMPTY_I32
        self.bias = _EMPTY if bias is None else bias.float().contiguous()
        self.weight = weight.contiguous()
        self.linear = native.load().static_linear

    def __deepcopy__(self, memo) -> "PertokenStatic":
        return copy.copy(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        refuse_tracing()
        return self.linear(x, self.weight, self.out_scale, self.corr, self.zw, self.bias, self.divisor,
                           self.zero_point, self.wsum_i)


_EMPTY_I32 = torch.empty(0, dtype=torch.int32)
# static_linear's codes' sums are exact float32 integers and its int32 sums hold below this
STATIC_MAX_K = 65536


def _no_minus_128(weight: torch.Tensor) -> bool:
    """Whether no value of the int8 weight is -128 (a block of rows at a time, no big temporary)."""
    n, k = weight.shape
    if weight.numel() == 0:
        return True
    step = max(1, (1 << 22) // k)
    return all(int(weight[i:i + step].min()) > -128 for i in range(0, n, step))


def refuse_tracing() -> None:
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        raise RuntimeError(UNTRACEABLE)


def missing(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `pertoken_linear` cannot run a layer here at all, or None."""
    if device.type != "cpu":
        return "qlin's per-token C++ kernel runs on CPU only"
    if dtype not in ACCEPTED:
        return f"qlin's per-token C++ kernel takes float32, bfloat16 or float16 activations, not {dtype}"
    return native.unavailable_reason()


def isa() -> str | None:
    """The instruction set `pertoken_linear`'s GEMM was built for here ("avx512_vnni", "avx2",
    "scalar"), or None without the native kernels."""
    kernels = native.load()
    return None if kernels is None else kernels.pertoken_isa


class _PertokenKernel(Kernel):
    name, activations, rank = "pertoken", "int8", 15

    def refusal(self, scheme, target):
        if not (scheme.per_token or scheme.static):
            return "the pertoken kernel runs dynamic per-token and static layers only"
        if scheme.static and target.in_features >= STATIC_MAX_K:
            return f"the pertoken kernel takes static layers of fewer than {STATIC_MAX_K} input features"
        return missing(target.device, target.dtype)

    def offer(self, scheme, target, why, fallback):
        if scheme.static:
            return self._offer_static(scheme, target, why, fallback)
        if not scheme.per_token or target.device.type != "cpu":
            return None
        why_not = missing(target.device, target.dtype)
        if why_not is not None:
            return None if fallback else why_not
        if isa() == "scalar" and not reduce_range():  # a VNNI CPU whose build has no SIMD loops: fbgemm's
            return None  # VNNI GEMM. Elsewhere the scalar loops (compiled -O3 -march=native) still ran
            # 8-15x faster than torch's plain-loop CPU `_int_mm`, the other choice (RESULTS.md "scalar-build")
        said = f" (onednn: {why})" if why else ""
        reason = f"fallback: {why}" if fallback else f"auto: per-token int8 activations, qlin's {isa()} GEMM{said}"
        return KernelChoice(self.name, reason, True, fallback)

    def _offer_static(self, scheme, target, why, fallback):
        """Static layers on a CPU without VNNI (`reduce_range`; any CPU but x86 with VNNI): there
        fbgemm's static GEMM would saturate full-range codes (or is not built: it is x86's) and
        `int_mm` is torch's plain CPU loop (8-50x float32), slower even than this kernel's scalar
        loops (RESULTS.md "scalar-build"). With VNNI, fbgemm's prepacked static GEMM is asked next."""
        if target.device.type != "cpu" or not reduce_range() or self.refusal(scheme, target):
            return None
        said = f" ({why})" if why and not fallback else ""
        reason = f"fallback: {why}" if fallback else f"auto: static int8 activations, qlin's {isa()} GEMM{said}"
        return KernelChoice(self.name, reason, True, fallback)

    def pack(self, layer, scheme, device, dtype):
        if scheme.static:
            return PertokenStatic(layer.weight, layer.scale, layer.zero_point, layer.bias, layer.input_qparams,
                                  layer.smooth)
        return Pertoken(layer.weight, layer.scale, layer.zero_point, layer.bias, layer.smooth)


KERNEL = _PertokenKernel()
