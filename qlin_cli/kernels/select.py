"""Which kernel a layer runs (`select_kernel`), preparing its operands once (`pack`), and whether a
layer is too small for int8 to pay (`kept_float_for_speed`). Every fact about a kernel comes from
its room, through the registry.

Selection is a pure function of the layer's scheme (kernel request, mode, bits, groups, activation
granularity), the device, dtype and shape, and of what this torch build and CPU offer; it never
times anything, so the same machine always picks the same kernel and the saved file never depends
on it:
- a named kernel runs where it can (`refusal` is None); where it cannot, the other kernels of its
  family that are not low-bit ones are asked in `rank` order, as `auto` asks them (`offer`), and
  the one that takes the layer is a reported fallback (`KernelChoice.fallback`), its reason
  "fallback: " and why. (Only the kernels ranked after the request were asked before: `--kernel
  fbgemm` on a CPU without VNNI then fell back to `int_mm`, torch's plain CPU loop, 8-50x slower
  than float32, where `pertoken` computes the same per-token codes at float's speed or better);
- `auto` asks the kernels whose activations fit the mode (int8 for dynamic and static, float
  for weight-only; for grouped dynamic layers only the `grouped_int8` ones), in `rank` order,
  and the first that offers itself runs.

Whether a layer is too small for int8 to pay is decided when the model is planned, from its shape
and scheme only, and recorded in the file as a layer kept in float: the machine that loads the
file never changes what a layer computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from . import registry
from .registry import KernelChoice, LayerTensors, Target

if TYPE_CHECKING:
    from ..scheme import LayerScheme

__all__ = ["SMALL_LAYER", "KEPT_FOR_SPEED", "kept_float_for_speed", "select_kernel", "pack"]


# Layers with fewer weights than this are kept in float under `auto` (decided at plan time,
# `kept_float_for_speed`): the int8 layer's fixed cost per call (~45 us where it takes three
# calls: quantization, GEMM and rescaling) outweighs the matmul itself. The bound is where int8
# reached float's speed at 16 tokens on the three-call paths (benchmarks/RESULTS.md,
# "kernels-small": per-token 1.03-1.11x at 2**17 weights, 0.65-0.69x at 2**16; static 1.29-1.35x at
# 2**16, 0.65x at 2**14). The one-call `onednn` path (up to 16 rows, ~7-10 us) wins from 2**16
# weights at 1, 16 and 128 tokens on an AVX-512 VNNI CPU ("layer-cost-small"); on an AVX2 CPU
# without VNNI the `pertoken` kernel wins at 1 token at every size and loses at 16 and more at
# every size (int8 and float32 multiply at the same rate there). No one bound fits both, and the
# bound is recorded in the file from the shape alone (the quantizing machine's CPU must not change
# the file), so it stays. Weight-only layers have no activation quantization to pay for and are
# never kept float for speed.
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
    target = Target(torch.device(device), dtype, in_features, out_features)
    activations = "float" if scheme.mode == "weight-only" else "int8"
    family = [k for k in registry.kernels() if k.activations == activations]
    if activations == "int8" and scheme.group_size is not None:  # one scale per group: an integer dot per group
        family = [k for k in family if k.grouped_int8]
    requested = registry.requested_kernel(scheme)
    if requested is None:
        return _first_offer(family, scheme, target, None, fallback=False)
    why = requested.refusal(scheme, target)
    if why is None:
        return requested.requested(scheme, target)
    others = [k for k in family if k is not requested and not k.low_bit]
    return _first_offer(others, scheme, target, why, fallback=True)


def _first_offer(kernels: list[registry.Kernel], scheme: LayerScheme, target: Target, why: str | None,
                 fallback: bool) -> KernelChoice:
    """The first of `kernels` that offers to run the layer; a kernel `auto` passes over may say why
    (a fallback keeps the refused request's reason)."""
    for kernel in kernels:
        offer = kernel.offer(scheme, target, why, fallback)
        if isinstance(offer, KernelChoice):
            return offer
        if offer is not None and not fallback:
            why = offer
    raise AssertionError(f"no registered kernel offers to run {scheme} on {target}")


def pack(choice: KernelChoice, layer: LayerTensors, scheme: LayerScheme, *, device: torch.device | str,
         dtype: torch.dtype = torch.float32) -> Callable[[torch.Tensor], torch.Tensor]:
    """Prepare the operands of `choice.name` for `layer` of `scheme` once, on `device`; returns a
    callable `(M, K) float -> (M, N)` in the input's dtype (`dtype`: the layer's float dtype)."""
    device = torch.device(device)
    kernel = registry.get(choice.name)
    run = kernel.pack(layer.to(device), scheme, device, dtype)
    if layer.smooth is not None and kernel.activations == "float" and not kernel.float_weights:
        # a weight-only layer with AWQ's factors kept per layer (rounding.py): the integer
        # weight-only kernels take no per-input-channel factor, so the input is divided first
        # (dequant folds it into its float weight)
        return _DividedInputs(run, layer.smooth.to(device))
    return run


class _DividedInputs:
    """A packed kernel run on x / smooth `(K,)`, in the input's dtype."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], smooth: torch.Tensor) -> None:
        self.run, self.smooth = run, smooth.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run((x.float() / self.smooth).to(x.dtype))
