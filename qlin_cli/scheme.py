"""How one layer is quantized and run: granularities (which elements share a scale) and
`LayerScheme`, the frozen value that carries a layer's scheme from the recipe to the file.

`LayerScheme.to_dict` / `from_dict` are the only writer and reader of a plan entry's scheme (the
qlin file's metadata and the reports); everything else (kernels, the compressed-tensors export)
reads the typed fields. `to_recipe` / `with_changes` speak the recipe's keys (`QuantConfig`, TOML
`[[layers]]` rules).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from .errors import ConfigError
from .kernels import registry

__all__ = [
    "Granularity",
    "PerTensor",
    "PerChannel",
    "PerToken",
    "PerGroup",
    "PER_TENSOR",
    "PER_CHANNEL",
    "PER_TOKEN",
    "MODES",
    "OBSERVER_NAMES",
    "WEIGHT_GRANULARITIES",
    "ACT_GRANULARITIES",
    "LayerScheme",
    "calibration_need",
    "ROUNDINGS",
    "ROUNDING_KEYS",
]

MODES = ("dynamic", "weight-only", "static")
OBSERVER_NAMES = ("minmax", "absmax", "moving-average", "percentile", "mse")  # see observers.py
# how a layer's weights are rounded (rounding.py): to nearest, GPTQ, AWQ's activation-aware
# scaling, or AWQ's scaling then GPTQ
ROUNDINGS = ("rtn", "gptq", "awq", "awq+gptq")
# the scheme keys that only a rounding method reads; written (recipe, plan entry) only where they
# matter, so that a round-to-nearest scheme's recipe and file stay what they were
ROUNDING_KEYS = ("rounding", "gptq_damp", "gptq_block_size", "act_order", "awq_grid")
_ROUNDING_DEFAULTS = {"rounding": "rtn", "gptq_damp": 0.01, "gptq_block_size": 128, "act_order": False, "awq_grid": 20}


@dataclass(frozen=True)
class Granularity:
    """Which elements of a tensor share one scale and zero point: a small family of frozen types.

    For a weight `(out_features, in_features)` = `(1024, 512)`: `PerTensor` gives scale shape `()`,
    `PerChannel` `(1024,)` (one per row, i.e. per output channel), `PerGroup(128)` `(1024, 4)`
    (G consecutive input channels of one row share a scale: `(out, ceil(in / G))`). For activations
    flattened to `(tokens, in_features)`: `PerTensor` `()`, `PerToken` `(tokens,)`.
    """

    name: ClassVar[str] = ""

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale (and zero point) for a tensor of `shape`."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def parse(value: "str | Granularity", allowed: tuple["Granularity", ...] | None = None) -> "Granularity":
        """`value` as a Granularity (a name such as "channel", or one already), one of `allowed`
        (default: the weight granularities)."""
        allowed = WEIGHT_GRANULARITIES if allowed is None else allowed
        names = [g.name for g in allowed]
        for g in allowed:
            if value == g or value == g.name:
                return g
        if isinstance(value, (str, Granularity)):
            raise ConfigError(f"unknown granularity {str(value)!r}: use one of {', '.join(names)}")
        raise ConfigError(f"granularity must be {' or '.join(map(repr, names))}, not {value!r}")


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor: scale shape `()` (a (1024, 512) weight: `()`)."""

    name: ClassVar[str] = "tensor"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ()


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per output channel, i.e. per row of the weight `(out, in)`: scale shape
    `(out,)` (a (1024, 512) weight: `(1024,)`)."""

    name: ClassVar[str] = "channel"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (int(shape[0]),)


@dataclass(frozen=True)
class PerToken(Granularity):
    """Activations only: one scale per row of the input flattened to `(tokens, in)`: scale shape
    `(tokens,)`, computed at each call, so a sample's result never depends on the batch."""

    name: ClassVar[str] = "token"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (int(shape[0]),)


@dataclass(frozen=True)
class PerGroup(Granularity):
    """Weights only: one scale per group of `size` consecutive input channels of each output row:
    scale shape `(out, ceil(in / size))` (a (1024, 512) weight at size 128: `(1024, 4)`). When
    `size` does not divide `in`, the last group of each row is shorter (`in % size` channels); no
    padding. Grouped layers are weight-only (the default) or dynamic: per-token int8 activations
    times B-bit weights, one exact integer dot product per group, each scaled by its group's
    scale (W4A8 at 4 bits; kernel `lowbit_dynamic`)."""

    size: int = 128
    name: ClassVar[str] = "group"

    def __post_init__(self) -> None:
        if not _integer(self.size) or self.size < 1:
            raise ConfigError(f"group_size = {self.size!r} is not valid: use a whole number of input channels >= 1, e.g. 128")

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (int(shape[0]), self.groups(int(shape[1])))

    def groups(self, in_features: int) -> int:
        """Groups per row: ceil(in_features / size)."""
        return -(-in_features // self.size)


PER_TENSOR, PER_CHANNEL, PER_TOKEN = PerTensor(), PerChannel(), PerToken()
WEIGHT_GRANULARITIES = (PER_TENSOR, PER_CHANNEL)
ACT_GRANULARITIES = (PER_TOKEN, PER_TENSOR)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not valid: use one of {', '.join(choices)}")


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _integer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


@dataclass(frozen=True)
class LayerScheme:
    """Everything that decides how one `nn.Linear` is quantized and run. Validated on creation.

    mode: `dynamic` (int8 weights, int8 activations quantized at each call), `weight-only`
        (int8 weights, float activations) or `static` (int8 activations with a scale and zero
        point calibrated once, per tensor; needs calibration data). Left as None it resolves to
        `weight-only` for grouped weights and `dynamic` otherwise.
    granularity: the weight scales, `PER_CHANNEL` (default), `PER_TENSOR` or `PerGroup(G)` (set
        through `group_size`).
    bits: the weight width B, 2 to 8 (default 8): symmetric values in [-(2^(B-1) - 1),
        2^(B-1) - 1] with s = amax / (2^(B-1) - 1); asymmetric values in [-2^(B-1), 2^(B-1) - 1].
        A B-bit value is an int8 value, so per-channel and per-tensor weights of any width run
        on the int8 kernels; the file stores them packed (B bits each).
    group_size: G consecutive input channels of each output row share a scale: scale shape
        `(out, ceil(in / G))`, the last group shorter when G does not divide in. Weight-only
        unless `mode` dynamic is given (per-token int8 activations, an integer dot product per
        group: kernel `lowbit_dynamic`); not static.
    symmetric: weights with zero point 0 and values in [-127, 127] (8 bits); False gives an
        asymmetric range [-128, 127] with a zero point per scale.
    act_granularity: `PER_TOKEN` (dynamic's default: each row of the flattened input with its own
        asymmetric range, batch-invariant) or `PER_TENSOR` (one range per call in dynamic mode,
        torch.ao's default; static mode's only choice); None for weight-only. Left as None it
        resolves to the mode's default.
    kernel: the kernel request: `auto` picks per layer on the machine that packs the model; a
        forced kernel runs where it can and falls back, with the reason reported, where it cannot.
    observer: static mode's activation observer (minmax, absmax, moving-average, percentile, mse).
    weight_observer: how a weight's range is chosen (minmax by default).
    percentile: the percentile of the `percentile` observers.
    smooth: SmoothQuant's alpha in (0, 1], or None (off): per input channel factors
        s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) move activation outliers into the weights.
        Needs calibration data. In a plan, a weight-only layer with `rounding` awq whose factors
        could not be folded into the module before it carries AWQ's searched exponent here
        (its factors s_j = mean|X_j|^alpha, normalized, kept per layer as SmoothQuant's are).
    rounding: how the weights are rounded (rounding.py): `rtn` (to nearest, the default),
        `gptq` (each column's rounding error compensated on the columns not yet rounded, from
        the inverse Hessian of the layer's inputs), `awq` (activation-aware per input channel
        factors, searched per block; weight-only) or `awq+gptq`. All but rtn need calibration
        data (or a text model's token ids).
    gptq_damp: GPTQ's dampening, a fraction of the Hessian's mean diagonal added to it (0.01).
    gptq_block_size: columns GPTQ rounds before it updates the rest at once (128; the result
        does not depend on it but for float rounding).
    act_order: GPTQ rounds the columns in order of decreasing Hessian diagonal (activation
        order). With groups, each group's scale is fixed from the float weights first (static
        groups), so the file needs no group index.
    awq_grid: how many exponents alpha in [0, 1) AWQ tries (20).
    """

    mode: str | None = None
    granularity: Granularity = PER_CHANNEL
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    act_granularity: Granularity | None = None
    kernel: str = "auto"
    observer: str = "minmax"
    weight_observer: str = "minmax"
    percentile: float = 99.99
    smooth: float | None = None
    rounding: str = "rtn"
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    act_order: bool = False
    awq_grid: int = 20

    # the scheme keys of a plan entry in the qlin file, in the reports' order (format version 1
    # had no bits and group_size: 8 and None)
    ENTRY_KEYS: ClassVar[tuple[str, ...]] = (
        "mode", "granularity", "bits", "group_size", "symmetric", "act_granularity", "kernel_request",
        "weight_observer", "observer", "smooth",
    )

    def __post_init__(self) -> None:
        if not _integer(self.bits) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits = {self.bits!r} is not valid: use a whole number from 2 to 8 (8 is the default)")
        object.__setattr__(self, "granularity", self._resolve_granularity())
        grouped = isinstance(self.granularity, PerGroup)
        if self.mode is None:
            object.__setattr__(self, "mode", "weight-only" if grouped else "dynamic")
        _choice("mode", self.mode, MODES)
        if grouped and self.mode == "static":
            raise ConfigError(
                f"group-wise weight scales (`group_size` {self.group_size}) run weight-only or dynamic (per-token "
                f"int8 activations, one integer dot product per group), not static; drop `mode` static or `group_size`")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be true or false, not {self.symmetric!r}")
        _choice("kernel", self.kernel, registry.request_names())
        _choice("observer", self.observer, OBSERVER_NAMES)
        _choice("weight_observer", self.weight_observer, OBSERVER_NAMES)
        if not _number(self.percentile) or not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile = {self.percentile!r} is not valid: use a number in (50, 100]")
        object.__setattr__(self, "percentile", float(self.percentile))
        self._check_rounding()
        if self.smooth is not None:
            if not _number(self.smooth) or not 0 < self.smooth <= 1:
                raise ConfigError(f"smooth = {self.smooth!r} is not valid: SmoothQuant's alpha is in (0, 1], e.g. 0.5")
            object.__setattr__(self, "smooth", float(self.smooth))
            if self.mode == "weight-only" and "awq" not in self.rounding:
                raise ConfigError("smooth moves activation outliers into weights; it needs `mode` dynamic or static")
        object.__setattr__(self, "act_granularity", self._resolve_activations())

    def _check_rounding(self) -> None:
        """The rounding method and its options, against the mode."""
        _choice("rounding", self.rounding, ROUNDINGS)
        if "awq" in self.rounding and self.mode != "weight-only":
            raise ConfigError(
                f"rounding = {self.rounding!r}: AWQ scales the weights of weight-only layers (`mode` {self.mode!r} "
                "quantizes activations too, where SmoothQuant's `smooth` does that job); use `rounding` gptq, "
                "or `mode` weight-only")
        if not _number(self.gptq_damp) or not 0 < self.gptq_damp < 1:
            raise ConfigError(f"gptq_damp = {self.gptq_damp!r} is not valid: a fraction of the Hessian's mean diagonal in (0, 1), e.g. 0.01")
        object.__setattr__(self, "gptq_damp", float(self.gptq_damp))
        if not _integer(self.gptq_block_size) or self.gptq_block_size < 1:
            raise ConfigError(f"gptq_block_size = {self.gptq_block_size!r} is not valid: a whole number of columns >= 1, e.g. 128")
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"act_order must be true or false, not {self.act_order!r}")
        if not _integer(self.awq_grid) or not 2 <= self.awq_grid <= 1000:
            raise ConfigError(f"awq_grid = {self.awq_grid!r} is not valid: a whole number of exponents from 2 to 1000, e.g. 20")

    def _resolve_granularity(self) -> Granularity:
        """The weight granularity, from `granularity` and `group_size` together (and group_size
        set from a PerGroup)."""
        g, size = self.granularity, self.group_size
        if size is None:
            if isinstance(g, PerGroup):
                object.__setattr__(self, "group_size", g.size)
                return g
            if g == "group":
                raise ConfigError("granularity 'group' needs `group_size`, e.g. 128")
            return Granularity.parse(g)
        group = PerGroup(size)
        if isinstance(g, PerGroup) and g != group:
            raise ConfigError(f"granularity {g.name}({g.size}) and `group_size` {size} disagree")
        if g in (PER_TENSOR, "tensor"):
            raise ConfigError("`group_size` gives one scale per group of input channels; drop `granularity` 'tensor'")
        if not (isinstance(g, PerGroup) or g in (PER_CHANNEL, "channel", "group")):
            Granularity.parse(g)  # the usual message for an unknown name
        return group

    def _resolve_activations(self) -> Granularity | None:
        """Check mode, kernel and act_granularity together; the activation granularity."""
        act = self.act_granularity
        if act is not None:
            _choice("act_granularity", str(act) if isinstance(act, Granularity) else act,
                    tuple(g.name for g in ACT_GRANULARITIES))
            act = Granularity.parse(act, ACT_GRANULARITIES)
        if self.mode == "weight-only" and act is not None:
            raise ConfigError("act_granularity applies to dynamic mode only; drop it for weight-only")
        problem = registry.request_problem(self)  # the kernel named against the mode and weights
        if problem is not None:
            raise ConfigError(problem)
        if self.mode == "weight-only":
            return None
        if self.group_size is not None and act not in (None, PER_TOKEN):
            raise ConfigError("grouped dynamic layers quantize activations per token (each row's own scale, "
                              "batch invariant); drop act_granularity 'tensor'")
        if self.mode == "static":
            if act not in (None, PER_TENSOR):
                raise ConfigError("static mode calibrates one activation scale per tensor; drop act_granularity")
            return PER_TENSOR
        return PER_TOKEN if act is None else act

    @property
    def static(self) -> bool:
        return self.mode == "static"

    @property
    def per_token(self) -> bool:
        """Activations quantized per row of the flattened input, at each call."""
        return self.act_granularity == PER_TOKEN

    @property
    def calibration_need(self) -> str | None:
        """What of this scheme needs calibration data, in words, or None."""
        if self.static:
            return "static mode"
        if self.rounding != "rtn":
            return f"rounding {self.rounding} (`rounding`)"
        return None if self.smooth is None else "SmoothQuant (`smooth`)"

    @property
    def gptq(self) -> bool:
        return "gptq" in self.rounding

    @property
    def awq(self) -> bool:
        return "awq" in self.rounding

    def _rounding_keys(self) -> dict[str, Any]:
        """The rounding keys worth writing: none for rtn, and GPTQ's options only with GPTQ, AWQ's
        only with AWQ (their defaults included, so that a file says what it was made with)."""
        if self.rounding == "rtn":
            return {}
        keys = ["rounding", *(("gptq_damp", "gptq_block_size", "act_order") if self.gptq else ()),
                *(("awq_grid",) if self.awq else ())]
        return {k: getattr(self, k) for k in keys}

    # -- the recipe's keys (QuantConfig, TOML) ------------------------------------------------

    def to_recipe(self) -> dict[str, Any]:
        """The scheme as a recipe's keys (JSON-able); `LayerScheme(**s.to_recipe()) == s`."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ROUNDING_KEYS}
        d.update({k: v for k, v in ((k, getattr(self, k)) for k in ROUNDING_KEYS) if v != _ROUNDING_DEFAULTS[k]})
        d["granularity"] = str(self.granularity)  # "group", with its size in group_size
        d["act_granularity"] = None if self.act_granularity is None else str(self.act_granularity)
        return d

    def with_changes(self, **changes: Any) -> "LayerScheme":
        """A copy with recipe keys `changes` applied (None values are ignored). Another mode
        re-derives act_granularity (its default for that mode) unless `changes` sets it too.
        `group_size` without `mode` selects weight-only (without `granularity`: per group);
        `granularity` without `group_size` drops the groups."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "group_size" in changes:
            changes.setdefault("granularity", PER_CHANNEL)  # re-derived as PerGroup(group_size)
            if "mode" not in changes:
                changes["mode"] = None  # resolves to weight-only
        elif "granularity" in changes:
            changes["group_size"] = None
        if changes.get("mode", self.mode) != self.mode and "act_granularity" not in changes:
            changes["act_granularity"] = None
        return replace(self, **changes)

    # -- a plan entry's scheme (the qlin file, the reports) -----------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plan entry's scheme keys (`ENTRY_KEYS`, then the rounding keys where the rounding is
        not rtn): the kernel is the layer's *request*, and the activation observer is recorded for
        static layers only. The percentile shapes calibration only; the file's config records it."""
        return {
            "mode": self.mode,
            "granularity": str(self.granularity),
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "act_granularity": None if self.act_granularity is None else str(self.act_granularity),
            "kernel_request": self.kernel,
            "weight_observer": self.weight_observer,
            "observer": self.observer if self.static else None,
            "smooth": self.smooth,
            **self._rounding_keys(),
        }

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> "LayerScheme":
        """The scheme of a plan entry written by `to_dict`. Raises ConfigError if it is not one
        qlin can run, or if its act_granularity is not the resolved one `to_dict` writes (the
        activation observer of a layer that is not static is ignored, as it has no effect)."""
        for key, typ in (("mode", str), ("granularity", str), ("kernel_request", str)):
            if not isinstance(entry.get(key), typ):
                raise ConfigError(f"{key} = {entry.get(key)!r} is not valid")
        stored_act = entry.get("act_granularity")
        scheme = cls(
            mode=entry["mode"], granularity=entry["granularity"], bits=entry.get("bits", 8),
            group_size=entry.get("group_size"), symmetric=entry.get("symmetric"),
            act_granularity=stored_act, kernel=entry["kernel_request"],
            weight_observer=entry.get("weight_observer", "minmax"), observer=entry.get("observer") or "minmax",
            smooth=entry.get("smooth"), **{k: entry[k] for k in ROUNDING_KEYS if k in entry},
        )
        if scheme.to_dict()["act_granularity"] != stored_act:
            raise ConfigError(f"act_granularity {stored_act!r} does not fit mode {scheme.mode!r}")
        return scheme

    @classmethod
    def none_dict(cls) -> dict[str, None]:
        """A plan entry's scheme keys for a layer kept in float."""
        return dict.fromkeys(cls.ENTRY_KEYS)


def calibration_need(schemes) -> str | None:
    """What of `schemes` needs calibration data, in words (static mode before SmoothQuant), or
    None: the one answer for a config (before a model is loaded) and for a model's plan."""
    needs = {s.calibration_need for s in schemes} - {None}
    return "static mode" if "static mode" in needs else next(iter(needs), None)
