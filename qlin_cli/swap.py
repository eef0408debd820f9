"""Find the `nn.Linear` layers of a model, decide each one's fate (the plan), quantize and swap.

The plan is the per-layer record that goes into the qlin file's metadata: for every Linear,
quantized with which scheme, or skipped and why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .calibrate import LayerCalibration, Progress, calibrate
from .config import QuantConfig
from .errors import ConfigError, InputError
from .primitives import sqnr_db, weight_sqnr_db
from .qlinear import QuantizedLinear
from .report import Inputs

__all__ = ["LayerRecord", "QuantizeResult", "quantize_model", "find_linears", "swap_module"]

@dataclass
class LayerRecord:
    """One `nn.Linear` of the model and what qlin did with it."""

    name: str
    in_features: int
    out_features: int
    has_bias: bool
    dtype: str  # the float weight's dtype, e.g. "float32"
    status: str  # "quantized" | "skipped"
    reason: str = ""  # why skipped; for a quantized subclass, how its function was captured
    aliases: list[str] = field(default_factory=list)  # other module paths of the same module
    mode: str | None = None
    granularity: str | None = None
    symmetric: bool | None = None
    act_granularity: str | None = None
    kernel_request: str | None = None
    weight_observer: str | None = None
    observer: str | None = None  # static mode's activation observer
    smooth: float | None = None  # SmoothQuant alpha
    # measured on this machine, not saved in the plan:
    kernel: str | None = None
    kernel_reason: str | None = None
    batch_invariant: bool | None = None
    weight_sqnr_db: float | None = None
    bytes_float: int = 0
    bytes_int8: int = 0
    output_sqnr_db: float | None = None  # the layer's output on calibration inputs, int8 vs float
    input_range: tuple[float, float] | None = None  # static: calibrated range of the (smoothed) input
    input_scale: float | None = None
    input_zero_point: int | None = None

    PLAN_KEYS = (
        "name", "in_features", "out_features", "has_bias", "dtype", "status", "reason", "aliases",
        "mode", "granularity", "symmetric", "act_granularity", "kernel_request",
        "weight_observer", "observer", "smooth",
    )

    def plan_entry(self) -> dict:
        """The part of the record that the qlin file stores (machine-independent)."""
        d = asdict(self)
        return {k: d[k] for k in self.PLAN_KEYS}

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("weight_sqnr_db", "output_sqnr_db"):
            if d[key] is not None and math.isinf(d[key]):
                d[key] = None if d[key] < 0 else 999.0
        return d


@dataclass
class QuantizeResult:
    """The quantized model (the input model, changed in place, unless the model itself was a bare
    `nn.Linear`), the config used, and one record per `nn.Linear`."""

    model: nn.Module
    config: QuantConfig
    layers: list[LayerRecord]
    fallback: dict | None = None  # accuracy-aware fallback steps (fallback.quantize_to_target)

    @property
    def quantized(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.status == "quantized"]

    def plan(self) -> list[dict]:
        return [r.plan_entry() for r in self.layers]


def _tied_weights(model: nn.Module, linears: list) -> dict[str, str]:
    """Linear path -> the path of another module that holds the same weight Parameter (tied
    weights, e.g. a language-model head tied to the token embedding). Paths of the same Linear
    module (a module used at two places) do not count."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname.rpartition(".")[0])
    tied = {}
    for name, linear, aliases, _ in linears:
        others = [o for o in owners.get(id(linear.weight), []) if o not in (name, *aliases)]
        if others:
            tied[name] = others[0] or "(root)"
    return tied


def _skip_reason(
    name: str, module: nn.Linear, parent: nn.Module | None, config: QuantConfig, tied_to: str | None = None
) -> str:
    pattern = config.skips(name)
    if pattern is not None:
        return f"matches --skip {pattern!r}"
    rule = config.rule_for(name)
    if rule is not None and rule.get("skip"):
        return f"recipe rule match={rule['match']!r} skips it"
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads this layer's weight directly"
    if tied_to is not None:
        # the other module keeps reading the float weight: quantizing would untie the two
        return f"weight tied to {tied_to}"
    if not module.weight.is_floating_point():
        return f"weight dtype {module.weight.dtype} is not a float dtype"
    return ""


AFFINE_MIN_SQNR_DB = {torch.float32: 80.0, torch.float64: 80.0}  # others (half): 35 dB


@torch.no_grad()
def affine_surrogate(module: nn.Linear) -> tuple[nn.Linear | None, str]:
    """A plain nn.Linear computing what `module` computes in eval mode, or (None, why not).

    For an nn.Linear subclass that overrides forward (e.g. output scaled by 1/fan_in, or by a
    learned scalar): its effective map is measured from its outputs on zero (the bias) and on
    the basis vectors (the weight's columns), then checked on random inputs; a layer whose
    function is not affine (within float rounding) cannot be a linear layer and is kept float.
    """
    if type(module).forward is nn.Linear.forward:
        return module, ""
    what = type(module).__qualname__
    w = module.weight
    k, dtype, device = module.in_features, w.dtype, w.device
    try:
        b = module(torch.zeros(1, k, dtype=dtype, device=device))  # (1, out)
        cols = module(torch.eye(k, dtype=dtype, device=device)) - b  # (in, out): row j = W[:, j]
        x = torch.randn(16, k, generator=torch.Generator().manual_seed(0)).to(dtype=dtype, device=device)
        actual = module(x)
    except Exception as exc:  # the subclass's own forward may refuse 2-D inputs, etc.
        return None, f"{what} overrides forward and could not be probed ({type(exc).__name__})"
    if b.shape != (1, module.out_features) or actual.shape != (16, module.out_features):
        return None, f"{what} overrides forward and does not map (N, {k}) to (N, {module.out_features})"
    predicted = x.float() @ cols.float() + b.float()
    fit = sqnr_db(actual.float(), predicted)
    if fit < AFFINE_MIN_SQNR_DB.get(dtype, 35.0):
        return None, f"{what} overrides forward with a function that is not affine (an affine fit gives {fit:.1f} dB)"
    has_bias = module.bias is not None or bool(b.abs().max() > 0)
    surrogate = nn.Linear(k, module.out_features, bias=has_bias, device=device, dtype=dtype)
    surrogate.weight.copy_(cols.t())
    if has_bias:
        surrogate.bias.copy_(b[0])
    return surrogate, f"affine map of {what} (its own forward), fit {min(fit, 999.0):.0f} dB"


def find_linears(model: nn.Module) -> list[tuple[str, nn.Linear, list[str], nn.Module | None]]:
    """Every distinct `nn.Linear` (isinstance) in module order: (first path, module, other paths
    of the same module object, parent module)."""
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Linear] = {}
    parents: dict[int, nn.Module | None] = {}
    named = dict(model.named_modules(remove_duplicate=False))
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Linear):
            paths.setdefault(id(m), []).append(name)
            modules[id(m)] = m
            if id(m) not in parents:
                parents[id(m)] = named[name.rpartition(".")[0]] if name else None
    return [(p[0], modules[i], p[1:], parents[i]) for i, p in paths.items()]


def swap_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at module path `path` of `model`; returns the (possibly new) root."""
    if path == "":
        return new
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)
    return model


def _layer_bytes(linear: nn.Linear, q: QuantizedLinear | None) -> tuple[int, int]:
    def nbytes(t):
        return 0 if t is None else t.numel() * t.element_size()

    before = nbytes(linear.weight) + nbytes(linear.bias)
    if q is None:
        return before, before
    return before, sum(nbytes(t) for t in q.state_dict().values())


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    calib: Inputs | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    calib_progress: Progress | None = None,
) -> QuantizeResult:
    """Replace every planned `nn.Linear` of `model` (in place) by a packed `QuantizedLinear`.

    `calib`: calibration inputs (a tensor whose first dimension is samples, or a dict of such
    tensors as keyword arguments), run in batches of `batch_size`. Static mode and SmoothQuant
    need them; with them any mode also reports each layer's output SQNR on those inputs.
    Raises InputError if the model has no `nn.Linear` or a weight is not finite.
    """
    config = config or QuantConfig()
    if config.needs_calibration and calib is None:
        what = "static mode" if config.mode == "static" else "SmoothQuant (smooth)"
        raise ConfigError(f"{what} needs calibration data: pass --calib FILE (inputs the model takes)")
    model.eval()
    linears = find_linears(model)
    if not linears:
        raise InputError(f"the model ({type(model).__name__}) has no nn.Linear layer to quantize")
    tied = _tied_weights(model, linears)
    reasons = {name: _skip_reason(name, linear, parent, config, tied.get(name)) for name, linear, _, parent in linears}
    surrogates, notes = {}, {}
    for name, linear, _, _ in linears:
        if not reasons[name]:
            surrogates[name], notes[name] = affine_surrogate(linear)
            if surrogates[name] is None:
                reasons[name] = notes.pop(name)
    planned = {name: (linear, config.for_layer(name)) for name, linear, _, _ in linears if not reasons[name]}
    stats = {}
    if calib is not None and planned:
        weights = {name: surrogates[name].weight for name in planned}
        stats = calibrate(model, planned, calib, batch_size=batch_size, progress=calib_progress, weights=weights)
    records = []
    total = len(linears)
    for i in range(total):
        # drop this function's references to the float layer as soon as it is swapped, so that
        # its weight is freed layer by layer (peak memory ~ float model + int8 + one layer)
        (name, linear, aliases, _), linears[i] = linears[i], None
        reason = reasons[name]
        rec = LayerRecord(
            name=name, in_features=linear.in_features, out_features=linear.out_features,
            has_bias=linear.bias is not None, dtype=str(linear.weight.dtype).removeprefix("torch."),
            status="skipped" if reason else "quantized", reason=reason, aliases=aliases,
        )
        if not reason:
            lc = planned[name][1]  # this layer's config
            cal = stats.get(name, LayerCalibration())
            effective = surrogates[name]  # the layer itself, or the affine map of its own forward
            rec.reason, rec.has_bias = notes.get(name, ""), effective.bias is not None
            q = QuantizedLinear.from_float(
                effective, mode=lc.mode, granularity=lc.granularity, symmetric=lc.symmetric,
                act_granularity=lc.act_granularity, kernel=lc.kernel, name=name,
                weight_observer=lc.weight_observer, weight_percentile=lc.percentile,
                input_qparams=cal.input_qparams,
                smooth_scale=cal.smooth_scale,
            ).pack(device)
            rec.weight_sqnr_db = weight_sqnr_db(
                effective.weight, q.weight, q.weight_scale, q.weight_zero_point, cal.smooth_scale)
            if cal.sample is not None:
                rec.output_sqnr_db = sqnr_db(linear(cal.sample), q(cal.sample))
            rec.mode, rec.granularity, rec.symmetric = lc.mode, str(lc.granularity), lc.symmetric
            rec.act_granularity, rec.kernel_request = lc.act_granularity, lc.kernel
            rec.weight_observer, rec.smooth = lc.weight_observer, lc.smooth
            if lc.mode == "static":
                rec.observer, rec.input_range = lc.observer, cal.input_range
                rec.input_scale, rec.input_zero_point = float(q.input_scale), int(q.input_zero_point)
            rec.kernel, rec.kernel_reason = q.kernel.name, q.kernel.reason
            rec.batch_invariant = q.kernel.batch_invariant
            rec.bytes_float, rec.bytes_int8 = _layer_bytes(linear, q)
            for path in [name, *aliases]:
                model = swap_module(model, path, q)
            planned.pop(name), surrogates.pop(name)
            del effective
        else:
            rec.bytes_float, rec.bytes_int8 = _layer_bytes(linear, None)
        records.append(rec)
        if progress is not None:
            progress(i + 1, total, name)
    return QuantizeResult(model=model, config=config, layers=records)
