"""Accuracy-aware fallback: quantize, then keep the most sensitive layers in float, one at a
time, until the model's output SQNR reaches a target.

A layer's sensitivity is the model's output SQNR when that layer alone is quantized (every
other layer float): the lower, the more the layer costs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from .config import QuantConfig
from .data import Inputs, model_output
from .errors import ConfigError
from .primitives import sqnr_db
from .plan import find_linears, swap_module
from .quantize import QuantizeResult, quantize_model

__all__ = ["quantize_to_target"]


@dataclass
class _Swappable:
    """A quantized layer the fallback may put back in float."""

    name: str
    paths: list[str]
    float: nn.Module
    int8: nn.Module
    alone_sqnr_db: float = float("nan")  # the model's output SQNR with only this layer in int8


@torch.no_grad()
def quantize_to_target(
    model: nn.Module,
    config: QuantConfig,
    *,
    min_sqnr_db: float,
    eval_inputs: Inputs,
    batch_size: int = 32,
    **options: Any,
) -> QuantizeResult:
    """`quantize_model(model, config, batch_size=..., **options)`, then fall back to float, most
    sensitive layer first, until the output SQNR on `eval_inputs` is at least `min_sqnr_db`.
    Returns a new result whose plan keeps those layers in float; `fallback` records each step.

    Raises ConfigError (before anything is written) if only an all-float model meets the target.
    """
    model.eval()
    reference = model_output(model, eval_inputs, batch_size)
    floats = {name: linear for name, linear, _, _ in find_linears(model)}
    result = quantize_model(model, config, batch_size=batch_size, **options)
    root = result.model
    # each quantized layer: its paths, its float and its int8 module, and its sensitivity
    layers = [_Swappable(r.name, r.plan.paths, floats[r.name], root.get_submodule(r.name)) for r in result.quantized]
    del floats

    def put(layer: _Swappable, int8: bool) -> None:
        nonlocal root
        for path in layer.paths:
            root = swap_module(root, path, layer.int8 if int8 else layer.float)

    def measure() -> float:
        return sqnr_db(reference, model_output(root, eval_inputs, batch_size))

    initial = measure()
    steps: list[dict] = []
    if initial < min_sqnr_db:
        for layer in layers:  # sensitivity: one layer quantized at a time
            put(layer, int8=False)
        for layer in layers:
            put(layer, int8=True)
            layer.alone_sqnr_db = measure()
            put(layer, int8=False)
        for layer in layers:
            put(layer, int8=True)
        current = initial
        remaining = sorted(layers, key=lambda layer: (layer.alone_sqnr_db, layer.name))  # most sensitive first
        while current < min_sqnr_db and remaining:
            layer = remaining.pop(0)
            put(layer, int8=False)
            current = measure()
            steps.append({"layer": layer.name, "alone_sqnr_db": layer.alone_sqnr_db, "sqnr_db_after": current})
        if not remaining:
            best = max((layer.alone_sqnr_db for layer in layers), default=float("nan"))
            raise ConfigError(
                f"`min_sqnr` {min_sqnr_db:g} dB cannot be met with any layer in int8 (the least "
                f"sensitive layer alone gives {best:.1f} dB); nothing was written"
            )
    reasons = {
        step["layer"]: f"accuracy fallback (--min-sqnr {min_sqnr_db:g}): quantized alone it gives "
                       f"{step['alone_sqnr_db']:.1f} dB"
        for step in steps
    }
    kept = tuple(r.kept_float(reasons[r.name]) if r.name in reasons else r for r in result.layers)
    fallback = {
        "target_sqnr_db": min_sqnr_db, "initial_sqnr_db": initial,
        "final_sqnr_db": steps[-1]["sqnr_db_after"] if steps else initial, "steps": steps,
    }
    return replace(result, model=root, layers=kept, fallback=fallback)
