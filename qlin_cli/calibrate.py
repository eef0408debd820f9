"""Calibration: run sample inputs through the float model and let observers watch the inputs of
the planned Linear layers; then derive SmoothQuant factors and static activation parameters.

Memory stays bounded by the observers' state (plus one small input sample per layer, kept for
the per-layer output SQNR), whatever the number of calibration samples.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from .data import Inputs, Progress, batches, num_samples, run_model
from .observers import make_observer
from .plan import PlanEntry, effective_linear
from .primitives import check_finite
from .scheme import PER_CHANNEL, PER_TENSOR

__all__ = ["LayerCalibration", "input_hooks", "calibrate", "smooth_factors"]

SAMPLE_ROWS = 256  # input rows kept per layer to measure its output SQNR after quantization


@dataclass
class LayerCalibration:
    """What calibration learned about one layer's inputs."""

    smooth_scale: torch.Tensor | None = None  # (in,) float32
    input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None  # scale (), zero point () int8
    input_range: tuple[float, float] | None = None  # of the (smoothed) inputs
    sample: torch.Tensor | None = None  # (<= SAMPLE_ROWS, in) float, the first inputs seen


@contextmanager
def input_hooks(layers: dict[str, nn.Module], watch: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call `watch(name, x)` with each layer's input flattened to `(tokens, in_features)` on every
    forward; the hooks are removed on exit, also when the forward raises."""
    handles = []
    try:
        for name, module in layers.items():
            def hook(mod, args, name=name):
                x = args[0]
                watch(name, x.detach().reshape(-1, x.shape[-1]))
            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _run_all(model: nn.Module, inputs: Inputs, batch_size: int, progress: Progress | None, label: str) -> None:
    n = num_samples(inputs)
    total = (n + batch_size - 1) // batch_size
    for i, chunk in enumerate(batches(inputs, batch_size)):
        run_model(model, chunk, "model during calibration")
        if progress is not None:
            progress(i + 1, total, label)


def smooth_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per input channel factors s_j = max|X_j|^alpha / max|W_j|^(1 - alpha).

    `act_absmax` `(in,)`, `weight` `(out, in)` -> `(in,)` float32. Channels where either side is
    zero (dead inputs, zero columns) get 1; factors are clamped to [1e-5, 1e5].
    """
    w_absmax = weight.detach().float().abs().amax(dim=0)  # (in,)
    s = act_absmax.float().pow(alpha) / w_absmax.pow(1.0 - alpha)
    ok = (act_absmax > 0) & (w_absmax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp_(1e-5, 1e5)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    layers: list[PlanEntry],
    inputs: Inputs,
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> list[LayerCalibration]:
    """Observe the inputs of the planned `layers` of `model` on `inputs`: one pass, or two when
    SmoothQuant and static mode meet (the static range is observed on smoothed inputs). Returns
    one LayerCalibration per entry, in order. SmoothQuant reads a layer's effective weight
    `(out, in)` (an nn.Linear subclass's affine map)."""
    result = {e.name: LayerCalibration() for e in layers}
    modules = {e.name: model.get_submodule(e.name) for e in layers}

    def keep_sample(name: str, x: torch.Tensor) -> None:
        if result[name].sample is None:
            check_finite(x, f"layer {name!r}: calibration input", "check the calibration data")
            result[name].sample = x[:SAMPLE_ROWS].clone()

    smoothed = {e.name: e for e in layers if e.scheme.smooth is not None}
    static = {e.name: e.scheme for e in layers if e.scheme.static}
    if smoothed:
        absmax = {n: make_observer("absmax", PER_CHANNEL, axis=1, what=f"layer {n!r}: calibration input") for n in smoothed}

        def watch_smooth(name: str, x: torch.Tensor) -> None:
            keep_sample(name, x)
            if name in absmax:
                absmax[name].update(x)

        with input_hooks(modules, watch_smooth):
            _run_all(model, inputs, batch_size, progress, "calibrating (SmoothQuant)")
        for name, e in smoothed.items():
            weight = effective_linear(modules[name], name).weight
            result[name].smooth_scale = smooth_factors(absmax[name].range()[1], weight, e.scheme.smooth)

    if static:
        observers = {
            n: make_observer(s.observer, PER_TENSOR, axis=1, what=f"layer {n!r}: calibration input",
                             **({"percentile": s.percentile} if s.observer == "percentile" else {}))
            for n, s in static.items()
        }

        def watch_static(name: str, x: torch.Tensor) -> None:
            keep_sample(name, x)
            if name in observers:
                smooth = result[name].smooth_scale
                observers[name].update(x if smooth is None else x / smooth.to(x.device))

        with input_hooks(modules, watch_static):
            _run_all(model, inputs, batch_size, progress, "calibrating")
        for name, obs in observers.items():
            lo, hi = obs.range()
            result[name].input_range = (float(lo), float(hi))
            # asymmetric per tensor (activations after ReLU/GELU are one-sided), unless absmax
            result[name].input_qparams = obs.qparams(symmetric=obs.name == "absmax")
    if not smoothed and not static:  # nothing to calibrate: only keep samples to measure with
        with input_hooks(modules, keep_sample):
            run_model(model, next(batches(inputs, batch_size)), "model during calibration")
    return [result[e.name] for e in layers]
