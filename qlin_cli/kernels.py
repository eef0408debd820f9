"""int8 matmul kernels: which one runs (selection), preparing its operands once (packing), and
running it. The only module that touches quantized tensors (qint8) or `torch.ops.quantized`.

Kernels (weights `(N, K)` int8 = `(out_features, in_features)`, activations `x` `(M, K)`):

| name          | activations                        | op                                   | devices   |
|---------------|------------------------------------|--------------------------------------|-----------|
| `int_mm`      | int8: dynamic asymmetric (scale and offset) per token/tensor, or static | `torch._int_mm` (int32 accumulation) | CPU, CUDA |
| `fbgemm`      | uint8: per token (rows normalized), per tensor (batch-dependent), or static | prepacked fbgemm ops | CPU |
| `onednn`      | uint8: per token, codes and epilogue by qlin's fused C++ kernels (native.py) | `onednn.qlinear_pointwise` (VNNI) | CPU |
| `weight_only` | float                              | `torch._weight_int8pack_mm`          | CPU, CUDA |
| `lowbit`      | float (weight-only; 4-bit read packed, any group size) | qlin's fused unpack-and-dot C++ kernel (lowbit.py) | CPU |
| `int4pack`    | float (weight-only, 4-bit groups of 32-256) | `torch._weight_int4pack_mm[_for_cpu]` | CPU, CUDA |
| `dequant`     | float                              | `F.linear` on dequantized weights    | any       |

`dequant` is never chosen for a mode it does not implement faithfully: it is the reported
fallback of weight-only mode where `_weight_int8pack_mm` cannot run. A dynamic or static layer
always quantizes its activations, on every machine.

Selection (`select_kernel`) is a pure function of the layer's scheme (kernel request, mode,
activation granularity), the device, dtype and shape, and of what this torch build and CPU offer; it never times anything, so
the same machine always picks the same kernel and the saved file never depends on it.

Whether a layer is too small for int8 to pay (`kept_float_for_speed`) is decided when the model
is planned, from its shape and scheme only, and recorded in the file as a layer kept in float:
the machine that loads the file never changes what a layer computes.
"""

from __future__ import annotations

import copy
import functools
import platform
import threading
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import lowbit, native
from .primitives import QMAX, QMIN, dequantize, quantize_activations, row_ranges
from .scheme import LayerScheme

__all__ = [
    "KernelChoice",
    "IntMMRules",
    "INT_MM_RULES",
    "cpu_features",
    "SMALL_LAYER",
    "KEPT_FOR_SPEED",
    "kept_float_for_speed",
    "select_kernel",
    "pack",
    "ONEDNN_UNTRACEABLE",
    "FBGEMM_UNTRACEABLE",
]


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a layer runs on this machine, and why."""

    name: str  # int_mm | fbgemm | onednn | weight_only | lowbit | int4pack | dequant
    reason: str
    # a row's output never depends on the other rows of the batch (tested, not assumed: float
    # GEMMs such as dequant's F.linear block differently by batch size and are not)
    batch_invariant: bool

    @property
    def fallback(self) -> bool:
        return self.reason.startswith("fallback")


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


@functools.cache
def cpu_features() -> frozenset[str]:
    """CPU flags that matter to int8 kernels (avx512_vnni, avx_vnni, amx_int8, ...), from
    /proc/cpuinfo; empty where that is not readable."""
    wanted = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(set(line.split(":", 1)[1].split()) & wanted)
    except OSError:
        pass
    return frozenset()


def _weight_row_sums(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Row sums of the dequantized weight `(N, K)`, `s[n] * sum_k (qw[n, k] - z[n])`, as float32
    `(N,)`: what an activation offset (x = a * q + c) contributes, c * wsum[n]. The integer sums are
    exact."""
    n, k = weight.shape
    sums = weight.sum(dim=1, dtype=torch.int32) - k * zero_point.to(torch.int32).reshape(-1)  # (N,) exact
    return sums.float() * scale.float().reshape(-1)


_WARNINGS_LOCK = threading.Lock()


def _quiet(fn, *args):
    """Call a quantized-tensor op with its deprecation warnings kept from the user. The lock keeps
    packing threads (`qlinear.pack_all`) from interleaving catch_warnings' save and restore of
    the global filters."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


@functools.cache
def _fbgemm_missing() -> str | None:
    """Why fbgemm's dynamic kernel cannot run in this build/CPU, or None if it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"fbgemm needs an x86-64 CPU, this is {platform.machine()}"
    engines = torch.backends.quantized.supported_engines
    if not ({"fbgemm", "x86"} & set(engines)) or not hasattr(torch.ops.quantized, "linear_dynamic"):
        return "this torch build has no fbgemm quantized engine"
    return None


def _fbgemm_reduce_range() -> bool:
    """fbgemm's 8-bit activations can saturate int16 sums on CPUs without VNNI; only there is the
    7-bit activation range (reduce_range) needed."""
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_features())


def _onednn_missing(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused per-token oneDNN kernel cannot run this layer here, or None."""
    if device.type != "cpu":
        return "the oneDNN kernel runs on CPU only"
    if dtype != torch.float32:
        return f"the oneDNN kernel takes float32 activations, not {dtype}"
    if not hasattr(torch.ops.onednn, "qlinear_pointwise") or "onednn" not in torch.backends.quantized.supported_engines:
        return "this torch build has no oneDNN quantized linear"
    if _fbgemm_reduce_range():
        return "full-range uint8 activations can saturate without VNNI"
    return native.unavailable_reason()


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


# Layers with fewer weights than this are kept in float under `auto` (decided at plan time,
# `kept_float_for_speed`): the int8 layer's fixed cost per call (~50 us: per-token quantization
# and rescaling around the GEMM) outweighs the matmul itself. The bound is where int8 reaches
# float's speed at 16 tokens (benchmarks/RESULTS.md, "kernels-small": per-token 1.03-1.11x at
# 2**17 weights, 0.65-0.69x at 2**16; static 1.29-1.35x at 2**16, 0.65x at 2**14). At 1 token
# float stays faster up to ~512x512; from 128 tokens int8 wins from ~2**16 weights: no bound
# suits every batch, and the choice may not depend on it. Weight-only layers have no activation
# quantization to pay for and are never kept float for speed.
SMALL_LAYER = {"dynamic": 1 << 17, "static": 1 << 16}
KEPT_FOR_SPEED = "kept float for speed"  # how such a layer's reason starts


def kept_float_for_speed(scheme: LayerScheme, in_features: int, out_features: int) -> str | None:
    """Why `auto` keeps a layer of this scheme and shape `(out_features, in_features)` in float,
    or None. A pure function of the two: the plan records the answer in the file, so every
    machine that loads it runs the same numerics. An explicit kernel request quantizes any size."""
    bound = SMALL_LAYER.get(scheme.mode)
    weights = in_features * out_features
    if scheme.kernel != "auto" or bound is None or weights >= bound:
        return None
    return (f"{KEPT_FOR_SPEED}: a {scheme.mode} int8 layer under {bound:,} weights is slower than float "
            f"on CPU ({out_features}, {in_features}); an explicit --kernel (e.g. fbgemm) quantizes it anyway")


def select_kernel(
    scheme: LayerScheme,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    in_features: int,
    out_features: int,
) -> KernelChoice:
    """The kernel a layer of `scheme` runs on `device` for activations of `dtype`. Deterministic."""
    request, mode = scheme.kernel, scheme.mode
    device = torch.device(device)
    if mode == "weight-only" and (request in ("lowbit", "int4pack") or scheme.group_size is not None or scheme.bits == 4):
        return _select_low_bit(scheme, device, dtype, in_features, out_features)
    if mode == "weight-only":
        missing = _weight_int8pack_missing(device.type, dtype, in_features, out_features)
        if missing is None:
            why = "requested" if request == "weight_only" else "auto: weight-only mode"
            return KernelChoice("weight_only", why, True)
        return KernelChoice(
            "dequant", f"fallback: torch._weight_int8pack_mm cannot run ({missing})", False
        )
    per_token = scheme.per_token
    if request == "onednn":
        why_not = _onednn_missing(device, dtype) if per_token else "the oneDNN kernel runs dynamic per-token layers only"
        if why_not is None:
            return KernelChoice("onednn", "requested", True)
        other = select_kernel(replace(scheme, kernel="fbgemm"), device=device, dtype=dtype,
                              in_features=in_features, out_features=out_features)
        return replace(other, reason=f"fallback: {why_not}")
    unfused = ""
    if per_token and request == "auto" and device.type == "cpu":
        # fewest passes and parallel regions per layer: fused quantize, one GEMM, fused epilogue
        why_not = _onednn_missing(device, dtype)
        if why_not is None:
            return KernelChoice("onednn", "auto: per-token int8 activations, fused oneDNN", True)
        unfused = f" (not fused: {why_not})"
    missing = _fbgemm_unusable(device, dtype)
    if mode == "static" or per_token:
        # fixed activation parameters (calibrated, or per-token rows normalized to [-1, 1]):
        # the full uint8 range, which only VNNI CPUs run without int16 saturation
        if missing is None and _fbgemm_reduce_range():
            missing = "full-range uint8 activations can saturate fbgemm without VNNI"
        what = "static" if mode == "static" else "per-token"
        if missing is None and request in ("auto", "fbgemm"):
            why = "requested" if request == "fbgemm" else f"auto: {what} int8 activations, prepacked fbgemm{unfused}"
            return KernelChoice("fbgemm", why, True)
        why = f"fallback: {missing}" if request == "fbgemm" else (
            "requested" if request == "int_mm" else f"auto: {what} int8 activations")
        return KernelChoice("int_mm", why, True)
    if request in ("auto", "fbgemm"):  # dynamic, per-tensor activations
        if missing is None:
            rr = ", reduce_range (no VNNI)" if _fbgemm_reduce_range() else ""
            why = "requested" if request == "fbgemm" else "auto: per-tensor activations on CPU"
            return KernelChoice("fbgemm", why + rr, False)
        if request == "fbgemm":
            return KernelChoice("int_mm", f"fallback: {missing}", False)
    why = "requested" if request == "int_mm" else "auto: per-tensor int8 activations"
    return KernelChoice("int_mm", why, False)


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


def _select_low_bit(scheme: LayerScheme, device: torch.device, dtype: torch.dtype, k: int, n: int) -> KernelChoice:
    """Weight-only layers of 4 bits, or in groups, or asking for `lowbit`/`int4pack`.

    `auto`: on CPU qlin's fused `lowbit` kernel (it reads 4-bit weights packed, so a decoder at
    one token reads a quarter of an int8 layer's bytes); on CUDA torch's int4 kernel where its
    rules allow. Where neither can run: 4-bit per channel on `_weight_int8pack_mm` (a 4-bit value
    is an int8 value), groups as the dequantized float weight, reported, never silently."""
    request, bits, group = scheme.kernel, scheme.bits, scheme.group_size
    int4 = int4pack_missing(device.type, dtype, n, k, bits, group)
    if request == "int4pack" and int4 is None:
        return KernelChoice("int4pack", "requested", False)
    if request == "auto" and device.type == "cuda" and int4 is None:
        return KernelChoice("int4pack", "auto: 4-bit groups on CUDA", False)
    fused = "qlin's fused kernels run on CPU only" if device.type != "cpu" else native.unavailable_reason()
    if fused is None and request in ("auto", "lowbit"):
        what = f"{bits}-bit" + (f" groups of {group}" if group else " per channel" if scheme.granularity.name == "channel" else " per tensor")
        return KernelChoice("lowbit", "requested" if request == "lowbit" else f"auto: {what}, fused unpack-and-dot", True)
    why = int4 if request == "int4pack" else fused
    prefix = "fallback" if request in ("lowbit", "int4pack") else "auto"
    if group is None and _weight_int8pack_missing(device.type, dtype, k, n) is None:
        return KernelChoice("weight_only", f"{prefix}: {why}; {bits}-bit values on the int8 kernel", True)
    return KernelChoice("dequant", f"{prefix}: {why}; kept as its dequantized float weight", False)


def _fbgemm_unusable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why fbgemm cannot run this layer here, or None."""
    if device.type != "cpu":
        return "fbgemm runs on CPU only"
    if _fbgemm_missing() is not None:
        return _fbgemm_missing()
    if dtype != torch.float32:
        return f"fbgemm takes float32 activations, not {dtype}"
    return None


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
        self.wsum = None if self.static else _weight_row_sums(weight, self.scale, zp)
        if self.static:
            s_x, z_x = act_qparams
            z_x = int(z_x)
            self.act_divisor = s_x.float() if self.smooth is None else s_x.float() * self.smooth  # () or (K,)
            self.act_zero_point = z_x
            self.out_scale = self.scale * s_x.float()  # (N,) or ()
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


class _Fbgemm:
    """fbgemm with prepacked weights.

    - dynamic per tensor: `quantized.linear_dynamic` (uint8 activations, one scale per call:
      a row's result depends on the rest of the batch);
    - static: `quantized.linear_with_input_q_dq_qweight_dq_output_fp32` with the calibrated
      scale (qlin's int8 zero point z is fbgemm's uint8 z + 128);
    - dynamic per token (asymmetric): each row x[m] is mapped onto [0, 1] by its own range,
      xn = (x - lo[m]) / w[m], which the same fixed-parameter op quantizes with scale 1/255 and
      zero point 0 (the 256 levels of `primitives.activation_qparams`); then
      y = w[m] * op(xn) + lo[m] * wsum[n] + b[n]. Every parameter is fixed or per row, so rows
      never influence each other (batch-invariant). Rows are processed `rows` at a time, so that
      the normalized input and the output stay in the CPU caches (3072 -> 768 on 4096 tokens:
      17.8 ms, against 29.5 ms unchunked; benchmarks/RESULTS.md, kernels-m4096); each row's
      result is the same whatever the chunking.
    """

    def __init__(self, weight, scale, zero_point, bias, act_qparams=None, smooth=None, per_token=False):
        if scale.dim() == 0:
            qw = _quiet(torch._make_per_tensor_quantized_tensor, weight, float(scale), int(zero_point))
        else:
            qw = _quiet(
                torch._make_per_channel_quantized_tensor,
                weight, scale.double(), zero_point.to(torch.int64), 0,
            )
        n, k = weight.shape
        self.n, self.per_token = n, per_token
        self.rows = max(64, min(512, (1 << 21) // max(k, 1)))  # rows per chunk: <= ~8 MB of input
        self.bias = None if bias is None else bias.float()
        packed_bias = None if per_token or self.bias is None else self.bias  # per token: added after the rescale
        self.packed = torch.ops.quantized.linear_prepack(qw, packed_bias)  # releases the GIL
        self.wsum = _weight_row_sums(weight, scale, zero_point) if per_token else None
        self.reduce_range = _fbgemm_reduce_range()
        self.smooth = None if smooth is None else smooth.float()
        self.act = None if act_qparams is None else (float(act_qparams[0]), int(act_qparams[1]) + 128)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError(FBGEMM_UNTRACEABLE)
        if self.smooth is not None:
            x = x / self.smooth
        x = x.contiguous()
        if self.per_token:
            return self._per_token(x)
        if self.act is None:
            return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)
        return _STATIC_FBGEMM(x, *self.act, self.packed)

    def _per_token(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if m <= self.rows:  # one chunk: the op's output becomes the result, no second buffer
            return self._chunk(x, None)
        out = x.new_empty(m, self.n)
        for i in range(0, m, self.rows):
            self._chunk(x[i : i + self.rows], out[i : i + self.rows])
        return out

    def _chunk(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        lo, width = row_ranges(x)  # (rows, 1) each
        inv = width.reciprocal()
        # (x - lo) / width in two vectorized passes: addcmul with two per-row operands runs a
        # scalar loop, 3.5x slower (512 x 768: 90 us against 26 us)
        y = _STATIC_FBGEMM(torch.sub(x, lo).mul_(inv), 1.0 / (QMAX - QMIN), 0, self.packed)
        # width * (y + lo / width * wsum) + b: the first pass stays in the chunk's own (cached)
        # buffer, the second writes the result; each has one per-row operand, so both run
        # vectorized, and a row's rounding never depends on the batch (tested)
        y.addcmul_(lo * inv, self.wsum)
        if out is None:
            out = y
        if self.bias is None:
            return torch.mul(y, width, out=out)
        return torch.addcmul(self.bias, y, width, out=out)


_STATIC_FBGEMM = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32


class _LastInput(threading.local):
    """The input a fused per-token layer quantized last on this thread, and its codes: layers that
    read the same tensor (Q, K and V; gate and up) quantize it once. The entry holds the tensor,
    so its memory cannot be reused for another while the key (address, shape, strides, version
    counter: an in-place torch op bumps it) is kept. A layer never reuses an entry it has read
    already: its next call is the next forward, and a buffer refilled behind torch's back (through
    numpy, say) keeps its version. Inference-mode tensors have no version counter: not cached."""

    key: tuple | None = None
    x: torch.Tensor | None = None
    codes: tuple | None = None
    readers: set | None = None  # id() of the layers that have used this entry


_LAST_INPUT = _LastInput()
_EMPTY = torch.empty(0)


# What torch.jit.trace and torch.export cannot record, said plainly instead of torch's own error
# deep inside the kernel. The fused kernels are C++ functions that torch's dispatcher does not
# know; fbgemm's prepacked weight is a TorchScript object that jit.trace finds only on a module's
# attribute, where torch.export could no longer take it (it cannot fake the object): qlin keeps
# torch.export working.
ONEDNN_UNTRACEABLE = (
    "qlin's fused onednn kernel cannot be traced or exported (its C++ functions are not torch ops): "
    "set QLIN_NATIVE=0 before loading the model to run the fbgemm kernel instead, which torch.export exports"
)
FBGEMM_UNTRACEABLE = (
    "torch.jit.trace cannot record qlin's fbgemm kernel (its prepacked weight is kept outside the module): "
    "use torch.export.export, which can"
)


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

    def _codes(self, x: torch.Tensor) -> tuple:
        if x.is_inference():
            return self.quantize_rows(x, self.smooth)
        last = _LAST_INPUT
        key = (x.data_ptr(), x.shape, x.stride(), x._version, self.smooth.data_ptr())
        if last.key != key or id(self) in last.readers:
            last.key, last.x, last.codes = None, None, None  # drop the old entry before computing
            last.codes = self.quantize_rows(x, self.smooth)
            last.key, last.x, last.readers = key, x, set()
        last.readers.add(id(self))
        return last.codes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            raise RuntimeError(ONEDNN_UNTRACEABLE)
        if x.shape[0] <= self.max_rows:  # one call; quantizing is part of it, so no codes are cached
            return self.linear(x, self.weight, self.scale, self.wsum, self.bias, self.zs, self.smooth)
        return self._three_calls(x)

    def _three_calls(self, x: torch.Tensor) -> torch.Tensor:
        """quantize_rows (codes shared through `_LastInput`), oneDNN's GEMM, epilogue_."""
        q, a, c, rowsum = self._codes(x.float().contiguous())
        y = torch.ops.onednn.qlinear_pointwise(
            q, 1.0, 0, self.packed, self.scale, self.gemm_zero_point, None, 1.0, 0, torch.float32, "none", [], "")
        y = self.epilogue_(y, a, c, self.wsum, self.bias, rowsum, self.zs, None)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


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


class _LowBit:
    """qlin's fused weight-only kernel (`lowbit.lowbit_linear`): float32 activations times B-bit
    weights with one scale (and zero point) per group of G input channels, unpacked on the fly.
    4-bit weights are kept packed two per byte (the file's layout); other widths as int8. Per
    channel is one group of K, per tensor one scale repeated per row. Rows are independent."""

    def __init__(self, weight, scale, zero_point, bias, dtype, bits: int, group_size: int | None):
        n, k = weight.shape
        self.run = lowbit.implementation()  # looked up once here, not at each call
        self.bits = 4 if bits == 4 else 8
        self.weight = lowbit.pack_int4(weight) if bits == 4 else weight.contiguous()
        self.group_size = k if group_size is None else group_size
        shape = (n, -(-k // self.group_size))
        self.scale = scale.float().reshape(-1, 1).expand(shape).contiguous() if scale.dim() < 2 else scale.float().contiguous()
        zp = zero_point.reshape(-1, 1).expand(shape).contiguous() if zero_point.dim() < 2 else zero_point.contiguous()
        self.zero_point = zp if bool(zp.any()) else _EMPTY.to(torch.int8)
        self.bias = _EMPTY if bias is None else bias.float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.run(x.float().contiguous(), self.weight, self.bits, self.scale, self.zero_point, self.group_size, self.bias)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


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


def pack(
    choice: KernelChoice,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    per_token: bool,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    rules: IntMMRules | None = None,
    act_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    smooth: torch.Tensor | None = None,
    bits: int = 8,
    group_size: int | None = None,
):
    """Prepare the operands of `choice.name` once, on `device`; returns a callable
    `(M, K) float -> (M, N)` in the input's dtype. `act_qparams` (scale `()`, zero point `()`)
    makes activations static, else `per_token` says whether dynamic activations are quantized per
    row or per tensor; `smooth` `(K,)` divides them first (SmoothQuant). `bits` and `group_size`
    describe weight-only B-bit weights (scales `(N, ceil(K / G))` per group). `rules`
    overrides the device's `_int_mm` shape rules (tests use it to exercise CUDA's on CPU)."""
    device = torch.device(device)
    weight, scale, zero_point = weight.to(device), scale.to(device), zero_point.to(device)
    bias = None if bias is None else bias.to(device)
    smooth = None if smooth is None else smooth.to(device)
    if act_qparams is not None:
        act_qparams = (act_qparams[0].to(device), act_qparams[1].to(device))
    if choice.name == "int_mm":
        rules = rules or INT_MM_RULES.get(device.type, IntMMRules())
        return _IntMM(weight, scale, zero_point, bias, per_token, rules, act_qparams, smooth)
    if choice.name == "onednn":
        return _Onednn(weight, scale, zero_point, bias, smooth)
    if choice.name == "fbgemm":
        return _Fbgemm(weight, scale, zero_point, bias, act_qparams, smooth, per_token)
    if choice.name == "weight_only":
        return _WeightOnly(weight, scale, zero_point, bias, dtype)
    if choice.name == "lowbit":
        return _LowBit(weight, scale, zero_point, bias, dtype, bits, group_size)
    if choice.name == "int4pack":
        return _Int4Pack(weight, scale, zero_point, bias, dtype, group_size, device)
    if choice.name == "dequant":
        return _Dequant(weight, scale, zero_point, bias, dtype, smooth, group_size)
    raise AssertionError(f"unknown kernel {choice.name}")
