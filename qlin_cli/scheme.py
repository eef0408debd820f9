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

__all__ = [
    "Granularity",
    "PerTensor",
    "PerChannel",
    "PerToken",
    "PER_TENSOR",
    "PER_CHANNEL",
    "PER_TOKEN",
    "MODES",
    "KERNELS",
    "OBSERVER_NAMES",
    "WEIGHT_GRANULARITIES",
    "ACT_GRANULARITIES",
    "LayerScheme",
    "calibration_need",
]

MODES = ("dynamic", "weight-only", "static")
OBSERVER_NAMES = ("minmax", "absmax", "moving-average", "percentile", "mse")  # see observers.py
KERNELS = ("auto", "onednn", "fbgemm", "int_mm", "weight_only")


@dataclass(frozen=True)
class Granularity:
    """Which elements of a tensor share one scale and zero point: a small family of frozen types.

    For a weight `(out_features, in_features)` = `(1024, 512)`: `PerTensor` gives scale shape `()`,
    `PerChannel` `(1024,)` (one per row, i.e. per output channel); a per-group type would give
    `(1024, ceil(512 / G))` (G consecutive input channels of one row share a scale). For activations
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


PER_TENSOR, PER_CHANNEL, PER_TOKEN = PerTensor(), PerChannel(), PerToken()
WEIGHT_GRANULARITIES = (PER_TENSOR, PER_CHANNEL)
ACT_GRANULARITIES = (PER_TOKEN, PER_TENSOR)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not valid: use one of {', '.join(choices)}")


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclass(frozen=True)
class LayerScheme:
    """Everything that decides how one `nn.Linear` is quantized and run. Validated on creation.

    mode: `dynamic` (int8 weights, int8 activations quantized at each call), `weight-only`
        (int8 weights, float activations) or `static` (int8 activations with a scale and zero
        point calibrated once, per tensor; needs calibration data).
    granularity: the weight scales, `PER_CHANNEL` (default) or `PER_TENSOR`.
    symmetric: weights with zero point 0 and values in [-127, 127]; False gives an asymmetric
        range [-128, 127] with a zero point per scale.
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
        Needs calibration data.
    """

    mode: str = "dynamic"
    granularity: Granularity = PER_CHANNEL
    symmetric: bool = True
    act_granularity: Granularity | None = None
    kernel: str = "auto"
    observer: str = "minmax"
    weight_observer: str = "minmax"
    percentile: float = 99.99
    smooth: float | None = None

    # the scheme keys of a plan entry in the qlin file (format version 1), in the reports' order
    ENTRY_KEYS: ClassVar[tuple[str, ...]] = (
        "mode", "granularity", "symmetric", "act_granularity", "kernel_request", "weight_observer",
        "observer", "smooth",
    )

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        object.__setattr__(self, "granularity", Granularity.parse(self.granularity))
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be true or false, not {self.symmetric!r}")
        _choice("kernel", self.kernel, KERNELS)
        _choice("observer", self.observer, OBSERVER_NAMES)
        _choice("weight_observer", self.weight_observer, OBSERVER_NAMES)
        if not _number(self.percentile) or not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile = {self.percentile!r} is not valid: use a number in (50, 100]")
        object.__setattr__(self, "percentile", float(self.percentile))
        if self.smooth is not None:
            if not _number(self.smooth) or not 0 < self.smooth <= 1:
                raise ConfigError(f"smooth = {self.smooth!r} is not valid: SmoothQuant's alpha is in (0, 1], e.g. 0.5")
            object.__setattr__(self, "smooth", float(self.smooth))
            if self.mode == "weight-only":
                raise ConfigError("smooth moves activation outliers into weights; it needs `mode` dynamic or static")
        object.__setattr__(self, "act_granularity", self._resolve_activations())

    def _resolve_activations(self) -> Granularity | None:
        """Check mode, kernel and act_granularity together; the activation granularity."""
        act = self.act_granularity
        if act is not None:
            _choice("act_granularity", str(act) if isinstance(act, Granularity) else act,
                    tuple(g.name for g in ACT_GRANULARITIES))
            act = Granularity.parse(act, ACT_GRANULARITIES)
        if self.mode == "weight-only":
            if act is not None:
                raise ConfigError("act_granularity applies to dynamic mode only; drop it for weight-only")
            if self.kernel not in ("auto", "weight_only"):
                raise ConfigError(
                    f"kernel {self.kernel!r} quantizes activations; weight-only mode takes "
                    "kernel 'auto' or 'weight_only'"
                )
            return None
        if self.kernel == "weight_only":
            raise ConfigError("kernel 'weight_only' needs `mode` weight-only")
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
    def needs_calibration(self) -> bool:
        """Static activation ranges and SmoothQuant factors come from calibration data."""
        return self.calibration_need is not None

    @property
    def calibration_need(self) -> str | None:
        """What of this scheme needs calibration data, in words, or None."""
        if self.static:
            return "static mode"
        return None if self.smooth is None else "SmoothQuant (`smooth`)"

    # -- the recipe's keys (QuantConfig, TOML) ------------------------------------------------

    def to_recipe(self) -> dict[str, Any]:
        """The scheme as a recipe's keys (JSON-able); `LayerScheme(**s.to_recipe()) == s`."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["granularity"] = str(self.granularity)
        d["act_granularity"] = None if self.act_granularity is None else str(self.act_granularity)
        return d

    def with_changes(self, **changes: Any) -> "LayerScheme":
        """A copy with recipe keys `changes` applied (None values are ignored). Another mode
        re-derives act_granularity (its default for that mode) unless `changes` sets it too."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes.get("mode", self.mode) != self.mode and "act_granularity" not in changes:
            changes["act_granularity"] = None
        return replace(self, **changes)

    # -- a plan entry's scheme (the qlin file, the reports) -----------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plan entry's scheme keys (`ENTRY_KEYS`): the kernel is the layer's *request*, and the
        activation observer is recorded for static layers only. The percentile shapes calibration
        only; the file's config records it."""
        return {
            "mode": self.mode,
            "granularity": str(self.granularity),
            "symmetric": self.symmetric,
            "act_granularity": None if self.act_granularity is None else str(self.act_granularity),
            "kernel_request": self.kernel,
            "weight_observer": self.weight_observer,
            "observer": self.observer if self.static else None,
            "smooth": self.smooth,
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
            mode=entry["mode"], granularity=entry["granularity"], symmetric=entry.get("symmetric"),
            act_granularity=stored_act, kernel=entry["kernel_request"],
            weight_observer=entry.get("weight_observer", "minmax"), observer=entry.get("observer") or "minmax",
            smooth=entry.get("smooth"),
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
