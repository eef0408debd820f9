"""Calibration: run sample inputs through the float model and let observers watch the inputs of
the planned Linear layers; then derive SmoothQuant factors and static activation parameters.
`fold_smoothing` moves SmoothQuant's factors into the norm that feeds a group of layers instead
(SmoothQuant's original form, for formats that cannot divide inside the kernel).

Memory stays bounded by the observers' state (plus one small input sample per layer, kept for
the per-layer output SQNR), whatever the number of calibration samples.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from .data import Inputs, Progress, batches, first_tensor, num_samples, run_model
from .observers import make_observer
from .plan import PlanEntry, effective_linear, find_linears
from .primitives import check_finite, sqnr_db
from .rounding import InputStats
from .scheme import PER_CHANNEL, PER_TENSOR

__all__ = ["LayerCalibration", "input_hooks", "calibrate", "smooth_factors", "DEFAULT_SMOOTH", "fold_smoothing"]

# SmoothQuant's alpha when qlin applies it by default (dynamic mode with realistic data): on a
# pretrained sentence encoder, alpha 0.5 from 32 seeded random token-id sequences gave the gain of
# real text (mean-pooled cosine 0.99887 -> 0.99941, nearest-neighbour agreement 98.4% -> 100%),
# while 0.8 made it worse (0.99622, 93.8%). On the sample models (no activation outliers) 0.5
# moves the output SQNR by about a dB either way (MLP 51.7 -> 50.6 dB, encoder 46.0 -> 46.1).
DEFAULT_SMOOTH = 0.5
# folding factors into a norm changes nothing but float rounding (> 100 dB); a norm whose output
# other modules read too (a residual) drifts far below this
FOLD_MIN_SQNR_DB = 60.0

SAMPLE_ROWS = 256  # input rows kept per layer to measure its output SQNR after quantization


@dataclass
class LayerCalibration:
    """What calibration learned about one layer's inputs."""

    smooth_scale: torch.Tensor | None = None  # (in,) float32
    input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None  # scale (), zero point () int8
    input_range: tuple[float, float] | None = None  # of the (smoothed) inputs
    sample: torch.Tensor | None = None  # (<= SAMPLE_ROWS, in) float, the first inputs seen
    stats: InputStats | None = None  # rounding gptq: the inputs' Gram matrix (rounding.py)
    folded: torch.Tensor | None = None  # (in,) factors AWQ folded into the weight's columns (its inputs are x / folded)


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
    scales: dict[str, torch.Tensor] | None = None,
) -> list[LayerCalibration]:
    """Observe the inputs of the planned `layers` of `model` on `inputs`: one pass, or two when
    SmoothQuant and static mode meet (the static range is observed on smoothed inputs). Returns
    one LayerCalibration per entry, in order. SmoothQuant reads a layer's effective weight
    `(out, in)` (an nn.Linear subclass's affine map). `scales`: factors `(in,)` found before
    (AWQ's, kept per layer) that are those layers' `smooth_scale` instead of SmoothQuant's. A
    layer whose scheme rounds with GPTQ gets the statistic of its (unsmoothed) inputs, gathered
    in the first pass."""
    scales = scales or {}
    result = {e.name: LayerCalibration(smooth_scale=scales.get(e.name)) for e in layers}
    modules = {e.name: model.get_submodule(e.name) for e in layers}
    stats = {e.name: InputStats.empty(e.in_features, modules[e.name].weight.device) for e in layers if e.scheme.gptq}
    for name, st in stats.items():
        result[name].stats = st
    first_pass = [True]

    def keep_sample(name: str, x: torch.Tensor) -> None:
        if result[name].sample is None:
            check_finite(x, f"layer {name!r}: calibration input", "check the calibration data")
            result[name].sample = x[:SAMPLE_ROWS].clone()
        if first_pass[0] and name in stats:
            stats[name].update(x)

    smoothed = {e.name: e for e in layers if e.scheme.smooth is not None and e.name not in scales}
    static = {e.name: e.scheme for e in layers if e.scheme.static}
    if smoothed:
        absmax = {n: make_observer("absmax", PER_CHANNEL, axis=1, what=f"layer {n!r}: calibration input") for n in smoothed}

        def watch_smooth(name: str, x: torch.Tensor) -> None:
            keep_sample(name, x)
            if name in absmax:
                absmax[name].update(x)

        with input_hooks(modules, watch_smooth):
            _run_all(model, inputs, batch_size, progress, "calibrating (SmoothQuant)")
        first_pass[0] = False
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
    if not smoothed and not static and stats:  # GPTQ's statistic only
        with input_hooks(modules, keep_sample):
            _run_all(model, inputs, batch_size, progress, "calibrating (GPTQ)")
    elif not smoothed and not static:  # nothing to calibrate: only keep samples to measure with
        with input_hooks(modules, keep_sample):
            run_model(model, next(batches(inputs, batch_size)), "model during calibration")
    return [result[e.name] for e in layers]


def _is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm (by class, or by name as transformers' RMSNorms are) with a
    per-channel weight `(dim,)` to fold factors into."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return ((isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm")))
            and isinstance(weight, torch.Tensor) and weight.dim() == 1)


@torch.no_grad()
def _norm_feeds(model: nn.Module, inputs: Inputs, batch_size: int) -> tuple[dict[str, set], dict[str, torch.Tensor]]:
    """Trace which norm's output each nn.Linear reads: Linear path -> the set of norm paths whose
    output tensor *is* its input (None for a call whose input is anything else), and each norm's
    output absmax per channel `(dim,)` over `inputs`."""
    norms = {n: m for n, m in model.named_modules() if _is_norm(m)}
    linears = {name: m for name, m, _, _ in find_linears(model)}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (norm, output): kept alive while traced
    feeds: dict[str, set] = {}
    absmax: dict[str, torch.Tensor] = {}

    def on_norm(name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, out)
                a = out.detach().reshape(-1, out.shape[-1]).abs().amax(dim=0).float()
                absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)
        return hook

    def on_linear(name):
        def hook(module, args):
            src = produced.get(id(args[0])) if args else None
            feeds.setdefault(name, set()).add(src[0] if src is not None and src[1] is args[0] else None)
        return hook

    handles = [m.register_forward_hook(on_norm(n)) for n, m in norms.items()]
    handles += [m.register_forward_pre_hook(on_linear(n)) for n, m in linears.items()]
    try:
        for chunk in batches(inputs, batch_size):
            run_model(model, chunk, "model while tracing its norms")
            produced.clear()
    finally:
        for h in handles:
            h.remove()
    return feeds, absmax


@torch.no_grad()
def fold_smoothing(model: nn.Module, layers: list[PlanEntry], inputs: Inputs, *, batch_size: int = 32) -> dict[str, str]:
    """SmoothQuant in its original form: for each norm whose output feeds smoothed `layers`
    directly, one factor per channel for every Linear that reads it,
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over their stacked weights; the norm's weight and
    bias `(dim,)` are divided by s and each such Linear's weight columns multiplied by it, in
    `model` (in place). A fold is kept only if the model's output on the first batch of `inputs`
    stays what it was (`FOLD_MIN_SQNR_DB`): a norm whose output something else reads too (a
    residual) cannot take it. Returns, for every layer of `layers` with `smooth`, a note: folded
    into which norm, or why it goes without SmoothQuant. The plan's schemes are not changed here."""
    smoothed = {e.name: e.scheme.smooth for e in layers if e.scheme is not None and e.scheme.smooth is not None}
    if not smoothed:
        return {}
    feeds, absmax = _norm_feeds(model, inputs, batch_size)
    groups: dict[str, list[str]] = {}
    for name, sources in feeds.items():
        if len(sources) == 1 and None not in sources:
            groups.setdefault(next(iter(sources)), []).append(name)
    probe = next(batches(inputs, batch_size))
    reference = first_tensor(run_model(model, probe))[0].float().clone()
    notes: dict[str, str] = {}
    for norm_name, members in groups.items():
        targets = [n for n in members if n in smoothed]
        if not targets:
            continue
        norm = model.get_submodule(norm_name)
        mods = [model.get_submodule(n) for n in members]
        if any(type(m).forward is not nn.Linear.forward for m in mods):
            notes.update(dict.fromkeys(targets, f"exported without SmoothQuant: a Linear subclass reads {norm_name}"))
            continue
        alpha = smoothed[targets[0]]
        s = smooth_factors(absmax[norm_name], torch.cat([m.weight.float() for m in mods]), alpha)
        saved = [t.detach().clone() for t in (norm.weight, *(m.weight for m in mods))]
        bias = getattr(norm, "bias", None)
        saved_bias = None if bias is None else bias.detach().clone()
        norm.weight.div_(s.to(norm.weight))
        if bias is not None:
            bias.div_(s.to(bias))
        for m in mods:
            m.weight.mul_(s.to(m.weight))
        fit = sqnr_db(reference, first_tensor(run_model(model, probe))[0].float())
        if fit >= FOLD_MIN_SQNR_DB:
            notes.update(dict.fromkeys(targets, f"SmoothQuant (alpha {alpha:g}) folded into {norm_name}"))
            continue
        for t, old in zip((norm.weight, *(m.weight for m in mods)), saved):
            t.copy_(old)
        if bias is not None:
            bias.copy_(saved_bias)
        notes.update(dict.fromkeys(targets, f"exported without SmoothQuant: other modules read the output of "
                                            f"{norm_name} too (folding changes the model: {fit:.0f} dB)"))
    for name in smoothed:
        notes.setdefault(name, "exported without SmoothQuant: its input does not come straight from a LayerNorm/RMSNorm")
    return notes
