"""Configuration: granularity, QuantConfig, TOML recipes and their JSON form in qlin files.

A QuantConfig says *what* to compute (mode, granularity, symmetry, kernel request, skips). It
never says *where*: the device is chosen when a model is packed, so a saved file is portable.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "Granularity",
    "PER_TENSOR",
    "PER_CHANNEL",
    "MODES",
    "KERNELS",
    "ACT_GRANULARITIES",
    "OBSERVER_NAMES",
    "QuantConfig",
    "load_recipe",
]

MODES = ("dynamic", "weight-only", "static")
OBSERVER_NAMES = ("minmax", "absmax", "moving-average", "percentile", "mse")  # see observers.py
KERNELS = ("auto", "fbgemm", "int_mm", "weight_only")
ACT_GRANULARITIES = ("token", "tensor")
_GRANULARITY_KINDS = ("tensor", "channel")


@dataclass(frozen=True)
class Granularity:
    """Which elements of a weight `(out_features, in_features)` share one scale and zero point.

    - `tensor`: one scale for the whole weight; scale shape `()`.
    - `channel`: one per output channel, i.e. per row of the weight; scale shape `(out_features,)`.
    Per group (`(out_features, in_features // group)`) would add a `group_size` field here.
    """

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in _GRANULARITY_KINDS:
            raise ConfigError(
                f"unknown granularity {self.kind!r}: use one of {', '.join(_GRANULARITY_KINDS)}"
            )

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale for a weight: `()` per tensor, `(weight_shape[0],)` per channel."""
        return () if self.kind == "tensor" else (int(weight_shape[0]),)

    def __str__(self) -> str:
        return self.kind


PER_TENSOR = Granularity("tensor")
PER_CHANNEL = Granularity("channel")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not valid: use one of {', '.join(choices)}")


@dataclass(frozen=True)
class QuantConfig:
    """What qlin does to each planned `nn.Linear`.

    mode: `dynamic` (int8 weights and int8 activations quantized at each call),
        `weight-only` (int8 weights, float activations) or `static` (int8 weights and int8
        activations with a scale and zero point calibrated once, per tensor; needs calibration
        data).
    granularity: weight scale granularity, `channel` (default) or `tensor`.
    symmetric: weights with zero point 0 and values in [-127, 127]; False gives an
        asymmetric range [-128, 127] with a zero point per scale.
    act_granularity: dynamic mode only. `token` (default) quantizes each row of the flattened
        input with its own scale, so a sample's result never depends on the rest of the batch;
        `tensor` uses one scale per call (batch-dependent; what fbgemm's kernel does).
        Left as None it resolves to `tensor` for `kernel="fbgemm"` and `token` otherwise.
    kernel: `auto` picks per layer on the machine that packs the model; a forced kernel is used
        where it can run and falls back, with the reason reported, where it cannot.
    skip: regular expressions; a layer whose module path matches any (re.search) stays float.
    observer: how calibration turns a layer's inputs into the static activation range
        (minmax, absmax, moving-average, percentile, mse).
    weight_observer: how a weight's range is chosen (minmax by default).
    percentile: the percentile of the `percentile` observers.
    smooth: SmoothQuant's alpha in (0, 1], or None (off): per input channel factors
        s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) move activation outliers into the weights.
        Needs calibration data.
    """

    mode: str = "dynamic"
    granularity: Granularity = PER_CHANNEL
    symmetric: bool = True
    act_granularity: str | None = None
    kernel: str = "auto"
    skip: tuple[str, ...] = field(default_factory=tuple)
    observer: str = "minmax"
    weight_observer: str = "minmax"
    percentile: float = 99.99
    smooth: float | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "static" or self.smooth is not None

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        if isinstance(self.granularity, str):
            object.__setattr__(self, "granularity", Granularity(self.granularity))
        if not isinstance(self.granularity, Granularity):
            raise ConfigError(f"granularity must be 'tensor' or 'channel', not {self.granularity!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be true or false, not {self.symmetric!r}")
        _choice("kernel", self.kernel, KERNELS)
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        object.__setattr__(self, "skip", tuple(self.skip))
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"skip pattern {pattern!r} is not a valid regex: {exc}") from None
        _choice("observer", self.observer, OBSERVER_NAMES)
        _choice("weight_observer", self.weight_observer, OBSERVER_NAMES)
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile = {self.percentile!r} is not valid: use a number in (50, 100]")
        object.__setattr__(self, "percentile", float(self.percentile))
        if self.smooth is not None:
            if isinstance(self.smooth, bool) or not isinstance(self.smooth, (int, float)) or not 0 < self.smooth <= 1:
                raise ConfigError(f"smooth = {self.smooth!r} is not valid: SmoothQuant's alpha is in (0, 1], e.g. 0.5")
            object.__setattr__(self, "smooth", float(self.smooth))
            if self.mode == "weight-only":
                raise ConfigError("smooth moves activation outliers into weights; it needs --mode dynamic or static")
        if self.mode == "weight-only":
            if self.act_granularity is not None:
                raise ConfigError("act_granularity applies to dynamic mode only; drop it for weight-only")
            if self.kernel not in ("auto", "weight_only"):
                raise ConfigError(
                    f"kernel {self.kernel!r} quantizes activations; weight-only mode takes "
                    "kernel 'auto' or 'weight_only'"
                )
            return
        if self.kernel == "weight_only":
            raise ConfigError("kernel 'weight_only' needs --mode weight-only")
        if self.mode == "static":
            if self.act_granularity not in (None, "tensor"):
                raise ConfigError("static mode calibrates one activation scale per tensor; drop act_granularity")
            object.__setattr__(self, "act_granularity", "tensor")
            return
        if self.act_granularity is None:
            object.__setattr__(self, "act_granularity", "tensor" if self.kernel == "fbgemm" else "token")
        _choice("act_granularity", self.act_granularity, ACT_GRANULARITIES)
        if self.kernel == "fbgemm" and self.act_granularity != "tensor":
            raise ConfigError(
                "kernel 'fbgemm' quantizes activations per tensor; use act_granularity 'tensor' "
                "or kernel 'int_mm' for per-token activations"
            )

    def skips(self, name: str) -> str | None:
        """The first skip pattern that matches module path `name`, or None."""
        return next((p for p in self.skip if re.search(p, name)), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; `QuantConfig.from_dict(c.to_dict()) == c`."""
        d = dataclasses.asdict(self)
        d["granularity"] = str(self.granularity)
        d["skip"] = list(self.skip)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "config") -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{origin}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**data)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a TOML recipe (top-level keys are QuantConfig fields) and return its validated dict.

    Errors name the file, and the key and line where the problem is.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {path} cannot be read: {exc.__class__.__name__}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from None

    def where(key: str) -> str:
        for lineno, line in enumerate(text.splitlines(), 1):
            if re.match(rf"\s*{re.escape(key)}\s*=", line):
                return f"{path}:{lineno}"
        return str(path)

    known = {f.name for f in dataclasses.fields(QuantConfig)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where(key)}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
    try:
        QuantConfig.from_dict(data)
    except (ConfigError, TypeError) as exc:
        key = next((k for k in data if k in str(exc)), None)
        raise ConfigError(f"{where(key) if key else path}: {exc}") from None
    return data
