"""Plan -> int8 model: calibrate what needs it, quantize each planned layer, pack it for the
device, swap it in, and measure what it cost (weight and output SQNR, bytes)."""

from __future__ import annotations

import ctypes
import math
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.nn as nn

from .calibrate import LayerCalibration, calibrate
from .config import QuantConfig
from .data import Inputs, Progress
from .errors import ConfigError, InputError
from .kernels import KernelChoice, select_kernel
from .plan import EmbeddingEntry, Plan, PlanEntry, effective_linear, find_linears, layer_kind, make_plan, swap_module
from .primitives import packed_row_bytes, sqnr_db, weight_sqnr_db
from .qembedding import QuantizedEmbedding
from .qlinear import QuantizedLinear
from .rounding import apply_awq, fake_quantize

__all__ = ["LayerResult", "EmbeddingResult", "FallbackStep", "Fallback", "LayerSensitivity", "Sensitivity",
           "QuantizeResult", "quantize_layer", "quantize_model", "check_streamable", "stream_layers"]


@dataclass(frozen=True)
class LayerResult:
    """A plan entry and what quantizing it gave on this machine (not saved in the file)."""

    plan: PlanEntry
    choice: KernelChoice | None = None  # the kernel it runs here, and why (None: kept float)
    weight_sqnr_db: float | None = None
    bytes_float: int = 0
    bytes_int8: int = 0
    output_sqnr_db: float | None = None  # the layer's output on calibration inputs, int8 vs float
    input_range: tuple[float, float] | None = None  # static: calibrated range of the (smoothed) input
    input_scale: float | None = None
    input_zero_point: int | None = None
    # a layer rounded otherwise than to nearest: what round-to-nearest gives the same layer
    # (its float weight before any AWQ factors, on the same inputs)
    rtn_weight_sqnr_db: float | None = None
    rtn_output_sqnr_db: float | None = None

    @property
    def rounding(self) -> str | None:
        """How the weights were rounded (None: kept float)."""
        return None if self.plan.scheme is None else self.plan.scheme.rounding

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def status(self) -> str:
        return self.plan.status

    @property
    def kernel(self) -> str | None:
        return None if self.choice is None else self.choice.name

    @property
    def kernel_reason(self) -> str | None:
        return None if self.choice is None else self.choice.reason

    @property
    def batch_invariant(self) -> bool | None:
        return None if self.choice is None else self.choice.batch_invariant

    def kept_float(self, reason: str) -> "LayerResult":
        """This layer put back in float for `reason` (its measured SQNRs stay, as what int8 gave)."""
        return replace(
            self, plan=self.plan.kept_float(reason), choice=None,
            input_range=None, input_scale=None, input_zero_point=None, bytes_int8=self.bytes_float,
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan entry's keys, then the measurements (JSON-able: an infinite SQNR is 999)."""
        d = self.plan.to_dict()
        for key in ("kernel", "kernel_reason", "batch_invariant", "weight_sqnr_db", "bytes_float", "bytes_int8",
                    "output_sqnr_db", "input_range", "input_scale", "input_zero_point",
                    *(("rtn_weight_sqnr_db", "rtn_output_sqnr_db") if self.rounding not in (None, "rtn") else ())):
            value = getattr(self, key)
            if key.endswith("sqnr_db") and value is not None and math.isinf(value):
                value = None if value < 0 else 999.0
            d[key] = value
        return d


@dataclass(frozen=True)
class EmbeddingResult:
    """An embedding's plan entry and what quantizing its table cost (bytes of the file's tensors)."""

    entry: EmbeddingEntry
    weight_sqnr_db: float | None = None
    bytes_float: int = 0
    bytes_int8: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = {**self.entry.to_dict(), "weight_sqnr_db": self.weight_sqnr_db, "bytes_float": self.bytes_float,
             "bytes_int8": self.bytes_int8}
        if d["weight_sqnr_db"] is not None and math.isinf(d["weight_sqnr_db"]):
            d["weight_sqnr_db"] = 999.0
        return d


@dataclass(frozen=True)
class FallbackStep:
    """One step of the accuracy fallback (fallback.quantize_to_target): a layer widened to 8 bits
    or put back in float, its sensitivity then, and the model's output SQNR after the step."""

    layer: str
    to: str  # "8-bit" or "float"
    alone_sqnr_db: float
    sqnr_db_after: float
    from_bits: int | None = None  # widened to 8 bits: the bits it had

    def to_dict(self) -> dict[str, Any]:
        widened = {} if self.from_bits is None else {"from_bits": self.from_bits}
        return {"layer": self.layer, "to": self.to, **widened, "alone_sqnr_db": self.alone_sqnr_db,
                "sqnr_db_after": self.sqnr_db_after}


@dataclass(frozen=True)
class Fallback:
    """The accuracy fallback to a target output SQNR (dB): all quantized, each step, the end.
    The sensitivities it went by are the result's `Sensitivity`."""

    target_sqnr_db: float
    initial_sqnr_db: float
    final_sqnr_db: float
    steps: tuple[FallbackStep, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"target_sqnr_db": self.target_sqnr_db, "initial_sqnr_db": self.initial_sqnr_db,
                "final_sqnr_db": self.final_sqnr_db, "steps": [st.to_dict() for st in self.steps]}


@dataclass(frozen=True)
class LayerSensitivity:
    """A layer's sensitivity: the model's output SQNR (dB) with only this layer quantized."""

    layer: str
    alone_sqnr_db: float

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "alone_sqnr_db": self.alone_sqnr_db}


@dataclass(frozen=True)
class Sensitivity:
    """The layers' sensitivities (fallback.quantize_to_target), the one home of them: the report's
    sensitivity table reads `ranking`; the fallback's JSON and the HTML chart read `latest`."""

    all_int8_sqnr_db: float  # the model's output SQNR with every layer quantized
    latest: tuple[LayerSensitivity, ...]  # each layer measured, at its last width, in module order
    # on request: every quantized layer as quantized, before any fallback step, most sensitive first
    ranking: tuple[LayerSensitivity, ...] | None = None
    data: str = ""  # what it was measured on, as the report names it

    def by_layer(self) -> dict[str, float]:
        """Each measured layer's latest sensitivity, in module order."""
        return {s.layer: s.alone_sqnr_db for s in self.latest}

    def to_dict(self) -> dict[str, Any]:
        """The ranking (the report's `sensitivity`)."""
        assert self.ranking is not None, "only a ranking on request is reported"
        return {"data": self.data, "all_int8_sqnr_db": self.all_int8_sqnr_db,
                "layers": [s.to_dict() for s in self.ranking]}


@dataclass(frozen=True)
class QuantizeResult:
    """The quantized model (the input model, changed in place, unless the model itself was a bare
    `nn.Linear`), the config used, and one result per `nn.Linear`, in the plan's order."""

    model: nn.Module
    config: QuantConfig
    layers: tuple[LayerResult, ...]
    fallback: Fallback | None = None  # accuracy-aware fallback steps (fallback.quantize_to_target)
    sensitivity: Sensitivity | None = None  # what the fallback measured (fallback.quantize_to_target)
    embeddings: tuple[EmbeddingResult, ...] = ()  # with `embeddings`: one per nn.Embedding

    @property
    def plan(self) -> Plan:
        return Plan(tuple(r.plan for r in self.layers), tuple(r.entry for r in self.embeddings))

    @property
    def quantized(self) -> list[LayerResult]:
        return [r for r in self.layers if r.plan.scheme is not None]


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(0 if t is None else t.numel() * t.element_size() for t in tensors)


def _stored_bytes(q: QuantizedLinear) -> int:
    """The bytes of a layer's tensors in the qlin file: B-bit weights packed (`packed_row_bytes`)."""
    rest = _nbytes(*(t for k, t in q.state_dict().items() if k != "weight"))
    return rest + q.out_features * packed_row_bytes(q.in_features, q.scheme.bits)


@torch.no_grad()
def quantize_layer(
    entry: PlanEntry, linear: nn.Linear, cal: LayerCalibration, device, *, pack: bool = True,
) -> tuple[QuantizedLinear, LayerResult]:
    """Quantize and pack one planned layer; `linear` is the float module in the model (or its
    effective affine map already). Without `pack` (a layer only written to a file) the kernel is
    the one packing would use (`select_kernel`, which packing follows) and no operands are made:
    oneDNN's cost +250 MB for a 32000 x 2048 head."""
    effective = effective_linear(linear, entry.name)  # the layer, or the affine map of its own forward
    q = QuantizedLinear.from_float(
        effective, entry.scheme, name=entry.name, input_qparams=cal.input_qparams, smooth_scale=cal.smooth_scale,
        hessian=None if cal.stats is None else cal.stats.hessian(),
    )
    if pack:
        q.pack(device)
    else:
        q.kernel = select_kernel(q.scheme, device=device, dtype=q.dtype, in_features=q.in_features,
                                 out_features=q.out_features)
    static = entry.scheme.static
    result = LayerResult(
        plan=entry,
        choice=q.kernel,
        weight_sqnr_db=weight_sqnr_db(effective.weight, q.weight, q.weight_scale, q.weight_zero_point, cal.smooth_scale,
                                      entry.scheme.group_size),
        bytes_float=_nbytes(linear.weight, linear.bias), bytes_int8=_stored_bytes(q),
        output_sqnr_db=None if cal.sample is None else sqnr_db(linear(cal.sample), q(cal.sample)),
        input_range=cal.input_range if static else None,
        input_scale=float(q.input_scale) if static else None,
        input_zero_point=int(q.input_zero_point) if static else None,
    )
    if entry.scheme.rounding != "rtn":
        result = replace(result, **_rtn_baseline(entry, effective, cal))
    return q, result


def _rtn_baseline(entry: PlanEntry, effective: nn.Linear, cal: LayerCalibration) -> dict[str, float | None]:
    """The weight and output SQNR that rounding to nearest gives the layer: its float weight as it
    was before AWQ's factors (folded ones taken out of the columns again), on the same inputs (x
    times the folded factors)."""
    w = effective.weight.detach().float()
    x = cal.sample
    if cal.folded is not None:
        w = w / cal.folded
        x = None if x is None else x * cal.folded.to(x)
    deq = fake_quantize(w, entry.scheme, entry.name)
    out = None
    if x is not None:
        bias = None if effective.bias is None else effective.bias.detach().float()
        ref = torch.nn.functional.linear(x.float(), w, bias)
        out = sqnr_db(ref, torch.nn.functional.linear(x.float(), deq, bias))
    return {"rtn_weight_sqnr_db": sqnr_db(w, deq), "rtn_output_sqnr_db": out}


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
    plan: Plan | None = None,
    awq_per_layer: bool = True,
) -> QuantizeResult:
    """Replace every planned `nn.Linear` of `model` (in place) by a packed `QuantizedLinear`.

    `calib`: calibration inputs (a tensor whose first dimension is samples, or a dict of such
    tensors as keyword arguments), run in batches of `batch_size`. Static mode and SmoothQuant
    need them; with them any mode also reports each layer's output SQNR on those inputs.
    `plan`: the model's plan under `config` (`make_plan(model, config)`) if the caller made it
    already; the file records `config` beside it, so it must be that config's plan.
    Layers whose scheme rounds with AWQ first get their factors (rounding.apply_awq: folded into
    `model` where its output stays the same, else kept per layer, or, without `awq_per_layer`,
    not applied); GPTQ layers get the statistic of their inputs from calibration.
    Raises InputError if the model has no `nn.Linear` or a weight is not finite.
    """
    config = config or QuantConfig()
    model.eval()
    plan = plan or make_plan(model, config)
    need = plan.calibration_need()
    if need is not None and calib is None:
        raise ConfigError(f"{need} needs calibration data: pass `calib` FILE (inputs the model takes)")
    kept, folded = {}, {}
    if calib is not None and any(e.scheme.awq for e in plan.quantized):
        plan, kept, folded = _awq(model, plan, calib, batch_size, awq_per_layer)
    quantized = plan.quantized
    cals = [LayerCalibration()] * len(quantized)
    if calib is not None and quantized:
        cals = calibrate(model, quantized, calib, batch_size=batch_size, progress=calib_progress, scales=kept)
        for e, cal in zip(quantized, cals):
            cal.folded = folded.get(e.name)
    cal_of = iter(cals)
    results = []
    total = len(plan.entries)
    for i, entry in enumerate(plan.entries):
        linear = model.get_submodule(entry.name)
        if entry.scheme is None:
            results.append(LayerResult(entry, bytes_float=_nbytes(linear.weight, linear.bias),
                                       bytes_int8=_nbytes(linear.weight, linear.bias)))
        else:
            q, result = quantize_layer(entry, linear, next(cal_of), device)
            results.append(result)
            for path in entry.paths:
                model = swap_module(model, path, q)
        # the float layer is unreferenced once swapped: weights are freed layer by layer
        # (peak memory ~ float model + int8 + one layer)
        del linear
        if progress is not None:
            progress(i + 1, total, entry.name)
    embeddings = tuple(_quantize_embedding(model, e) for e in plan.embeddings)
    return QuantizeResult(model=model, config=config, layers=tuple(results), embeddings=embeddings)


def _awq(model: nn.Module, plan: Plan, calib: Inputs, batch_size: int, per_layer: bool
         ) -> tuple[Plan, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """AWQ's factors for the plan's AWQ layers (`rounding.apply_awq`, which folds what it can
    into `model`): the plan with each such layer's note (and, for factors kept per layer, its
    exponent as the scheme's `smooth`), the factors kept per layer and those folded."""
    kept, folded, notes, alphas = apply_awq(model, plan.quantized, calib, batch_size=batch_size, per_layer=per_layer)
    entries = []
    for e in plan.entries:
        if e.name in notes:
            scheme = replace(e.scheme, smooth=alphas[e.name]) if e.name in kept else e.scheme
            e = replace(e, scheme=scheme, reason="; ".join(r for r in (e.reason, notes[e.name]) if r))
        entries.append(e)
    return replace(plan, entries=tuple(entries)), kept, folded


def _glibc_trim() -> Callable[[], None] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


_TRIM = _glibc_trim() if sys.platform.startswith("linux") else None


def _release_freed_memory() -> None:
    """Hand the memory of the layers freed so far back to the system (glibc: malloc_trim). glibc
    raises its mmap threshold to the size of each large block freed, so later layers come from the
    heap, whose freed holes it keeps: without this, streaming 84 layers of <= 3 MB grew the
    resident memory by 50 MB; with it, by ~30 MB in all."""
    if _TRIM is not None:
        _TRIM()


def check_streamable(model: nn.Module) -> None:
    """Refuse (InputError) a model whose layers cannot be planned without their weights: an
    nn.Linear subclass with its own forward is captured by running it (`affine_surrogate`)."""
    for name, m, _, _ in find_linears(model):
        if type(m).forward is not nn.Linear.forward and layer_kind(m) != "Conv1D":
            raise InputError(
                f"`stream`: layer {name!r} ({type(m).__qualname__}) overrides forward, and qlin captures such a "
                "layer by running it, which needs its weights; quantize without `stream`"
            )


@torch.no_grad()
def stream_layers(
    floats: dict[str, nn.Module],
    plan: Plan,
    loaded: Callable[[nn.Module, str], ContextManager],
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Iterator[tuple[LayerResult, QuantizedLinear | None]]:
    """The layers of `plan` quantized one at a time, for a model whose weights stay on disk:
    `floats` maps each entry's name to its float module (parameters on the meta device) and
    `loaded(module, name)` gives it its real parameters for the time of a `with`. Yields each
    layer's result and its QuantizedLinear (not packed: it is only written) (None for a layer kept float, whose tensors
    the file takes as they are); the caller writes it and drops it, so that peak memory is one
    float layer and its int8 copy. No calibration: each layer's weight SQNR is measured, not its
    output's (that needs the model's forward)."""
    total = len(plan.entries)
    for i, entry in enumerate(plan.entries):
        linear = floats[entry.name]
        if entry.scheme is None:
            size = _nbytes(linear.weight, linear.bias)  # shapes only: meta tensors will do
            yield LayerResult(entry, bytes_float=size, bytes_int8=size), None
        else:
            with loaded(linear, entry.name):
                # on the device the whole-model run quantizes on, so the numbers (and the file) are the same
                q, result = quantize_layer(entry, linear.to(device), LayerCalibration(), device, pack=False)
            yield result, q
            del q
        _release_freed_memory()
        if progress is not None:
            progress(i + 1, total, entry.name)


def _quantize_embedding(model: nn.Module, entry: EmbeddingEntry) -> EmbeddingResult:
    """Swap a planned embedding for its int8 table (in place); what it cost."""
    table = model.get_submodule(entry.name)
    size = _nbytes(table.weight)
    if not entry.quantized:
        return EmbeddingResult(entry, bytes_float=size, bytes_int8=size)
    q = QuantizedEmbedding.from_float(table, name=entry.name)
    swap_module(model, entry.name, q)
    return EmbeddingResult(entry, weight_sqnr_db=sqnr_db(table.weight, q.dequantized()), bytes_float=size,
                           bytes_int8=_nbytes(q.weight, q.weight_scale))
