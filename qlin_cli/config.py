"""Configuration: `QuantConfig` (a default `LayerScheme`, skip patterns and per-layer rules) and
TOML recipes, whose keys are the scheme's plus `skip` and `layers`.

A QuantConfig says *what* to compute. It never says *where*: the device is chosen when a model
is packed, so a saved file is portable.

Skip patterns and rules' `match` run on RE2 (google-re2), whose time is linear in the module
path for every pattern it accepts: Python's `re` backtracks, and `(.*.*)*X` against an ordinary
module path never ends. RE2 refuses what it cannot run in linear time (backreferences,
lookaround) with a clear error; everything else reads as in `re`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re2

from .errors import ConfigError
from .scheme import (
    ACT_GRANULARITIES, MODES, OBSERVER_NAMES, PER_CHANNEL, PER_TENSOR, Granularity, LayerScheme,
    calibration_need,
)

__all__ = [
    "Granularity",
    "PER_TENSOR",
    "PER_CHANNEL",
    "MODES",
    "ACT_GRANULARITIES",
    "OBSERVER_NAMES",
    "Skip",
    "Rule",
    "QuantConfig",
    "RECIPES",
    "recipe_names",
    "find_recipe",
    "load_recipe",
]

SCHEME_KEYS = tuple(f.name for f in dataclasses.fields(LayerScheme))
RECIPE_KEYS = (*SCHEME_KEYS, "skip", "layers", "embeddings")  # a recipe's top-level keys
RULE_KEYS = ("match", "skip", *SCHEME_KEYS)  # what a [[layers]] rule may set
# The shipped recipes: package data, installed with qlin (a checkout's top-level configs/ links here).
RECIPES = Path(__file__).with_name("configs")


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error is raised to the caller, not logged on stderr


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str):
    return re2.compile(pattern, _RE2_OPTIONS)


def check_pattern(pattern: Any, what: str) -> str:
    """`pattern` if RE2 compiles it, else a ConfigError that names `what` and says why."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{what} must be a string (a regex), not {type(pattern).__name__}")
    try:
        _compiled(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ConfigError(
            f"{what} {pattern!r} is not a valid regex: {reason} (patterns run on RE2, in linear time: no "
            "backreferences or lookaround)"
        ) from None
    return pattern


def search(pattern: str, name: str) -> bool:
    """True if `pattern` (RE2) is found anywhere in module path `name`, as `re.search`."""
    return _compiled(pattern).search(name) is not None


@dataclass(frozen=True)
class Skip:
    """A layer the config keeps in float, and why."""

    reason: str


@dataclass(frozen=True)
class Rule:
    """A per-layer recipe rule (a `[[layers]]` table): the first rule whose `match` finds a
    layer's module path (re.search) applies to it; `skip` keeps the layer in float, `changes`
    (scheme keys) override the config's scheme for it."""

    match: str
    skip: bool | None = None  # None: the rule does not say (kept apart so the recipe round-trips)
    changes: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, rule: Any, index: int) -> "Rule":
        """Validate one rule's keys, regex and types; the scheme it makes is checked by
        QuantConfig."""
        where = f"layers[{index}]"
        if isinstance(rule, Rule):
            return rule
        if not isinstance(rule, dict):
            raise ConfigError(f"{where} must be a table with 'match' and overrides, not {type(rule).__name__}")
        unknown = sorted(set(rule) - set(RULE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a rule may set {', '.join(RULE_KEYS)}")
        if not isinstance(rule.get("match"), str):
            raise ConfigError(f"{where} needs match = \"REGEX\" (the module paths it applies to)")
        check_pattern(rule["match"], f"{where}: match")
        if not isinstance(rule.get("skip", False), bool):
            raise ConfigError(f"{where}: skip must be true or false")
        changes = tuple(sorted((k, v) for k, v in rule.items() if k not in ("match", "skip")))
        return cls(rule["match"], rule.get("skip"), changes)

    def to_dict(self) -> dict[str, Any]:
        d = {"match": self.match, **dict(self.changes)}
        if self.skip is not None:
            d["skip"] = self.skip
        return dict(sorted(d.items()))


@dataclass(frozen=True, init=False)
class QuantConfig:
    """What qlin does to each `nn.Linear`: a default `LayerScheme`, skip patterns, and rules.

    Built from a scheme or from its keys: `QuantConfig(mode="static", granularity="tensor")`;
    the scheme's keys read through (`config.mode`), and `LayerScheme`'s docstring says what each
    means.
    skip: regular expressions; a layer whose module path matches any (re.search) stays float.
    layers: per-layer rules (`Rule`, or dicts with `match` and any of RULE_KEYS); the FIRST rule
        that matches a layer applies to it.
    embeddings: also quantize the `nn.Embedding` tables, int8 per row (weight-only; a lookup
        dequantizes the rows it gathers); skip patterns apply to them too.
    """

    scheme: LayerScheme
    skip: tuple[str, ...]
    layers: tuple[Rule, ...]
    embeddings: bool

    def __init__(self, scheme: LayerScheme | None = None, *, skip: Any = (), layers: Any = (),
                 embeddings: bool = False, **keys: Any) -> None:
        if scheme is None:
            scheme = LayerScheme(**keys)
        elif keys:
            raise TypeError("QuantConfig takes a scheme or its keys, not both")
        if isinstance(skip, str):
            skip = (skip,)
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "skip", tuple(skip))
        object.__setattr__(self, "layers", tuple(Rule.from_dict(r, i) for i, r in enumerate(layers)))
        if not isinstance(embeddings, bool):
            raise ConfigError(f"embeddings must be true or false, not {embeddings!r}")
        object.__setattr__(self, "embeddings", embeddings)
        for pattern in self.skip:
            check_pattern(pattern, "skip pattern")
        for i, rule in enumerate(self.layers):
            try:
                _user_scheme(self.scheme.with_changes(**dict(rule.changes)))
            except ConfigError as exc:
                raise ConfigError(f"layers[{i}] (match {rule.match!r}): {exc}") from None
        _user_scheme(self.scheme)

    def __getattr__(self, name: str) -> Any:
        if name in SCHEME_KEYS:  # the default scheme's keys read through
            return getattr(self.__dict__["scheme"], name)
        raise AttributeError(f"'QuantConfig' object has no attribute {name!r}")

    def schemes(self) -> list[LayerScheme]:
        """Every scheme this config can give a layer: the default, then each rule's."""
        return [self.scheme, *(self.scheme.with_changes(**dict(r.changes)) for r in self.layers if not r.skip)]

    def calibration_need(self) -> str | None:
        """What any layer of this config (by default or through a rule) may need calibration data
        for, in words, or None; a model's plan knows for sure (`Plan.calibration_need`)."""
        return calibration_need(self.schemes())

    def with_changes(self, **changes: Any) -> "QuantConfig":
        """A copy with `changes` (scheme keys, `skip`, `layers`) applied; None values are ignored.
        Another mode re-derives act_granularity unless `changes` sets it too."""
        changes = {k: v for k, v in changes.items() if v is not None}
        own = {k: changes.pop(k) for k in ("skip", "layers", "embeddings") if k in changes}
        return QuantConfig(self.scheme.with_changes(**changes), skip=own.get("skip", self.skip),
                           layers=own.get("layers", self.layers), embeddings=own.get("embeddings", self.embeddings))

    def rule_for(self, name: str) -> Rule | None:
        """The first per-layer rule whose `match` finds module path `name`, or None."""
        return next((r for r in self.layers if search(r.match, name)), None)

    def skips(self, name: str) -> str | None:
        """The first skip pattern that matches module path `name`, or None."""
        return next((p for p in self.skip if search(p, name)), None)

    def unmatched(self, names: list[str]) -> list[str]:
        """The skip patterns and rules that find none of the module paths `names`, each in words
        ("`skip` 'x'", "recipe rule layers[0] match 'y'"): likely a typo."""
        out = [f"`skip` {p!r}" for p in self.skip if not any(search(p, n) for n in names)]
        return out + [f"recipe rule layers[{i}] match {r.match!r}" for i, r in enumerate(self.layers)
                      if not any(search(r.match, n) for n in names)]

    def for_layer(self, name: str) -> LayerScheme | Skip:
        """The scheme of layer `name` (the default, or changed by its rule), or Skip with the
        reason when a skip pattern or a rule keeps it in float."""
        pattern = self.skips(name)
        if pattern is not None:
            return Skip(f"matches --skip {pattern!r}")
        rule = self.rule_for(name)
        if rule is None:
            return self.scheme
        if rule.skip:
            return Skip(f"recipe rule match={rule.match!r} skips it")
        return self.scheme.with_changes(**dict(rule.changes))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of recipe keys; `QuantConfig.from_dict(c.to_dict()) == c`."""
        out = {}
        for key, value in self.scheme.to_recipe().items():  # the recipe's order: skip after kernel
            out[key] = value
            if key == "kernel":
                out["skip"] = list(self.skip)
        return {**out, "layers": [r.to_dict() for r in self.layers], "embeddings": self.embeddings}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "config") -> "QuantConfig":
        unknown = sorted(set(data) - set(RECIPE_KEYS))
        if unknown:
            raise ConfigError(
                f"{origin}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(RECIPE_KEYS))}"
            )
        return cls(**data)


def _user_scheme(scheme: LayerScheme) -> LayerScheme:
    """`scheme` if a recipe may ask for it: AWQ searches its own factors, so `smooth` (which a
    plan gives an AWQ layer whose factors stay per layer) is not the user's to set with it."""
    if scheme.awq and scheme.smooth is not None:
        raise ConfigError(f"rounding = {scheme.rounding!r} searches its own per-channel factors: drop `smooth`")
    return scheme


def recipe_names() -> list[str]:
    """The names of the shipped recipes (`w8a8-static` for configs/w8a8-static.toml), sorted."""
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def find_recipe(spec: str | Path) -> Path:
    """The recipe file `spec` names: a TOML file, or else a shipped recipe by name (`w8a8-static`
    or `w8a8-static.toml`), whatever the current folder."""
    path = Path(spec)
    if path.exists() or path.parent != Path("."):  # a path: used as it is
        return path
    shipped = RECIPES / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"recipe {spec} does not exist: it is neither a file nor a shipped recipe ({', '.join(recipe_names())})"
    )


MAX_RECIPE_BYTES = 1_000_000  # the largest shipped recipe is under 2 kB


def _cut(message: str, limit: int = 300) -> str:
    """`message` for one line: a value from the file (a 1 MB string) is cut in the middle."""
    return message if len(message) <= limit else f"{message[: limit - 100]} ... {message[-90:]}"


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a TOML recipe (top-level keys are QuantConfig fields): a file, or a shipped recipe by
    name (`find_recipe`). Returns its validated dict.

    Errors name the file, and the key and line where the problem is.
    """
    path = find_recipe(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO would block, /dev/zero never end
        raise ConfigError(f"recipe {path} is not a regular file; qlin reads only regular files")
    if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {path} takes {path.stat().st_size:,} bytes; a recipe is a few keys and "
                          f"[[layers]] rules, at most {MAX_RECIPE_BYTES:,} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {path} cannot be read: {exc.__class__.__name__}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {_cut(str(exc))}") from None
    except RecursionError:  # `a = [[[[...` 50,000 deep: tomllib recurses once per level
        raise ConfigError(f"recipe {path} nests arrays or tables deeper than qlin reads; a recipe is flat keys "
                          "and [[layers]] rules") from None

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

    for key in data:
        if key not in RECIPE_KEYS:
            raise ConfigError(f"{where(key)}: unknown key {key!r}; known keys: {', '.join(sorted(RECIPE_KEYS))}")
    try:
        QuantConfig.from_dict(data)
    except (ConfigError, TypeError, RecursionError) as exc:
        msg = _cut(str(exc) if not isinstance(exc, RecursionError) else "values nest deeper than qlin reads")
        m = re.match(r"layers\[(\d+)\]", msg)
        if m:
            rule = data["layers"][int(m.group(1))] if isinstance(data.get("layers"), list) else {}
            detail = msg.split(": ", 1)[-1]
            key = next((k for k in (rule if isinstance(rule, dict) else {}) if repr(k) in detail or detail.startswith(k)), None)
            raise ConfigError(f"{where(key, int(m.group(1)))}: {msg}") from None
        key = next((k for k in data if k in msg), None)
        raise ConfigError(f"{where(key) if key else path}: {msg}") from None
    return data
