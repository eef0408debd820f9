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
# What a per-layer recipe rule may set ([[layers]] tables; "match" is a regex on the module path)
RULE_KEYS = ("match", "skip", "mode", "granularity", "symmetric", "act_granularity", "kernel",
             "observer", "weight_observer", "percentile", "smooth")
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
        input with its own range (asymmetric: the row's min and max span the 256 levels), so a
        sample's result never depends on the rest of the batch; `tensor` uses one range per
        call (batch-dependent; torch.ao's default). Left as None it resolves to `token`.
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
    layers: per-layer rules, each a dict with `match` (a regex, re.search on the module path)
        and any of RULE_KEYS; the FIRST rule that matches a layer applies to it (`skip: true`
        keeps it float, other keys override this config for that layer).
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
    layers: tuple[dict, ...] = field(default_factory=tuple)

    @property
    def needs_calibration(self) -> bool:
        """True if any layer (by default or through a rule) is static or smoothed."""
        own = self.mode == "static" or self.smooth is not None
        return own or any(
            self.with_changes(**_overrides(r), layers=()).needs_calibration for r in self.layers if not r.get("skip")
        )

    def with_changes(self, **changes: Any) -> "QuantConfig":
        """A copy with `changes` applied; None values are ignored. A new mode or kernel re-derives
        act_granularity unless `changes` sets it too."""
        changes = {k: v for k, v in changes.items() if v is not None}
        data = self.to_dict()
        if ("mode" in changes or "kernel" in changes) and "act_granularity" not in changes:
            data["act_granularity"] = None
        data.update(changes)
        return QuantConfig.from_dict(data)

    def rule_for(self, name: str) -> dict | None:
        """The first per-layer rule whose `match` finds module path `name`, or None."""
        return next((r for r in self.layers if re.search(r["match"], name)), None)

    def for_layer(self, name: str) -> "QuantConfig":
        """The config that applies to layer `name` (this one, or changed by its rule)."""
        rule = self.rule_for(name)
        if rule is None:
            return self
        return self.with_changes(**_overrides(rule), layers=())

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
        object.__setattr__(self, "layers", tuple(_check_rule(r, i) for i, r in enumerate(self.layers)))
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
        self._resolve_scheme()
        for i, rule in enumerate(self.layers):
            try:
                self.with_changes(**_overrides(rule), layers=())
            except ConfigError as exc:
                raise ConfigError(f"layers[{i}] (match {rule['match']!r}): {exc}") from None

    def _resolve_scheme(self) -> None:
        """Check mode/kernel/act_granularity together and fill in act_granularity."""
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
            object.__setattr__(self, "act_granularity", "token")
        _choice("act_granularity", self.act_granularity, ACT_GRANULARITIES)

    def skips(self, name: str) -> str | None:
        """The first skip pattern that matches module path `name`, or None."""
        return next((p for p in self.skip if re.search(p, name)), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; `QuantConfig.from_dict(c.to_dict()) == c`."""
        d = dataclasses.asdict(self)
        d["granularity"] = str(self.granularity)
        d["skip"] = list(self.skip)
        d["layers"] = [dict(r) for r in self.layers]
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


def _overrides(rule: dict) -> dict:
    return {k: v for k, v in rule.items() if k not in ("match", "skip")}


def _check_rule(rule: Any, index: int) -> dict:
    """Validate one per-layer rule (keys, regex, types); the combination is checked by
    QuantConfig when a layer's config is derived."""
    where = f"layers[{index}]"
    if not isinstance(rule, dict):
        raise ConfigError(f"{where} must be a table with 'match' and overrides, not {type(rule).__name__}")
    unknown = sorted(set(rule) - set(RULE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a rule may set {', '.join(RULE_KEYS)}")
    if not isinstance(rule.get("match"), str):
        raise ConfigError(f"{where} needs match = \"REGEX\" (the module paths it applies to)")
    try:
        re.compile(rule["match"])
    except re.error as exc:
        raise ConfigError(f"{where}: match {rule['match']!r} is not a valid regex: {exc}") from None
    if not isinstance(rule.get("skip", False), bool):
        raise ConfigError(f"{where}: skip must be true or false")
    return dict(sorted(rule.items()))


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

    lines = text.splitlines()

    def where(key: str | None, rule: int | None = None) -> str:
        """path:line of `key` (at top level, or inside the rule-th [[layers]] table)."""
        start, stop = 0, len(lines)
        tables = [i for i, ln in enumerate(lines) if ln.strip().startswith("[")]
        if rule is None:
            stop = tables[0] if tables else stop
        else:
            heads = [i for i, ln in enumerate(lines) if ln.strip() == "[[layers]]"]
            if rule < len(heads):
                start = heads[rule]
                stop = next((t for t in tables if t > start), len(lines))
                if key is None:
                    return f"{path}:{start + 1}"
        for i in range(start, stop):
            if key and re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
                return f"{path}:{i + 1}"
        return str(path)

    known = {f.name for f in dataclasses.fields(QuantConfig)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where(key)}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
    try:
        QuantConfig.from_dict(data)
    except (ConfigError, TypeError) as exc:
        msg = str(exc)
        m = re.match(r"layers\[(\d+)\]", msg)
        if m:
            rule = data["layers"][int(m.group(1))] if isinstance(data.get("layers"), list) else {}
            detail = msg.split(": ", 1)[-1]
            key = next((k for k in (rule if isinstance(rule, dict) else {}) if repr(k) in detail or detail.startswith(k)), None)
            raise ConfigError(f"{where(key, int(m.group(1)))}: {msg}") from None
        key = next((k for k in data if k in msg), None)
        raise ConfigError(f"{where(key) if key else path}: {msg}") from None
    return data
