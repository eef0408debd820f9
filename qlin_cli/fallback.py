"""Accuracy-aware fallback: quantize, then keep the most sensitive layers in float, one at a
time, until the model's output SQNR reaches a target.

A layer's sensitivity is the model's output SQNR when that layer alone is quantized (every
other layer float): the lower, the more the layer costs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import QuantConfig
from .errors import ConfigError
from .primitives import sqnr_db
from .report import Inputs, batches, first_tensor, run_model
from .swap import Progress, QuantizeResult, find_linears, quantize_model, swap_module

__all__ = ["model_output", "quantize_to_target"]


@torch.no_grad()
def model_output(model: nn.Module, inputs: Inputs, batch_size: int) -> torch.Tensor:
    """The first tensor of the model's output on every sample, concatenated `(N, ...)`."""
    parts = [first_tensor(run_model(model, chunk))[0].float() for chunk in batches(inputs, batch_size)]
    return torch.cat(parts)


@torch.no_grad()
def quantize_to_target(
    model: nn.Module,
    config: QuantConfig,
    *,
    min_sqnr_db: float,
    eval_inputs: Inputs,
    calib: Inputs | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    calib_progress: Progress | None = None,
) -> QuantizeResult:
    """`quantize_model`, then fall back to float, most sensitive layer first, until the output
    SQNR on `eval_inputs` is at least `min_sqnr_db`. `result.fallback` records each step.

    Raises ConfigError (before anything is written) if only an all-float model meets the target.
    """
    model.eval()
    reference = model_output(model, eval_inputs, batch_size)
    floats = {name: (linear, [name, *aliases]) for name, linear, aliases, _ in find_linears(model)}
    result = quantize_model(model, config, calib=calib, batch_size=batch_size, device=device,
                            progress=progress, calib_progress=calib_progress)
    quantized = {r.name: result.model.get_submodule(r.name) if r.name else result.model for r in result.quantized}

    def put(name: str, module: nn.Module) -> None:
        for path in floats[name][1]:
            result.model = swap_module(result.model, path, module)

    def measure() -> float:
        return sqnr_db(reference, model_output(result.model, eval_inputs, batch_size))

    initial = measure()
    steps: list[dict] = []
    if initial < min_sqnr_db:
        for name in quantized:  # sensitivity: one layer quantized at a time
            put(name, floats[name][0])
        sensitivity = {}
        for name, q in quantized.items():
            put(name, q)
            sensitivity[name] = measure()
            put(name, floats[name][0])
        for name, q in quantized.items():
            put(name, q)
        current = initial
        remaining = sorted(quantized, key=lambda n: (sensitivity[n], n))  # most sensitive first
        while current < min_sqnr_db and remaining:
            name = remaining.pop(0)
            put(name, floats[name][0])
            current = measure()
            steps.append({"layer": name, "alone_sqnr_db": sensitivity[name], "sqnr_db_after": current})
        if not remaining:
            best = max(sensitivity.values()) if sensitivity else float("nan")
            raise ConfigError(
                f"--min-sqnr {min_sqnr_db:g} dB cannot be met with any layer in int8 (the least "
                f"sensitive layer alone gives {best:.1f} dB); nothing was written"
            )
        by_name = {r.name: r for r in result.layers}
        for step in steps:
            rec = by_name[step["layer"]]
            rec.status = "skipped"
            rec.reason = (f"accuracy fallback (--min-sqnr {min_sqnr_db:g}): quantized alone it gives "
                          f"{step['alone_sqnr_db']:.1f} dB")
            for key in ("mode", "granularity", "symmetric", "act_granularity", "kernel_request", "weight_observer",
                        "observer", "smooth", "kernel", "kernel_reason", "batch_invariant", "input_range",
                        "input_scale", "input_zero_point"):
                setattr(rec, key, None)
            rec.bytes_int8 = rec.bytes_float
    result.fallback = {
        "target_sqnr_db": min_sqnr_db, "initial_sqnr_db": initial,
        "final_sqnr_db": steps[-1]["sqnr_db_after"] if steps else initial, "steps": steps,
    }
    return result
