"""Affine integer quantization math, the one home of it.

    q = clamp(round(x / s) + z, qmin, qmax)        x ~ s * (q - z)

Weights `(out_features, in_features)`: scale and zero point have shape `()` per tensor,
`(out_features,)` per channel and `(out_features, ceil(in_features / G))` per group of G input
channels (see `Granularity`). B-bit weights (2 <= B <= 8; 8 by default), with
Q = 2^(B-1) - 1: symmetric z = 0, s = amax / Q, q in [-Q, Q] (8 bits: [-127, 127]); asymmetric,
the range [min(x, 0), max(x, 0)] maps onto [-(Q + 1), Q] (8 bits: [-128, 127]). Values are int8
whatever B. Groups are computed as rows: `grouped` views a weight as `(out * groups, G)` (the
last group of a row zero-padded when G does not divide in; zeros never widen a range, which
always includes 0), so per-group math is per-channel math on that view.

`amin_amax` is the one reduction; observers (calibration) use it too, so calibration and
direct quantization share the same math.
"""

from __future__ import annotations

import math

import torch

from .scheme import PER_CHANNEL, PER_TENSOR, Granularity, PerGroup
from .errors import InputError

__all__ = [
    "QMIN",
    "QMAX",
    "MIN_SCALE",
    "amin_amax",
    "check_finite",
    "qparams_from_range",
    "choose_qparams",
    "half_scales",
    "quantize",
    "dequantize",
    "qrange",
    "grouped",
    "packed_row_bytes",
    "row_ranges",
    "activation_qparams",
    "quantize_activations",
    "sqnr_db",
    "sums_db",
]

QMIN, QMAX = -128, 127
MIN_SCALE = 2.0**-40  # ~9.1e-13, exact in float32: scale given to an all-zero row/tensor instead of 0 (no division by zero)


def qrange(bits: int = 8, symmetric: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of B-bit weights: [-(2^(B-1) - 1), 2^(B-1) - 1] symmetric (negation exact),
    [-2^(B-1), 2^(B-1) - 1] asymmetric."""
    qmax = (1 << (bits - 1)) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes of one weight row in the qlin file: `in_features` values of `bits` bits, packed
    (8 bits: one byte each)."""
    return -(-in_features * bits // 8)


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """A weight `(out, in)` as rows of groups `(out * ceil(in / G), G)`: row r is group r % groups
    of output row r // groups; the last group of each row is zero-padded when G does not divide
    in. A view (no copy) when it does."""
    out_f, in_f = x.shape
    pad = -in_f % group_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(-1, group_size)


def _ungrouped(q: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of `grouped`: `(out * groups, G)` back to `(out, in)`."""
    out_f, in_f = shape
    return q.reshape(out_f, -1)[:, :in_f]


def _expand(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A scale/zero point of shape `()` or `(C,)` viewed to broadcast against an `ndim` tensor
    whose dim 0 has C elements."""
    return t if t.dim() == 0 else t.reshape(t.shape + (1,) * (ndim - 1))


def check_finite(x: torch.Tensor, what: str, fix: str = "fix the model first") -> None:
    """Raise InputError naming `what` (and saying `fix`) if `x` holds NaN or Inf. Checked in
    blocks of rows: torch.isfinite of a whole tensor makes a float copy (its abs) and two masks,
    which for a 262 MB float32 LM head was +440 MB of peak memory, the most of a streamed run."""
    if not all(bool(torch.isfinite(x[i]).all()) for i in _blocks(x)):
        bad = sum(int((~torch.isfinite(x[i])).sum()) for i in _blocks(x))
        raise InputError(f"{what} has {bad} non-finite value(s) (NaN or Inf); {fix}")


def amin_amax(
    x: torch.Tensor, granularity: Granularity, axis: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `x` as float32: `()` per tensor, `(x.shape[axis],)` per channel (axis 0 for
    weights `(out, in)`: one per row; axis 1 for activations `(tokens, in)`: one per input
    channel)."""
    if axis == 0 and x.dim() >= 1 and x.shape[0] and x.dtype != torch.float32:
        # a weight in half precision: in blocks of rows, so that no float32 copy of the whole weight
        # is made (a 7B model's 32000 x 4096 bf16 head: +500 MB). min and max are exact either way.
        los, his = [], []
        for i in _blocks(x):
            part = x[i].detach().float()
            part = part.reshape(1, -1) if granularity == PER_TENSOR else part.reshape(part.shape[0], -1)
            los.append(part.amin(dim=-1))
            his.append(part.amax(dim=-1))
        lo, hi = torch.cat(los), torch.cat(his)
        return (lo.amin(), hi.amax()) if granularity == PER_TENSOR else (lo, hi)
    flat = x.detach().float()
    if granularity == PER_TENSOR:
        flat = flat.reshape(-1)
    else:
        flat = flat.movedim(axis, 0).reshape(x.shape[axis], -1)
    # two reductions, not torch.aminmax: with a dim, aminmax is ~14x slower on CPU (torch 2.13,
    # 512x3072: 1.7 ms against 0.12 ms for amin + amax)
    return flat.amin(dim=-1), flat.amax(dim=-1)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, symmetric: bool, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int8) of the same shape as `lo`/`hi` for a range, for
    B-bit values (`qrange`).

    Symmetric: s = max(|lo|, |hi|) / qmax (127 at 8 bits), z = 0. Asymmetric: the range is
    widened to include 0, s = (hi - lo) / (2^B - 1), z = round(qmin - lo / s), so that 0.0 is
    exactly representable. A zero-width range gets scale MIN_SCALE.
    """
    qmin, qmax = qrange(bits, symmetric)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp_min(MIN_SCALE)
        zero_point = torch.zeros_like(scale, dtype=torch.int8)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(MIN_SCALE)
        zero_point = torch.round(qmin - lo / scale).clamp(qmin, qmax).to(torch.int8)
    return scale, zero_point


def half_scales(scale: torch.Tensor) -> torch.Tensor:
    """Group scales as float16 values (still float32 tensors): each one rounded up to the nearest
    float16 (never down, so that a group's range still fits its codes), where that is a normal
    float16 (2^-14 to 65504); the others (an all-zero group's MIN_SCALE, say) as they were.
    GPTQ, AWQ, llama.cpp and compressed-tensors keep group scales in 16 bits too; qlin's file
    keeps float32, and a kernel whose scales are all float16 values holds them in 2 bytes
    instead of 4 (`lowbit_dynamic`: at 4 bits, groups of 32, a tenth fewer bytes a token).
    The rounding changes a scale by at most 2^-10 of itself."""
    s = scale.float()
    h = s.to(torch.float16)
    below = h.float() < s
    h = torch.where(below, (h.view(torch.int16) + 1).view(torch.float16), h)  # the next float16 up (s > 0)
    up = h.float()
    return torch.where(torch.isfinite(up) & (up >= 2.0**-14), up, s)


def choose_qparams(
    x: torch.Tensor, granularity: Granularity, symmetric: bool = True, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int8) for `x` `(out, in)`: shapes `()`, `(out,)` or, per
    group, `(out, ceil(in / G))` (float16 values, `half_scales`)."""
    if isinstance(granularity, PerGroup):
        lo, hi = amin_amax(grouped(x, granularity.size), PER_CHANNEL)
        shape = granularity.scale_shape(tuple(x.shape))
        scale, zero_point = qparams_from_range(lo, hi, symmetric, bits)
        return half_scales(scale).reshape(shape), zero_point.reshape(shape)
    lo, hi = amin_amax(x, granularity)
    return qparams_from_range(lo, hi, symmetric, bits)


# elements per block of rows in `quantize` and `weight_sqnr_db`: their float temporaries stay
# ~1 MB whatever the layer's size (whole-tensor temporaries of a 3072x768 weight were ~40 MB,
# which the allocator kept: BERT-base's `qlin quantize` peak RSS grew by ~50 MB)
ROW_BLOCK = 1 << 18


def _blocks(x: torch.Tensor) -> list:
    """Index of each block of rows of `x` (about ROW_BLOCK elements), or `...` for a 0-dim `x`."""
    if x.dim() == 0:
        return [...]
    step = max(1, ROW_BLOCK // max(1, x[0].numel())) if x.shape[0] else 1
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def _rows(t: torch.Tensor, index) -> torch.Tensor:
    """The part of a scale/zero point (`()` or one per row) for the rows at `index`."""
    return t if t.dim() == 0 else t[index]


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, symmetric: bool = True,
    bits: int = 8, group_size: int | None = None,
) -> torch.Tensor:
    """int8 values of `x` (any float dtype, computed in float32) for a scale/zero point of shape
    `()`, `(x.shape[0],)` or, with `group_size`, `(out, groups)`; in `qrange(bits, symmetric)`
    (8-bit symmetric: [-127, 127]). Computed in blocks of rows."""
    if group_size is not None:
        rows = quantize(grouped(x, group_size), scale.reshape(-1), zero_point.reshape(-1), symmetric, bits)
        return _ungrouped(rows, tuple(x.shape)).contiguous()
    s = _expand(scale.float(), x.dim())
    z = _expand(zero_point.float(), x.dim())
    shift = bool(z.any())
    lo, hi = qrange(bits, symmetric)
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    for i in _blocks(x):
        q = (x[i].float() / _rows(s, i)).round_()  # one float temporary, changed in place
        if shift:
            q.add_(_rows(z, i))
        out[i] = q.clamp_(lo, hi)  # integers in [-128, 127]: exact in int8
    return out


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """float32 `s * (q - z)` with scale/zero point of shape `()`, `(q.shape[0],)` or, with
    `group_size`, `(out, groups)`."""
    if group_size is not None:
        rows = dequantize(grouped(q, group_size), scale.reshape(-1), zero_point.reshape(-1))
        return _ungrouped(rows, tuple(q.shape)).contiguous()
    s = _expand(scale.float(), q.dim())
    out = q.float()  # the one temporary: q - z is exact in float32 (|q - z| <= 255)
    if bool(zero_point.any()):
        out.sub_(_expand(zero_point.float(), q.dim()))
    return out.mul_(s)


def sums_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) of two sums of squares (`sqnr_db` of sums gathered in parts):
    +inf without noise, -inf without signal."""
    return _db(signal, noise)


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - approx)^2).
    +inf when the two are equal. Norms are reduced in float32 without float64 copies, so a
    large layer costs one temporary (the difference), not three."""
    ref = reference.detach().float()
    noise = float(torch.linalg.vector_norm(ref - approx.detach().float())) ** 2
    return _db(float(torch.linalg.vector_norm(ref)) ** 2, noise)


def weight_sqnr_db(
    weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    smooth: torch.Tensor | None = None, group_size: int | None = None,
) -> float:
    """`sqnr_db(weight, dequantize(q, scale, zero_point) [/ smooth])`, in blocks of rows: no
    float copy of the whole weight."""
    signal = noise = 0.0
    for i in _blocks(q):
        deq = dequantize(q[i], _rows(scale, i), _rows(zero_point, i), group_size)
        if smooth is not None:
            deq.div_(smooth.float())
        ref = weight[i].detach().float()
        noise += float(torch.linalg.vector_norm(deq.sub_(ref))) ** 2
        signal += float(torch.linalg.vector_norm(ref)) ** 2
    return _db(signal, noise)


def row_ranges(x: torch.Tensor, per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and width (max - min, at least MIN_SCALE) of each row of float32 `x` `(M, K)`:
    `(M, 1)` each per token, `()` per tensor."""
    flat = x if per_token else x.reshape(1, -1)
    lo = flat.amin(dim=1, keepdim=True)
    width = flat.amax(dim=1, keepdim=True).sub_(lo).clamp_min_(MIN_SCALE)
    return (lo, width) if per_token else (lo.reshape(()), width.reshape(()))


def activation_qparams(lo: torch.Tensor, width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of dynamic (asymmetric) activations whose range is [lo, lo + width]:
    all 256 int8 levels cover it, x ~ scale * q + offset with q in [-128, 127],
    scale = width / 255 (at least MIN_SCALE) and offset = lo + 128 * scale.

    Unlike `qparams_from_range`, the range is not widened to include 0 and the offset is not
    rounded to an integer zero point: a matmul never needs an exact 0, and a one-sided row
    (ReLU or GELU outputs) gets twice the resolution that symmetric int8 would give it.
    """
    scale = (width / (QMAX - QMIN)).clamp_min_(MIN_SCALE)
    return scale, lo + (-QMIN) * scale


def quantize_activations(
    x: torch.Tensor, per_token: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric dynamic int8 quantization of activations `x` `(M, K)` (any float dtype).

    Returns `q` int8 `(M, K)`, the float32 scale and offset (`x ~ scale * q + offset`, see
    `activation_qparams`): `(M, 1)` per token (each row's values and parameters depend on that
    row alone, so results do not depend on the batch), `()` per tensor.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    scale, offset = activation_qparams(*row_ranges(xf, per_token))
    q = (xf - offset).div_(scale).round_().clamp_(QMIN, QMAX)
    return q.to(torch.int8), scale, offset
