"""`fbgemm`: torch's prepacked fbgemm ops (x86 CPU) with uint8 activations: per token (rows
normalized), per tensor (the scale follows the batch) or static. The ops take float32: bfloat16
and float16 rows are converted to float32 and the result rounded back (until this release such
layers fell back to torch's plain-loop CPU `_int_mm`). The one room that touches quantized
tensors (qint8) and `torch.ops.quantized`; their deprecation warnings are kept from the user."""

from __future__ import annotations

import functools
import platform
import threading
import warnings

import torch

from ..primitives import QMAX, QMIN, row_ranges
from .common import ACCEPTED, reduce_range, weight_row_sums
from .registry import Kernel, KernelChoice

__all__ = ["FBGEMM_UNTRACEABLE", "KERNEL"]

# torch.jit.trace finds a prepacked weight only on a module's attribute, where torch.export could
# no longer take it (it cannot fake the object): qlin keeps torch.export working.
FBGEMM_UNTRACEABLE = (
    "torch.jit.trace cannot record qlin's fbgemm kernel (its prepacked weight is kept outside the module): "
    "use torch.export.export, which can"
)

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


def _fbgemm_unusable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why fbgemm cannot run this layer here, or None."""
    if device.type != "cpu":
        return "fbgemm runs on CPU only"
    if _fbgemm_missing() is not None:
        return _fbgemm_missing()
    if dtype not in ACCEPTED:
        return f"fbgemm takes float32, bfloat16 or float16 activations, not {dtype}"
    return None


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
        self.wsum = weight_row_sums(weight, scale, zero_point) if per_token else None
        self.reduce_range = reduce_range()
        self.smooth = None if smooth is None else smooth.float()
        self.act = None if act_qparams is None else (float(act_qparams[0]), int(act_qparams[1]) + 128)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError(FBGEMM_UNTRACEABLE)
        if x.dtype != torch.float32:  # bfloat16, float16: the float32 result rounded once
            return self._float32(x.float()).to(x.dtype)
        return self._float32(x)

    def _float32(self, x: torch.Tensor) -> torch.Tensor:
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


class _FbgemmKernel(Kernel):
    name, activations, rank = "fbgemm", "int8", 20
    packs_on_one_core = True

    def batch_invariant(self, scheme):
        return scheme.static or scheme.per_token

    def refusal(self, scheme, target):
        missing = _fbgemm_unusable(target.device, target.dtype)
        if missing is None and self.batch_invariant(scheme) and reduce_range():
            # fixed activation parameters (calibrated, or per-token rows normalized to [-1, 1]):
            # the full uint8 range, which only VNNI CPUs run without int16 saturation
            missing = "full-range uint8 activations can saturate fbgemm without VNNI"
        return missing

    def requested(self, scheme, target):
        return KernelChoice(self.name, "requested" + self._reduced(scheme), self.batch_invariant(scheme), False)

    def offer(self, scheme, target, why, fallback):
        if self.refusal(scheme, target) is not None:
            return None
        invariant = self.batch_invariant(scheme)
        if fallback:
            return KernelChoice(self.name, f"fallback: {why}", invariant, True)
        if not invariant:
            return KernelChoice(self.name, "auto: per-tensor activations on CPU" + self._reduced(scheme), False, False)
        what = "static" if scheme.static else "per-token"
        unfused = f" (not fused: {why})" if why else ""
        return KernelChoice(self.name, f"auto: {what} int8 activations, prepacked fbgemm{unfused}", True, False)

    def _reduced(self, scheme) -> str:
        """Per-tensor activations on a CPU without VNNI run 7-bit (reduce_range)."""
        return ", reduce_range (no VNNI)" if not self.batch_invariant(scheme) and reduce_range() else ""

    def pack(self, layer, scheme, device, dtype):
        return _Fbgemm(layer.weight, layer.scale, layer.zero_point, layer.bias, layer.input_qparams, layer.smooth,
                       scheme.per_token)


KERNEL = _FbgemmKernel()
