"""How a layer's weights are rounded, the one home of it: to nearest (`round_to_nearest`), GPTQ
(`gptq`) and AWQ's activation-aware scaling (`awq_search`, `apply_awq`).

Both calibrated methods read one statistic of a layer's inputs x `(tokens, in)`, `InputStats`:
the Gram matrix G = sum x^T x `(in, in)` and sum |x| `(in,)` over the tokens. It is gathered by
hooks on the layer's inputs (`calibrate.input_hooks`), whatever runs the model: the whole-model
path runs it once on the float model, so every layer's statistic comes from the float outputs of
the layers before it (not their quantized outputs, as GPTQ's paper does block by block); a
block-by-block runner feeds the same `InputStats.update` with the inputs it captured and calls
the same functions.

GPTQ (Frantar et al. 2022; as GPTQModel and llm-compressor's GPTQModifier run it): with
H = G / tokens + damp * mean(diag) * I and U the upper Cholesky factor of H^-1, the columns of
W `(out, in)` are rounded one at a time (in order of decreasing diag(H) with `act_order`), and
each column's error e = (w - q) / U_jj is taken off the columns not yet rounded, e * U_j,j+1:,
which minimises ||X W^T - X Q^T|| given the columns rounded so far; `block_size` columns are
done at once before the rest is updated. Scales: per tensor or per channel from the float
weights first; per group, from the updated weights when the group's first column is reached
(in order), or all from the float weights first with `act_order` ("static groups": the file
then needs no group index, whatever the order).

AWQ (Lin et al. 2023; AutoAWQ, llm-compressor's AWQModifier): per input channel factors
s_j = mean|x_j|^alpha (normalized so that max * min = 1) scale the weight's columns before
rounding, W' = W diag(s), and the inputs down, x / s: salient channels (large inputs) get finer
steps. alpha is searched on a grid over [0, 1) per block, minimising the block's output error
on the calibration data, sum over its layers of ||X (W - Q(W diag(s)) / s)^T||^2 =
sum_rows d^T G d (from the Gram matrix: no activations kept). A block is the set of layers that
read one tensor (q, k and v after a norm; gate and up); its output, their outputs. alpha = 0
(s = 1) is round-to-nearest, so the search never does worse than it on the calibration data.
The factors go, in order of preference, into the norm before the block (its weight and bias
divided by s, the layers' columns multiplied) or into the Linear before a layer (its output
rows divided: v_proj before o_proj, up_proj before down_proj), kept only where the model's
output stays what it was (`FOLD_MIN_SQNR_DB`, as SmoothQuant's fold); else, per layer, as the
layer's `smooth_scale` (the layer divides its inputs by s), or not at all where the format
cannot hold it (compressed-tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .data import Inputs, batches, first_tensor, run_model
from .observers import make_observer
from .primitives import dequantize, grouped, half_scales, qrange, quantize, sqnr_db
from .scheme import PER_CHANNEL, LayerScheme

__all__ = ["InputStats", "round_to_nearest", "fake_quantize", "gptq", "AwqChoice", "awq_search", "apply_awq",
           "gather_stats", "PROPAGATES"]

# what the whole-model path feeds each layer's statistic: the float model's activations
PROPAGATES = "float outputs of the layers before (the whole-model path runs the float model once)"


@dataclass
class InputStats:
    """A layer's input statistic over the calibration tokens: `gram` = sum x^T x `(in, in)`
    float64, `abs_sum` = sum |x| `(in,)` float64, `tokens`."""

    gram: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, in_features: int, device: torch.device | str = "cpu") -> "InputStats":
        return cls(torch.zeros(in_features, in_features, dtype=torch.float64, device=device),
                   torch.zeros(in_features, dtype=torch.float64, device=device))

    def update(self, x: torch.Tensor) -> None:
        """Add inputs `x` `(tokens, in)` (any float dtype; the product in float32, summed in float64)."""
        xf = x.detach().float()
        self.gram += (xf.t() @ xf).double()
        self.abs_sum += xf.abs().sum(dim=0).double()
        self.tokens += xf.shape[0]

    def hessian(self) -> torch.Tensor:
        """G / tokens `(in, in)` float64 (GPTQ's H up to the factor 2, which changes nothing)."""
        return self.gram / max(self.tokens, 1)

    def mean_abs(self) -> torch.Tensor:
        """mean |x_j| `(in,)` float64."""
        return self.abs_sum / max(self.tokens, 1)

    def scaled(self, s: torch.Tensor) -> "InputStats":
        """The statistic of the inputs x / s (`s` `(in,)`): G / (s s^T), sum|x| / s."""
        s = s.double().to(self.gram.device)
        return InputStats(self.gram / torch.outer(s, s), self.abs_sum / s, self.tokens)


def _observed(rows: torch.Tensor, scheme: LayerScheme, name: str, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero point `scheme`'s weight observer gives `rows` (per row: the rows of a
    grouped view, whose scales are rounded up to float16 values, `half_scales`; or as the
    scheme's granularity says)."""
    options = {"percentile": scheme.percentile} if scheme.weight_observer == "percentile" else {}
    observer = make_observer(scheme.weight_observer, PER_CHANNEL if per_row else scheme.granularity, axis=0,
                             what=f"layer {name!r}: weight", **options)
    observer.update(rows)
    scale, zp = observer.qparams(scheme.symmetric, scheme.bits)
    return (half_scales(scale), zp) if per_row else (scale, zp)


def _qparams(w: torch.Tensor, scheme: LayerScheme, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero point `scheme`'s observer gives weight `w` `(out, in)`: `()`, `(out,)`
    or, per group (per channel of the grouped view, `primitives.grouped`), `(out, ceil(in / G))`."""
    g = scheme.group_size
    scale, zp = _observed(w if g is None else grouped(w, g), scheme, name, per_row=g is not None)
    shape = scheme.granularity.scale_shape(tuple(w.shape))
    return scale.reshape(shape), zp.reshape(shape)


def round_to_nearest(w: torch.Tensor, scheme: LayerScheme, name: str = "layer"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values int8 `(out, in)`, scale and zero point of `w` `(out, in)` rounded to nearest under
    `scheme` (its observer, width and granularity)."""
    scale, zp = _qparams(w, scheme, name)
    return quantize(w, scale, zp, scheme.symmetric, scheme.bits, scheme.group_size), scale, zp


def fake_quantize(w: torch.Tensor, scheme: LayerScheme, name: str = "layer") -> torch.Tensor:
    """`w` rounded to nearest and dequantized, float32 `(out, in)`."""
    q, scale, zp = round_to_nearest(w, scheme, name)
    return dequantize(q, scale, zp, scheme.group_size)


def _cholesky_inverse_upper(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """U, upper triangular `(in, in)`, with U^T U = (H + damp * mean(diag H) * I)^-1 (float64).
    Inputs that were always zero (diag 0) get 1 on the diagonal: their columns are rounded to
    nearest and move nothing else."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for extra in (damp, damp * 10, damp * 100, 1.0):  # more dampening until H is positive definite
        l, info = torch.linalg.cholesky_ex(h + eye * (extra * mean))
        if int(info) == 0:
            break
    else:  # pragma: no cover - H + mean * I is positive definite for any Gram matrix
        raise ValueError(f"layer {name!r}: the Hessian of its inputs is not positive definite")
    hinv = torch.cholesky_inverse(l)
    return torch.linalg.cholesky(hinv, upper=True)


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, scheme: LayerScheme, name: str = "layer"
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's values int8 `(out, in)`, scale and zero point (shapes as `round_to_nearest`) for
    weight `w` `(out, in)` and the Hessian of its inputs `hessian` `(in, in)` (`InputStats.hessian`),
    with `scheme`'s `gptq_damp`, `gptq_block_size` and `act_order` (module docstring). Runs on one
    thread: its loop is one tiny op after another, where OpenMP's barriers cost more than the work
    (a 384 x 1536 layer on 2 busy cores: 80 s on two threads, 10 s on one), and the result then
    cannot depend on the number of threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(w, hessian, scheme, name)
    finally:
        torch.set_num_threads(threads)


def _gptq(w: torch.Tensor, hessian: torch.Tensor, scheme: LayerScheme, name: str
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out_f, in_f = w.shape
    g, bits, sym = scheme.group_size, scheme.bits, scheme.symmetric
    W = w.detach().float().clone()
    H = hessian.to(device=W.device, dtype=torch.float64)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if scheme.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = _cholesky_inverse_upper(H, scheme.gptq_damp, name).float()
    static_groups = g is not None and perm is not None
    if g is None or static_groups:  # every scale from the float weights, before any update
        scale, zp = _qparams(w.detach().float(), scheme, name)
    else:
        scale = torch.empty(scheme.granularity.scale_shape((out_f, in_f)), dtype=torch.float32, device=W.device)
        zp = torch.empty(scale.shape, dtype=torch.int8, device=W.device)
    Q = torch.empty(out_f, in_f, dtype=torch.int8, device=W.device)
    order = torch.arange(in_f) if perm is None else perm  # the original column of each position

    def column_qparams(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point `(out,)` or `()` of original column j."""
        if g is None:
            return scale, zp
        return scale[:, j // g], zp[:, j // g]

    lo, hi = qrange(bits, sym)
    block = scheme.gptq_block_size
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            j = int(order[col])
            if g is not None and not static_groups and j % g == 0:  # a group starts: its scale from the updated weights
                # the group's columns past this block, with the updates this block owes them so far
                ahead = W[:, i2:col + g] - Err[:, :i] @ U[i1:col, i2:col + g]
                cols = torch.cat([W1[:, i:i + g], ahead], dim=1)
                s_g, z_g = _observed(cols, scheme, name, per_row=True)
                scale[:, j // g], zp[:, j // g] = s_g, z_g
            s_j, z_j = column_qparams(j)
            s_j, z_j = s_j.float().reshape(-1, 1), z_j.float().reshape(-1, 1)  # (out, 1) or (1, 1)
            x = W1[:, i:i + 1]
            # primitives.quantize / dequantize of one column, inlined (the same operations: this
            # loop runs once per input channel)
            q = (x / s_j).round_().add_(z_j).clamp_(lo, hi)
            dq = (q - z_j).mul_(s_j)
            Q[:, col] = q[:, 0].to(torch.int8)
            err = (x - dq) / U1[i, i]
            W1[:, i:] -= err @ U1[i:i + 1, i:]
            Err[:, i] = err[:, 0]
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.contiguous(), scale, zp


# -- AWQ ----------------------------------------------------------------------------------------

FOLD_MIN_SQNR_DB = 60.0  # a fold that changes the model's output more than float rounding is undone


def _awq_factors(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = mean|x_j|^alpha `(in,)` float32, normalized so that max(s) * min(s) = 1; channels
    that never saw an input get the smallest factor of the rest."""
    m = mean_abs.float()
    live = m > 0
    floor = float(m[live].min()) if bool(live.any()) else 1.0
    s = torch.where(live, m, torch.full_like(m, floor)).pow(alpha)
    return (s / (s.max() * s.min()).sqrt()).clamp_(1e-4, 1e4)


def _output_error(weights: list[torch.Tensor], schemes: list[LayerScheme], gram: torch.Tensor,
                  s: torch.Tensor | None) -> float:
    """sum over the layers of ||X (W - Q(W diag(s)) / s)^T||^2 = sum_rows d^T G d (`gram` the
    float32 Gram matrix: the grid compares errors, which float32 tells apart)."""
    total = 0.0
    for w, scheme in zip(weights, schemes):
        ws = w if s is None else w * s
        deq = fake_quantize(ws, scheme)
        d = w - (deq if s is None else deq / s)
        total += float(((d @ gram) * d).sum(dtype=torch.float64))
    return total


@dataclass
class AwqChoice:
    """The outcome of AWQ's search for one block: its layers, alpha, the factors `(in,)`, and
    the block's output error (sum of squares on the calibration data) at alpha 0 and at alpha."""

    layers: list[str]
    alpha: float
    factors: torch.Tensor
    error_rtn: float
    error: float
    where: str = ""  # "folded into X", "kept per layer", or why not applied
    folded: bool = False
    notes: dict[str, str] = field(default_factory=dict)


def awq_search(names: list[str], weights: list[torch.Tensor], schemes: list[LayerScheme], stats: InputStats
               ) -> AwqChoice:
    """AWQ's exponent for one block: the layers `names` with effective weights `(out, in)` and
    schemes, all reading inputs whose statistic is `stats`. The grid is the first scheme's
    `awq_grid` points i / grid, i = 0 .. grid - 1."""
    gram = stats.gram.float()
    w64 = [w.detach().float() for w in weights]
    error_rtn = _output_error(w64, schemes, gram, None)
    best = (error_rtn, 0.0, torch.ones(w64[0].shape[1]))
    grid = schemes[0].awq_grid
    for i in range(1, grid):
        alpha = i / grid
        s = _awq_factors(stats.mean_abs(), alpha)
        err = _output_error(w64, schemes, gram, s)
        if err < best[0]:
            best = (err, alpha, s)
    return AwqChoice(list(names), best[1], best[2], error_rtn, best[0])


# -- folding the factors into the model -----------------------------------------------------------

def _is_conv1d(m: nn.Module) -> bool:
    from .plan import layer_kind
    return layer_kind(m) == "Conv1D" and type(m).__name__ == "Conv1D"


def _scalable(m: nn.Module) -> bool:
    """A layer whose weight is its function: a plain nn.Linear or transformers' Conv1D."""
    return type(m).forward is nn.Linear.forward or _is_conv1d(m)


def _scale_inputs(m: nn.Module, s: torch.Tensor) -> None:
    """Multiply the effective weight's columns `(out, in)` by s `(in,)` (Conv1D: rows of `(in, out)`)."""
    if _is_conv1d(m):
        m.weight.mul_(s.to(m.weight)[:, None])
    else:
        m.weight.mul_(s.to(m.weight))


def _scale_outputs(m: nn.Module, r: torch.Tensor) -> None:
    """Multiply the layer's outputs by r `(out,)`: the effective weight's rows and the bias."""
    if _is_conv1d(m):
        m.weight.mul_(r.to(m.weight)[None, :])
    else:
        m.weight.mul_(r.to(m.weight)[:, None])
    if m.bias is not None:
        m.bias.mul_(r.to(m.bias))


class _Folder:
    """Tries folds on `model`, each kept only if the output on `probe` stays the float one."""

    def __init__(self, model: nn.Module, probe: Inputs) -> None:
        self.model, self.probe = model, probe
        self.reference = first_tensor(run_model(model, probe))[0].float().clone()

    def attempt(self, tensors: list[torch.Tensor], change) -> tuple[bool, float]:
        """Apply `change()` (in place on `tensors`); undo it unless the output is unchanged."""
        saved = [t.detach().clone() for t in tensors]
        change()
        fit = sqnr_db(self.reference, first_tensor(run_model(self.model, self.probe))[0].float())
        if fit >= FOLD_MIN_SQNR_DB:
            return True, fit
        for t, old in zip(tensors, saved):
            t.copy_(old)
        return False, fit


def _tensors(*modules: nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in (m.weight, getattr(m, "bias", None)) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def gather_stats(model: nn.Module, layers: dict[str, nn.Module], inputs: Inputs, batch_size: int,
                 stats: dict[str, InputStats] | None = None) -> dict[str, InputStats]:
    """Each of `layers`' `InputStats` over `inputs` (one pass of the model)."""
    from .calibrate import input_hooks
    from .plan import layer_shape
    stats = stats if stats is not None else {}
    for name, m in layers.items():
        stats.setdefault(name, InputStats.empty(layer_shape(m)[0], m.weight.device))

    def watch(name: str, x: torch.Tensor) -> None:
        stats[name].update(x)

    with input_hooks(layers, watch):
        for chunk in batches(inputs, batch_size):
            run_model(model, chunk, "model during calibration")
    return stats


@torch.no_grad()
def apply_awq(model: nn.Module, entries: list, inputs: Inputs, *, batch_size: int = 32, per_layer: bool = True
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str], dict[str, float]]:
    """AWQ for the planned `entries` whose scheme has it: gather their inputs' statistics, search
    each block's exponent, and fold the factors into `model` (in place) where its output stays
    the same (module docstring). Returns, by layer: the factors kept per layer (its
    `smooth_scale`; only with `per_layer`), the factors folded into its columns, a note (alpha and
    where the factors went) and alpha."""
    from .calibrate import _norm_feeds
    from .plan import effective_linear
    awq = {e.name: e for e in entries if e.scheme is not None and e.scheme.awq}
    if not awq:
        return {}, {}, {}, {}
    modules = {n: model.get_submodule(n) for n in awq}
    stats = gather_stats(model, modules, inputs, batch_size)
    feeds, _ = _norm_feeds(model, inputs, batch_size)
    folder = _Folder(model, next(batches(inputs, batch_size)))
    kept: dict[str, torch.Tensor] = {}
    folded: dict[str, torch.Tensor] = {}
    notes: dict[str, str] = {}
    alphas: dict[str, float] = {}

    def search(names: list[str]) -> AwqChoice:
        weights = [effective_linear(modules[n], n).weight for n in names]
        return awq_search(names, weights, [awq[n].scheme for n in names], stats[names[0]])

    # blocks behind a norm: every Linear that reads the norm's output (its only reader, or the fold fails)
    groups: dict[str, list[str]] = {}
    for name, sources in feeds.items():
        if len(sources) == 1 and None not in sources:
            groups.setdefault(next(iter(sources)), []).append(name)
    done: set[str] = set()
    for norm_name, readers in groups.items():
        members = [n for n in readers if n in awq]
        if not members:
            continue
        choice = search(members)
        for n in members:
            alphas[n] = choice.alpha
        if choice.alpha == 0.0:
            notes.update(dict.fromkeys(members, "AWQ: alpha 0 (round to nearest was best)"))
            done.update(members)
            continue
        norm = model.get_submodule(norm_name)
        mods = [model.get_submodule(n) for n in readers]
        if all(_scalable(m) for m in mods):
            s = choice.factors

            def fold(norm=norm, mods=mods, s=s):
                norm.weight.div_(s.to(norm.weight))
                if getattr(norm, "bias", None) is not None:
                    norm.bias.div_(s.to(norm.bias))
                for m in mods:
                    _scale_inputs(m, s)

            ok, _ = folder.attempt(_tensors(norm, *mods), fold)
            if ok:
                for n in members:
                    folded[n] = s
                notes.update(dict.fromkeys(members, f"AWQ alpha {choice.alpha:g} folded into {norm_name}"))
                done.update(members)
    # the rest: one layer at a time, into the Linear before it, else kept per layer
    order = list(feeds)  # Linear layers in the order they ran
    for name in [n for n in awq if n not in done]:
        choice = search([name])
        alphas[name] = choice.alpha
        if choice.alpha == 0.0:
            notes[name] = "AWQ: alpha 0 (round to nearest was best)"
            continue
        s, m = choice.factors, modules[name]
        before = _linear_before(model, order, name, s.numel())
        if before is not None and _scalable(m):
            prev = model.get_submodule(before)

            def fold(prev=prev, m=m, s=s):
                _scale_outputs(prev, 1.0 / s)
                _scale_inputs(m, s)

            ok, _ = folder.attempt(_tensors(prev, m), fold)
            if ok:
                folded[name] = s
                notes[name] = f"AWQ alpha {choice.alpha:g} folded into {before}"
                continue
        if per_layer:
            kept[name] = s
            notes[name] = f"AWQ alpha {choice.alpha:g} kept per layer (nothing before it takes the factors unchanged)"
        else:
            alphas[name] = 0.0
            notes[name] = ("exported without AWQ: nothing before it takes the factors unchanged, and "
                           "compressed-tensors has no per-layer factors")
    return kept, folded, notes, alphas


def _linear_before(model: nn.Module, order: list[str], name: str, width: int) -> str | None:
    """The nearest Linear that ran before `name` whose output width is `width` (a candidate to
    take AWQ's factors; the fold is kept only if the model's output does not change)."""
    from .plan import layer_shape
    if name not in order:
        return None
    for prev in reversed(order[:order.index(name)]):
        m = model.get_submodule(prev)
        if layer_shape(m)[1] == width:
            return prev
    return None
