"""Accuracy-aware fallback: quantize, then widen the most sensitive layers one at a time until
the model's output SQNR reaches a target: layers of fewer than 8 bits first go to 8 bits (per
channel, on the int8 kernels), most sensitive first; only then, if the target is still not met,
do layers go back to float, most sensitive first.

A layer's sensitivity is the model's output SQNR when that layer alone is quantized (every
other layer float): the lower, the more the layer costs. It is measured again before the float
stage, for the layers as they then are. On request (`sensitivity`) every quantized layer's
sensitivity is measured and returned, whether or not any layer falls back.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from .calibrate import LayerCalibration
from .config import QuantConfig
from .data import Inputs, model_output
from .errors import ConfigError
from .kernels.registry import requested_kernel
from .primitives import sqnr_db
from .plan import find_linears, swap_module
from .quantize import (
    Fallback, FallbackStep, LayerResult, LayerSensitivity, QuantizeResult, Sensitivity, quantize_layer, quantize_model,
)
from .scheme import LayerScheme

__all__ = ["quantize_to_target", "fall_back"]


@dataclass
class _Swappable:
    """A quantized layer the fallback may widen to 8 bits or put back in float."""

    name: str
    paths: list[str]
    float: nn.Module
    int8: nn.Module  # the layer as quantized now (B bits until widened)
    result: LayerResult
    alone_sqnr_db: float = float("nan")  # the model's output SQNR with only this layer quantized


class _Swaps:
    """The quantized model with each quantized layer swappable between its int8 and its float
    module, measured against the float model's output on the eval inputs."""

    def __init__(self, root: nn.Module, layers: list[_Swappable], reference: torch.Tensor, eval_inputs: Inputs,
                 batch_size: int):
        self.root, self.layers, self.reference = root, layers, reference
        self.eval_inputs, self.batch_size = eval_inputs, batch_size

    def put(self, layer: _Swappable, int8: bool) -> None:
        for path in layer.paths:
            self.root = swap_module(self.root, path, layer.int8 if int8 else layer.float)

    def widen(self, layer: _Swappable, device) -> None:
        _widen(layer, device)

    def measure(self) -> float:
        """The model's output SQNR (dB) as the layers are now."""
        return sqnr_db(self.reference, model_output(self.root, self.eval_inputs, self.batch_size))

    def sensitivities(self, which: list[_Swappable]) -> list[_Swappable]:
        """`which`, most sensitive first (each measured quantized alone, the others float)."""
        for layer in self.layers:
            self.put(layer, int8=False)
        for layer in which:
            self.put(layer, int8=True)
            layer.alone_sqnr_db = self.measure()
            self.put(layer, int8=False)
        for layer in self.layers:
            self.put(layer, int8=True)
        return sorted(which, key=lambda layer: (layer.alone_sqnr_db, layer.name))


def _wide_scheme(scheme: LayerScheme) -> LayerScheme:
    """The 8-bit per-channel scheme a low-bit layer widens to (its mode and observers kept; a
    low-bit kernel request becomes auto; GPTQ dropped)."""
    requested = requested_kernel(scheme)
    kernel = "auto" if requested is not None and requested.low_bit else scheme.kernel
    # GPTQ's Hessian is not kept past quantization: the widened layer rounds to nearest (at 8 bits
    # GPTQ gains little); AWQ's factors stay (folded into the model, or the layer's smooth_scale)
    rounding = scheme.rounding.replace("+gptq", "") if scheme.awq else "rtn"
    return scheme.with_changes(bits=8, granularity="channel", kernel=kernel, rounding=rounding)


def _widen(layer: _Swappable, device) -> None:
    """Quantize `layer` again at 8 bits per channel, with the calibration it had (static input
    parameters, SmoothQuant factors)."""
    old = layer.int8
    static = old.input_scale is not None
    cal = LayerCalibration(smooth_scale=old.smooth_scale,
                           input_qparams=(old.input_scale, old.input_zero_point) if static else None,
                           input_range=layer.result.input_range)
    entry = replace(layer.result.plan, scheme=_wide_scheme(layer.result.plan.scheme))
    layer.int8, layer.result = quantize_layer(entry, layer.float, cal, device)


@torch.no_grad()
def quantize_to_target(
    model: nn.Module,
    config: QuantConfig,
    *,
    min_sqnr_db: float | None,
    eval_inputs: Inputs,
    batch_size: int = 32,
    sensitivity: bool = False,
    **options: Any,
) -> QuantizeResult:
    """`quantize_model(model, config, batch_size=..., **options)`, then fall back to float, most
    sensitive layer first, until the output SQNR on `eval_inputs` is at least `min_sqnr_db`
    (None: no target). Returns a new result whose plan keeps those layers in float; `fallback`
    records each step, and `sensitivity` each layer's sensitivity it went by. With `sensitivity`,
    `result.sensitivity.ranking` gives every quantized layer's sensitivity as quantized, before any
    fallback step (measured whether or not one is taken).

    Raises ConfigError (before anything is written) if only an all-float model meets the target.
    """
    model.eval()
    reference = model_output(model, eval_inputs, batch_size)
    floats = {name: linear for name, linear, _, _ in find_linears(model)}
    result = quantize_model(model, config, batch_size=batch_size, **options)
    # each quantized layer: its paths, its float and its quantized module, and its sensitivity
    layers = [_Swappable(r.name, r.plan.paths, floats[r.name], result.model.get_submodule(r.name), r)
              for r in result.quantized]
    del floats
    swaps = _Swaps(result.model, layers, reference, eval_inputs, batch_size)
    result = fall_back(result, swaps, min_sqnr_db, sensitivity, options.get("device", "cpu"))
    return replace(result, model=swaps.root)


def fall_back(result: QuantizeResult, swaps: Any, min_sqnr_db: float | None, sensitivity: bool, device
              ) -> QuantizeResult:
    """`result`'s layers measured through `swaps` (`_Swaps`, or the block-by-block one of
    sequential_fallback.py: `layers`, `put`, `widen`, `measure`, `sensitivities`), widened or
    put back in float to `min_sqnr_db`: `result` with the layers, `fallback` and `sensitivity`
    as `quantize_to_target` gives them."""
    layers = swaps.layers
    initial = swaps.measure()
    ranking = None if not sensitivity else tuple(
        LayerSensitivity(layer.name, layer.alone_sqnr_db) for layer in swaps.sensitivities(layers))
    steps = () if min_sqnr_db is None else _fall_back(swaps, min_sqnr_db, initial, device)
    # every layer whose sensitivity was measured: the output SQNR with it alone quantized (at its last width)
    latest = tuple(LayerSensitivity(layer.name, layer.alone_sqnr_db) for layer in layers
                   if not math.isnan(layer.alone_sqnr_db))
    measured = Sensitivity(initial, latest, ranking)
    if min_sqnr_db is None:
        return replace(result, sensitivity=measured if sensitivity else None)
    reasons = {
        step.layer: f"accuracy fallback (--min-sqnr {min_sqnr_db:g}): quantized alone it gives {step.alone_sqnr_db:.1f} dB"
        for step in steps if step.to == "float"
    }
    now = {layer.name: layer.result for layer in layers}  # widened layers have new results
    kept = tuple(r.kept_float(reasons[r.name]) if r.name in reasons else now.get(r.name, r) for r in result.layers)
    fallback = Fallback(min_sqnr_db, initial, steps[-1].sqnr_db_after if steps else initial, steps)
    return replace(result, layers=kept, fallback=fallback, sensitivity=measured)


def _fall_back(swaps: _Swaps, min_sqnr_db: float, current: float, device) -> tuple[FallbackStep, ...]:
    """Widen low-bit layers to 8 bits, then put layers back in float, most sensitive first,
    until the output SQNR (now `current`) reaches `min_sqnr_db`; the steps taken."""
    steps: list[FallbackStep] = []
    narrow = [layer for layer in swaps.layers if layer.result.plan.scheme.bits < 8]
    if current < min_sqnr_db and narrow:  # first: low-bit layers to 8 bits
        remaining = swaps.sensitivities(narrow)
        while current < min_sqnr_db and remaining:
            layer = remaining.pop(0)
            bits = layer.result.plan.scheme.bits
            swaps.widen(layer, device)
            swaps.put(layer, int8=True)
            current = swaps.measure()
            steps.append(FallbackStep(layer.name, "8-bit", layer.alone_sqnr_db, current, from_bits=bits))
    if current < min_sqnr_db:  # then: layers back to float
        remaining = swaps.sensitivities(swaps.layers)
        while current < min_sqnr_db and remaining:
            layer = remaining.pop(0)
            swaps.put(layer, int8=False)
            current = swaps.measure()
            steps.append(FallbackStep(layer.name, "float", layer.alone_sqnr_db, current))
        if not remaining:
            best = max((layer.alone_sqnr_db for layer in swaps.layers), default=float("nan"))
            raise ConfigError(
                f"`min_sqnr` {min_sqnr_db:g} dB cannot be met with any layer in int8 (the least "
                f"sensitive layer alone gives {best:.1f} dB); nothing was written"
            )
    return tuple(steps)
