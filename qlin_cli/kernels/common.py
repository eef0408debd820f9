"""What several kernels share: the CPU's int8 features, a weight's dequantized row sums, an empty
tensor for "none" where a C++ function takes tensors only."""

from __future__ import annotations

import functools

import torch

__all__ = ["ACCEPTED", "cpu_features", "reduce_range", "static_operands", "weight_int_sums", "weight_row_sums", "EMPTY"]

EMPTY = torch.empty(0)
# the activation dtypes qlin's CPU int8 kernels take: each reads float32 (and some bf16) as it is,
# the others converted to float32 and the result rounded back once. Without float16 a float16
# model's int8 layers ran torch's plain-loop CPU `_int_mm` (4.5-38x slower than its float16 layer
# at one token, RESULTS.md "fp16-layers").
ACCEPTED = (torch.float32, torch.bfloat16, torch.float16)


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


def weight_int_sums(weight: torch.Tensor) -> torch.Tensor:
    """`sum_k qw[n, k]` of an int8 weight `(N, K)`, exact, as int32 `(N,)`."""
    n, k = weight.shape
    out = torch.empty(n, dtype=torch.int32, device=weight.device)
    step = max(1, (1 << 20) // max(1, k))  # a block of rows at a time: the int32 copy the sum makes stays small,
    for i in range(0, n, step):  # and written into `out`: a small result allocated after each block's copy
        torch.sum(weight[i:i + step], dim=1, dtype=torch.int32, out=out[i:i + step])  # kept every freed copy
    return out  # from being reused (a 32000 x 2048 head's sums left 208 MB resident; now 8, 2.5x faster)


def weight_row_sums(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    int_sums: torch.Tensor | None = None) -> torch.Tensor:
    """Row sums of the dequantized weight `(N, K)`, `s[n] * sum_k (qw[n, k] - z[n])`, as float32
    `(N,)`: what an activation offset (x = a * q + c) contributes, c * wsum[n]. The integer sums
    (`weight_int_sums`, or `int_sums` where the caller has them) are exact."""
    sums = weight_int_sums(weight) if int_sums is None else int_sums
    sums = sums - weight.shape[1] * zero_point.to(torch.int32).reshape(-1)  # (N,) exact
    return sums.float() * scale.float().reshape(-1)


def static_operands(scale: torch.Tensor, input_qparams: tuple[torch.Tensor, torch.Tensor],
                    smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A static layer's float operands, one computation for the kernels that must give the same
    bits (int_mm, pertoken's static_linear): the activations' divisor, s_x, or s_x * smooth
    `(K,)` (SmoothQuant's division folded in), and the output scale s_x * s[n], `()` or `(N,)`
    as the weight scale is per tensor or per channel."""
    s_x = input_qparams[0].float()
    divisor = s_x if smooth is None else s_x * smooth.float()
    weight_scale = scale.float().reshape(-1) if scale.dim() else scale.float()
    return divisor, weight_scale * s_x


def reduce_range() -> bool:
    """Whether uint8 activations must keep to 7 bits here: fbgemm's 8-bit activations can saturate
    int16 sums on CPUs without VNNI (and so would oneDNN's full-range codes)."""
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_features())
