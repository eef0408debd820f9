"""Accuracy-aware fallback: quantize, then keep the most sensitive layers in float, one at a
time, until the model's output SQNR reaches a target.

A layer's sensitivity is the model's output SQNR when that layer alone is quantized (every
other layer float): the lower, the more the layer costs.
"""

from __future__ import annotations

from dataclasses import replace
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
    paths = {r.name: r.plan.paths for r in result.quantized}
    root = result.model

    def put(name: str, module: nn.Module) -> None:
        nonlocal root
        for path in paths[name]:
            root = swap_module(root, path, module)

    def measure() -> float:
        return sqnr_db(reference, model_output(root, eval_inputs, batch_size))

    quantized = {name: root.get_submodule(name) for name in paths}
    initial = measure()
    steps: list[dict] = []
    if initial < min_sqnr_db:
        for name in quantized:  # sensitivity: one layer quantized at a time
            put(name, floats[name])
        sensitivity = {}
        for name, q in quantized.items():
            put(name, q)
            sensitivity[name] = measure()
            put(name, floats[name])
        for name, q in quantized.items():
            put(name, q)
        current = initial
        remaining = sorted(quantized, key=lambda n: (sensitivity[n], n))  # most sensitive first
        while current < min_sqnr_db and remaining:
            name = remaining.pop(0)
            put(name, floats[name])
            current = measure()
            steps.append({"layer": name, "alone_sqnr_db": sensitivity[name], "sqnr_db_after": current})
        if not remaining:
            best = max(sensitivity.values()) if sensitivity else float("nan")
            raise ConfigError(
                f"`min_sqnr` {min_sqnr_db:g} dB cannot be met with any layer in int8 (the least "
                f"sensitive layer alone gives {best:.1f} dB); nothing was written"
            )
    reasons = {
        step["layer"]: f"accuracy fallback (--min-sqnr {min_sqnr_db:g}): quantized alone it gives "
                       f"{step['alone_sqnr_db']:.1f} dB"
        for step in steps
    }
    layers = tuple(r.kept_float(reasons[r.name]) if r.name in reasons else r for r in result.layers)
    fallback = {
        "target_sqnr_db": min_sqnr_db, "initial_sqnr_db": initial,
        "final_sqnr_db": steps[-1]["sqnr_db_after"] if steps else initial, "steps": steps,
    }
    return replace(result, model=root, layers=layers, fallback=fallback)
