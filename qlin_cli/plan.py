"""The plan: every `nn.Linear` of a model and its fate, decided in one place.

"Linear" here also covers transformers' `Conv1D` (GPT-2 and others): `y = x @ W + b` with its
weight stored `(in, out)`, a Linear in all but the layout; qlin quantizes it as the Linear with
weight `W.T` (`(out, in)`, as the file stores every layer), and its plan entry says `module`
"Conv1D".

`make_plan` finds the Linear layers (each module once, with the other paths it is used at), ties,
layers that other modules read directly, nn.Linear subclasses (captured by their affine map), the
config's skip patterns and rules, and layers too small for int8 to pay under `auto`
(`kernels.kept_float_for_speed`), and returns a `Plan`: one `PlanEntry` per layer, quantized
with a `LayerScheme` or kept in float with the reason. Calibration, quantization, packing and the
qlin file consume it; the accuracy fallback makes a new one. `PlanEntry.to_dict` / `from_dict`
are the plan entry's form in the qlin file's metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from .config import QuantConfig, Skip
from .errors import ConfigError, InputError
from .kernels import kept_float_for_speed
from .primitives import sqnr_db
from .scheme import LayerScheme, calibration_need

__all__ = [
    "PlanEntry", "EmbeddingEntry", "Plan", "make_plan", "find_linears", "layer_kind", "layer_shape", "swap_module",
    "affine_surrogate", "effective_linear",
]
LINEAR_MODULES = ("Linear", "Conv1D")  # what a plan entry's `module` can be

# the identity keys of a plan entry in the qlin file, with their JSON types
_ENTRY_FIELDS = {"name": str, "in_features": int, "out_features": int, "has_bias": bool, "status": str, "aliases": list}


@dataclass(frozen=True)
class PlanEntry:
    """One `nn.Linear` of the model (at module path `name`, and at `aliases` if the same module
    is used at several places) and what qlin does with it: quantize it with `scheme`, or keep it
    in float (`scheme` None) for `reason`. For a quantized nn.Linear subclass, `reason` says how
    its function was captured (`effective_linear` captures it again when it is quantized: the
    plan holds no module, so each float layer is freed as soon as it is swapped)."""

    name: str
    in_features: int
    out_features: int
    has_bias: bool
    dtype: str  # the float weight's dtype, e.g. "float32"
    aliases: tuple[str, ...] = ()
    scheme: LayerScheme | None = None
    reason: str = ""
    module: str = "Linear"  # or "Conv1D" (transformers; weight stored (in, out) in the model)

    @property
    def status(self) -> str:
        return "skipped" if self.scheme is None else "quantized"

    @property
    def paths(self) -> list[str]:
        """Every module path of this layer: `name`, then the aliases."""
        return [self.name, *self.aliases]

    def kept_float(self, reason: str) -> "PlanEntry":
        """This entry, kept in float for `reason`."""
        return replace(self, scheme=None, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        """The entry as the qlin file stores it (machine-independent), in the reports' key order."""
        return {
            "name": self.name, "in_features": self.in_features, "out_features": self.out_features,
            "has_bias": self.has_bias, "dtype": self.dtype, "status": self.status, "reason": self.reason,
            "aliases": list(self.aliases), "module": self.module,
            **(LayerScheme.none_dict() if self.scheme is None else self.scheme.to_dict()),
        }

    @classmethod
    def from_dict(cls, e: Any) -> "PlanEntry":
        """An entry (a dict) read from a qlin file, validated (types, shape, dtype, scheme). Raises
        ValueError with a message that names the layer."""
        for key, typ in _ENTRY_FIELDS.items():
            if not isinstance(e.get(key), typ) or (typ is int and isinstance(e.get(key), bool)):
                raise ValueError(f"plan entry {e.get('name', '?')!r} has no valid {key!r}")
        name = e["name"]
        if not all(isinstance(a, str) for a in e["aliases"]):
            raise ValueError(f"plan entry {name!r} has aliases that are not module paths")
        scheme = None
        if e["status"] == "quantized":
            if e["out_features"] < 1 or e["in_features"] < 1:
                raise ValueError(f"layer {name!r} has shape ({e['out_features']}, {e['in_features']})")
            try:
                scheme = LayerScheme.from_dict(e)
            except (ConfigError, TypeError) as exc:
                raise ValueError(f"layer {name!r} has an invalid scheme ({exc})") from None
            dtype = e.get("dtype", "float32")
            torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
            if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
                raise ValueError(f"layer {name!r} has dtype {dtype!r}, not a float dtype")
        reason = e.get("reason", "")
        module = e.get("module", "Linear")  # version 1: Linear only
        if module not in LINEAR_MODULES:
            raise ValueError(f"plan entry {name!r} has module {module!r}, not one of {', '.join(LINEAR_MODULES)}")
        return cls(name, e["in_features"], e["out_features"], e["has_bias"], str(e.get("dtype", "float32")),
                   tuple(e["aliases"]), scheme, reason if isinstance(reason, str) else "", module)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class EmbeddingEntry:
    """An `nn.Embedding` at module path `name` (with `--embeddings`): quantized int8 per row
    (weight-only), or kept float for `reason`. `to_dict`/`from_dict` are its form in the file."""

    name: str
    num_embeddings: int
    embedding_dim: int
    dtype: str
    quantized: bool
    reason: str = ""

    @property
    def status(self) -> str:
        return "quantized" if self.quantized else "skipped"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "dtype": self.dtype, "status": self.status, "reason": self.reason}

    @classmethod
    def from_dict(cls, e: Any) -> "EmbeddingEntry":
        """An entry read from a qlin file; ValueError names what is wrong."""
        types = {"name": str, "num_embeddings": int, "embedding_dim": int, "dtype": str, "status": str, "reason": str}
        if not isinstance(e, dict):
            raise ValueError("metadata embeddings is not a list of embeddings")
        for key, typ in types.items():
            if not isinstance(e.get(key), typ) or (typ is int and (isinstance(e[key], bool) or e[key] < 1)):
                raise ValueError(f"embedding entry {e.get('name', '?')!r} has no valid {key!r}")
        if e["status"] not in ("quantized", "skipped"):
            raise ValueError(f"embedding {e['name']!r} has status {e['status']!r}")
        if not isinstance(getattr(torch, e["dtype"], None), torch.dtype) or not getattr(torch, e["dtype"]).is_floating_point:
            raise ValueError(f"embedding {e['name']!r} has dtype {e['dtype']!r}, not a float dtype")
        return cls(e["name"], e["num_embeddings"], e["embedding_dim"], e["dtype"], e["status"] == "quantized", e["reason"])


@dataclass(frozen=True)
class Plan:
    """Every `nn.Linear` of a model, in module order, and its fate; with `--embeddings`, every
    `nn.Embedding` too."""

    entries: tuple[PlanEntry, ...]
    embeddings: tuple[EmbeddingEntry, ...] = ()

    @property
    def quantized_embeddings(self) -> list[EmbeddingEntry]:
        return [e for e in self.embeddings if e.quantized]

    @property
    def quantized(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.scheme is not None]

    def calibration_need(self) -> str | None:
        """What of the planned layers needs calibration data, in words (static mode first), or None."""
        return calibration_need(e.scheme for e in self.quantized)

    def with_smoothing(self, alpha: float) -> tuple["Plan", int]:
        """This plan with SmoothQuant `alpha` on every dynamic layer that does not set `smooth`
        (qlin's default where it has realistic data), and how many layers that changed."""
        entries, changed = [], 0
        for e in self.entries:
            if e.scheme is not None and e.scheme.mode == "dynamic" and e.scheme.smooth is None:
                e, changed = replace(e, scheme=replace(e.scheme, smooth=alpha)), changed + 1
            entries.append(e)
        return replace(self, entries=tuple(entries)), changed

    def without_smoothing(self, notes: dict[str, str]) -> "Plan":
        """This plan with SmoothQuant off everywhere (`calibrate.fold_smoothing` moved it into the
        model or found it could not), each layer's note from `notes` added to its reason."""
        entries = []
        for e in self.entries:
            if e.scheme is not None and e.scheme.smooth is not None:
                note = notes.get(e.name, "")
                e = replace(e, scheme=replace(e.scheme, smooth=None), reason="; ".join(r for r in (e.reason, note) if r))
            entries.append(e)
        return replace(self, entries=tuple(entries))

    def to_list(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.entries]

    def to_json(self) -> str:
        """The plan as the qlin file's metadata holds it (and a compressed-tensors export's)."""
        return json.dumps(self.to_list(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_list(cls, data: Any) -> "Plan":
        """A plan read from a qlin file; ValueError names what is wrong."""
        if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
            raise ValueError("metadata plan is not a list of layers")
        return cls(tuple(PlanEntry.from_dict(e) for e in data))


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' `Conv1D` (by name and shape, so transformers need not be imported):
    weight `(nx, nf)` = `(in, out)`, `y = x @ weight + bias`."""
    w = getattr(m, "weight", None)
    return (any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(m).__mro__)
            and isinstance(w, torch.Tensor) and w.dim() == 2 and tuple(w.shape) == (getattr(m, "nx", -1), getattr(m, "nf", -1)))


def layer_kind(m: nn.Module) -> str:
    """A plan entry's `module`: "Conv1D" for transformers' Conv1D, else "Linear"."""
    return "Conv1D" if _is_conv1d(m) else "Linear"


def layer_shape(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear` or a transformers `Conv1D`."""
    return (m.nx, m.nf) if _is_conv1d(m) else (m.in_features, m.out_features)


def find_linears(model: nn.Module) -> list[tuple[str, nn.Module, list[str], nn.Module | None]]:
    """Every distinct `nn.Linear` (isinstance) or transformers `Conv1D` in module order: (first
    path, module, other paths of the same module object, parent module)."""
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    parents: dict[int, nn.Module | None] = {}
    named = dict(model.named_modules(remove_duplicate=False))
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Linear) or _is_conv1d(m):
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


def _unfit_reason(module: nn.Linear, parent: nn.Module | None, tied_to: str | None) -> str:
    """Why a layer cannot be swapped whatever the config says, or ""."""
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
    if _is_conv1d(module) and type(module).__name__ == "Conv1D":  # x @ W + b exactly: W.T, no probing
        k, n = layer_shape(module)
        surrogate = nn.Linear(k, n, bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
        surrogate.weight.copy_(module.weight.t())
        if module.bias is not None:
            surrogate.bias.copy_(module.bias)
        return surrogate, "transformers Conv1D: its (in, out) weight quantized as (out, in)"
    if _is_conv1d(module):
        return None, f"{type(module).__qualname__} overrides Conv1D's forward; only Conv1D itself is handled"
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


def make_plan(model: nn.Module, config: QuantConfig) -> Plan:
    """The plan for every `nn.Linear` of `model` (in eval mode: subclasses are probed by running
    them) under `config`. Raises InputError if the model has none."""
    linears = find_linears(model)
    if not linears:
        raise InputError(f"the model ({type(model).__name__}) has no nn.Linear layer to quantize")
    tied = _tied_weights(model, linears)
    entries = []
    for name, linear, aliases, parent in linears:
        scheme = config.for_layer(name)
        in_f, out_f = layer_shape(linear)
        if not isinstance(scheme, Skip) and (scheme.group_size or 0) > in_f:
            raise ConfigError(
                f"layer {name!r} has {in_f} input channels, fewer than `group_size` "
                f"{scheme.group_size}: use a smaller group size, or a recipe rule for this layer")
        reason = scheme.reason if isinstance(scheme, Skip) else _unfit_reason(linear, parent, tied.get(name))
        effective = None
        if not reason:
            effective, note = affine_surrogate(linear)
            reason = note
            slow = None if effective is None else kept_float_for_speed(scheme, in_f, out_f)
            if slow is not None:  # too small for int8 to pay (`auto`): float, recorded as such
                effective, reason = None, slow
        entry = PlanEntry(
            name, in_f, out_f, linear.bias is not None,
            str(linear.weight.dtype).removeprefix("torch."), tuple(aliases), module=layer_kind(linear),
        )
        if effective is None:  # kept in float
            entries.append(replace(entry, reason=reason))
        else:
            entries.append(replace(entry, scheme=scheme, reason=reason, has_bias=effective.bias is not None))
    return Plan(tuple(entries), plan_embeddings(model, config) if config.embeddings else ())


def plan_embeddings(model: nn.Module, config: QuantConfig) -> tuple[EmbeddingEntry, ...]:
    """Every `nn.Embedding` of `model` (module order) and its fate: int8 per row, or float where
    the config skips it or quantizing would change the model: a table used at several paths, one
    whose weight another module holds too (a tied language-model head, which stays float), a
    subclass with its own forward, `max_norm` (the lookup rewrites the table)."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname.rpartition(".")[0])
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Embedding] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Embedding):
            paths.setdefault(id(m), []).append(name)
            modules[id(m)] = m
    entries = []
    for key, names in paths.items():
        name, m = names[0], modules[key]
        tied = [o for o in owners.get(id(m.weight), []) if o not in names]
        pattern = config.skips(name)
        if pattern is not None:
            reason = f"matches --skip {pattern!r}"
        elif len(names) > 1:
            reason = f"used at {len(names)} paths ({', '.join(names)})"
        elif tied:
            reason = f"weight tied to {tied[0] or '(root)'}"
        elif type(m).forward is not nn.Embedding.forward:
            reason = f"{type(m).__qualname__} overrides forward"
        elif m.max_norm is not None:
            reason = "max_norm renormalizes the table at each lookup"
        elif not m.weight.is_floating_point():
            reason = f"weight dtype {m.weight.dtype} is not a float dtype"
        else:
            reason = ""
        entries.append(EmbeddingEntry(name, m.num_embeddings, m.embedding_dim,
                                      str(m.weight.dtype).removeprefix("torch."), not reason, reason))
    return tuple(entries)


def effective_linear(module: nn.Linear, name: str) -> nn.Linear:
    """The plain Linear that computes what planned layer `name` computes: the module itself, or
    the affine map of a subclass's own forward (`affine_surrogate`, measured again here)."""
    effective, why = affine_surrogate(module)
    if effective is None:  # the plan found it affine: the module changed since
        raise InputError(f"layer {name!r}: {why}")
    return effective
