"""Hugging Face model folders in: `config.json` plus `model.safetensors`, sharded
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, or `pytorch_model.bin`
(sharded with `pytorch_model.bin.index.json`), loaded through transformers (the `hf` extra).

Offline only: `HF_HUB_OFFLINE=1` is set before transformers is imported and every load passes
`local_files_only=True`, so nothing ever reaches for a hub. No remote code runs: the architecture
must be one that the installed transformers has. transformers reads `.bin` weights with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .budget import check_budget, format_size
from .errors import ConfigError, InputError, one_line
from .files import CONFIG_NAME, check_file, file_sha256, read_header
from .pickles import scan_pickle

__all__ = [
    "is_hf_folder", "quant_method", "weight_files", "HFModel", "load_hf_folder", "hf_probe_inputs", "HF_KIND",
    "load_tokenizer", "encode", "is_causal_lm", "position_limit", "HFSkeleton", "hf_skeleton", "parameters_on_meta",
]

HF_KIND = "Hugging Face folder"
INSTALL_HINT = "pip install -e .[hf]"


def is_hf_folder(path: str | Path) -> bool:
    """True if `path` is a folder holding a `config.json` (a Hugging Face model folder)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


MAX_CONFIG = 16 * 2**20  # bytes: a model's config.json is a few kB (a tokenizer's vocabulary is not in it)


def check_config_size(folder: Path) -> None:
    """Refuse, unread, a config.json larger than `MAX_CONFIG` (qlin and transformers read it whole)."""
    try:
        size = (folder / CONFIG_NAME).stat().st_size
    except OSError:
        return
    if size > MAX_CONFIG:
        raise InputError(f"{folder / CONFIG_NAME} is {format_size(size)}; a model's config.json is a few kB, "
                         f"qlin reads at most {format_size(MAX_CONFIG)}")


def quant_method(folder: str | Path) -> str | None:
    """The `quant_method` of a model folder's `quantization_config` (e.g. "compressed-tensors" for
    the folders `--format compressed-tensors` writes), or None: a float model, or no model folder.
    InputError for a config.json too large to be one (`check_config_size`)."""
    check_config_size(Path(folder))
    try:
        config = json.loads((Path(folder) / CONFIG_NAME).read_text())
    except (OSError, ValueError, RecursionError):  # loading it says what is wrong
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return str(method) if method else None


@dataclass(frozen=True)
class WeightFiles:
    """The weight files transformers will read from a folder, in its order of preference."""

    kind: str  # "model.safetensors" | "sharded safetensors" | "pytorch_model.bin" | "sharded pytorch_model.bin"
    files: tuple[Path, ...]  # the weight files, then the index file if sharded


def _shards(folder: Path, index_name: str) -> WeightFiles:
    index = folder / index_name
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise InputError(f"{index} is not a valid shard index ({one_line(exc, 120)})") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not (folder / name).is_file():
            raise InputError(f"{index} names the shard {name!r}, which is not a file in {folder}")
    kind = "sharded safetensors" if index_name.endswith(".safetensors.index.json") else "sharded pytorch_model.bin"
    return WeightFiles(kind, tuple(folder / n for n in names) + (index,))


def weight_files(folder: str | Path) -> WeightFiles:
    """The weight files of a Hugging Face folder, preferring safetensors as transformers does.
    Raises InputError when there are none."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return WeightFiles("model.safetensors", (folder / "model.safetensors",))
    if (folder / "model.safetensors.index.json").is_file():
        return _shards(folder, "model.safetensors.index.json")
    if (folder / "pytorch_model.bin").is_file():
        return WeightFiles("pytorch_model.bin", (folder / "pytorch_model.bin",))
    if (folder / "pytorch_model.bin.index.json").is_file():
        return _shards(folder, "pytorch_model.bin.index.json")
    raise InputError(
        f"{folder} has a config.json but no weights: expected model.safetensors, "
        "model.safetensors.index.json (+ shards) or pytorch_model.bin"
    )


def folder_digest(folder: Path, files: tuple[Path, ...]) -> str:
    """sha256 over config.json and the weight files: each file's name and sha256, in name order."""
    h = hashlib.sha256()
    for f in sorted({folder / CONFIG_NAME, *files}, key=lambda p: p.name):
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _import_transformers() -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers (and huggingface_hub) read it
    try:
        import transformers
    except ImportError:
        raise InputError(f"loading a Hugging Face model folder needs transformers: {INSTALL_HINT}") from None
    return transformers


class _Quiet:
    """transformers' warnings and progress bars off while loading (qlin reports on its own)."""

    def __init__(self, transformers: Any) -> None:
        self.logging = transformers.utils.logging

    def __enter__(self) -> None:
        self.verbosity = self.logging.get_verbosity()
        self.bars = self.logging.is_progress_bar_enabled()
        self.logging.set_verbosity_error()
        self.logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        self.logging.set_verbosity(self.verbosity)
        if self.bars:
            self.logging.enable_progress_bar()


def _config_and_class(transformers, folder: Path):
    """A folder's config, read by transformers offline, and the model class that loads it."""
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{folder / CONFIG_NAME} cannot be read by transformers ({one_line(exc)})") from None
    return config, _model_class(transformers, config, folder)


def _model_class(transformers: Any, config: Any, folder: Path) -> Any:
    """The class named by config.architectures[0], or AutoModel when the config names none."""
    archs = getattr(config, "architectures", None) or []
    if not archs:
        return transformers.AutoModel
    cls = getattr(transformers, archs[0], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InputError(
            f"{folder / CONFIG_NAME} names the architecture {archs[0]!r}, which transformers "
            f"{transformers.__version__} does not have (qlin runs no remote code)"
        )
    return cls


@dataclass(frozen=True)
class HFModel:
    """The float model of a Hugging Face folder (sources.load_source wraps it in a Source)."""

    model: nn.Module
    kind: str  # "Hugging Face folder (<class>, <weight files' kind>)"
    sha256: str  # folder_digest
    size_bytes: int  # of the weight files


@dataclass(frozen=True)
class _Held:
    """What a folder's weight files hold, from their headers and pickles (nothing loaded)."""

    values: int  # tensor elements (for a .bin: its storage bytes, more than its elements)
    shapes: dict[str, tuple[int, ...]]  # safetensors tensors by name (a .bin's names are not read)


def _check_weights(weights: WeightFiles) -> _Held:
    """What transformers will read, checked before it reads it: every safetensors shard's header
    and every .bin shard's pickle (transformers' torch.load calls what the pickle asks of its
    allowlist, e.g. bytearray(10**10)), and their total against `max_memory`."""
    total = values = 0
    shapes: dict[str, tuple[int, ...]] = {}
    for f in weights.files:
        check_file(f, "weights")
        if f.suffix == ".safetensors":
            try:
                header = read_header(f)
            except (OSError, ValueError) as exc:
                raise InputError(f"weights {f} is not a valid safetensors file ({one_line(exc)})") from None
            total += header.nbytes
            values += sum(math.prod(e.shape) for e in header.tensors.values())
            shapes.update((k, e.shape) for k, e in header.tensors.items())
        elif f.suffix == ".bin":
            storage = scan_pickle(f, lambda detail: InputError(f"weights {f} cannot be loaded safely ({detail})"))
            total, values = total + storage, values + storage
    check_budget(total, f"{weights.files[0].parent}")
    return _Held(values, shapes)


def _load_dtype(folder: Path, weights: WeightFiles, config: Any) -> torch.dtype:
    """The dtype transformers' `from_pretrained(dtype="auto")` loads `folder` in: the config's,
    else the checkpoint's (a copy of `config` is given the answer, as transformers does)."""
    try:
        from transformers.modeling_utils import _get_dtype

        files = [str(f) for f in weights.files if f.suffix == ".safetensors"]
        return _get_dtype("auto", files, copy.deepcopy(config), None, None, True)[1]
    except Exception as exc:
        raise InputError(f"{folder}: cannot tell the dtype transformers would load it in ({one_line(exc)})") from None


def _meta_model(cls: Any, config: Any, dtype: torch.dtype) -> nn.Module | None:
    """The model `config` declares, every parameter and buffer on the meta device (no memory,
    whatever sizes the config claims), or None where the class cannot be built so."""
    try:
        with torch.device("meta"):
            return cls._from_config(copy.deepcopy(config), dtype=dtype)
    except Exception:
        return None


def _check_declared(folder: Path, cls: Any, config: Any, weights: WeightFiles, held: _Held) -> None:
    """Before transformers materialises a model: what its config.json declares, built on the
    meta device, against `max_memory` (its parameters and buffers at the load dtype) and against
    the weight files (every parameter must come from them, so they must hold at least as many
    values; a tensor of the model's name must have its shape). A 1 kB config.json may declare a
    40 GB model beside 16 kB of weights."""
    try:
        dtype = _load_dtype(folder, weights, config)
    except InputError:  # .bin weights: transformers reads the dtype from the loaded tensors; the config's or float32
        dtype = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else torch.float32
    model = _meta_model(cls, config, dtype)
    if model is None:  # transformers reports what it cannot build when it loads
        return
    params = dict(model.named_parameters())  # tied parameters once
    need = sum(p.numel() for p in params.values())
    what = f"{folder / CONFIG_NAME}: the {cls.__name__} it declares"
    check_budget(sum(t.numel() * t.element_size() for t in (*params.values(), *model.buffers())), what)
    state = model.state_dict()
    mis = [(k, held.shapes[k], tuple(t.shape)) for k, t in state.items() if k in held.shapes and held.shapes[k] != tuple(t.shape)]
    if mis:
        key, has, want = mis[0]
        raise InputError(f"{folder}: the weights do not fit {cls.__name__}: tensors {len(mis)} mis-shaped (e.g. {key!r} "
                         f"is {has} in the weights, {want} in config.json)")
    if need > held.values:
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        names = set(held.shapes) | {k.removeprefix(prefix) for k in held.shapes} | {prefix + k for k in held.shapes}
        missing = [k for k in params if k not in names] if held.shapes else []
        example = f"tensors {len(missing)} missing (e.g. {missing[0]!r}): " if missing else ""
        raise InputError(
            f"{folder}: the weights do not fit {cls.__name__}: {example}its config.json declares {need:,} parameters, "
            f"the weight files hold {held.values:,} values; is config.json the model's?"
        )


def load_hf_folder(folder: str | Path, *, model: str | None = None) -> HFModel:
    """Load the float model of a Hugging Face folder through transformers, offline, in eval mode.

    Raises InputError for a folder without weights, an unknown architecture, weights that do not
    fit the config (missing or mis-shaped tensors), or without transformers installed.
    """
    folder = Path(folder)
    if model is not None:
        raise ConfigError(
            f"`model` applies to state dicts; {folder} is a Hugging Face folder whose config.json names the architecture"
        )
    method = quant_method(folder)
    if method is not None:
        raise InputError(f"{folder} is already quantized ({method}); pass the float model folder")
    weights = weight_files(folder)
    held = _check_weights(weights)
    transformers = _import_transformers()
    with _Quiet(transformers):
        config, cls = _config_and_class(transformers, folder)
        _check_declared(folder, cls, config, weights, held)
        try:
            built, info = cls.from_pretrained(folder, config=config, local_files_only=True, output_loading_info=True)
        except Exception as exc:
            if "ignore_mismatched_sizes" in str(exc):  # "...look at the above report!", which _Quiet hides
                raise InputError(_mismatch(folder, weights)) from None
            raise InputError(f"{folder}: transformers cannot load the model ({one_line(exc)})") from None
    problems = []
    for key, what in (("missing_keys", "missing"), ("mismatched_keys", "mis-shaped")):
        found = sorted(str(k) for k in info.get(key) or ())
        if found:
            problems.append(f"{len(found)} {what} (e.g. {found[0]!r})")
    if problems:
        raise InputError(
            f"{folder}: the weights do not fit {type(built).__name__}: tensors {', '.join(problems)}"
        )
    built.eval()
    size = sum(f.stat().st_size for f in weights.files)
    kind = f"{HF_KIND} ({type(built).__name__}, {weights.kind})"
    return HFModel(built, kind, folder_digest(folder, weights.files), size)


def _mismatch(folder: Path, weights: WeightFiles) -> str:
    """Why transformers found tensors of the checkpoint whose shapes differ from the model its
    config.json describes: the first such tensor, its shape in the weights and by the config
    (from a skeleton on the meta device and the safetensors headers), and the fix."""
    fix = "fix config.json's sizes (e.g. hidden_size, vocab_size, max_position_embeddings) or give the weights it was saved with"
    try:
        transformers = _import_transformers()
        with _Quiet(transformers):
            config, cls = _config_and_class(transformers, folder)
            with torch.device("meta"):  # shapes only: the config may declare hundreds of GB
                skeleton = cls._from_config(config)
        expected = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
        for f in weights.files:
            if f.suffix != ".safetensors":
                continue
            for key, entry in read_header(f).tensors.items():
                want = expected.get(key)
                if want is not None and want != entry.shape:
                    return (f"{folder}: tensor {key!r} is {entry.shape} in {f.name} but {CONFIG_NAME} makes it {want}: {fix}")
    except Exception:  # building the model can raise anything: the plain line below
        pass
    return f"{folder}: some tensors of the weights have other shapes than {CONFIG_NAME} describes: {fix}"


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules without allocating their parameters: each parameter registered meanwhile
    moves to the meta device (shape and dtype, no memory), as accelerate's init_empty_weights
    does. Buffers stay real (small, and some are computed at init rather than loaded)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@dataclass(frozen=True)
class HFSkeleton:
    """The model of a Hugging Face folder built without its weights (parameters on the meta
    device), as `load_hf_folder` would build it: same class, same dtype, ties made."""

    model: nn.Module
    kind: str
    sha256: str
    size_bytes: int
    files: tuple[Path, ...]


def hf_skeleton(folder: str | Path, *, model: str | None = None) -> HFSkeleton:
    """The model of `folder` with its parameters on the meta device (nothing read but the config
    and the weight files' headers), in the dtype transformers' `from_pretrained` would choose
    (`dtype="auto"`: the config's, else the checkpoint's). Refuses, as one-line InputErrors, what
    a skeleton would not reproduce: modules that transformers keeps in float32 under a narrower
    load, and (later, when the tensors are matched) checkpoints whose names transformers converts."""
    folder = Path(folder)
    if model is not None:
        raise ConfigError(
            f"`model` applies to state dicts; {folder} is a Hugging Face folder whose config.json names the architecture"
        )
    weights = weight_files(folder)
    transformers = _import_transformers()
    with _Quiet(transformers):
        config, cls = _config_and_class(transformers, folder)
        dtype = _load_dtype(folder, weights, config)
        if dtype != torch.float32 and (getattr(cls, "_keep_in_fp32_modules", None) or getattr(cls, "_keep_in_fp32_modules_strict", None)):
            raise InputError(
                f"{folder}: {cls.__name__} keeps some modules in float32 under a {dtype} load, which `stream` does not "
                "reproduce; quantize without `stream`"
            )
        try:
            with parameters_on_meta():
                built = cls._from_config(config, dtype=dtype)
        except Exception as exc:
            raise InputError(f"{folder}: transformers cannot build the model ({one_line(exc)})") from None
    built.eval()
    size = sum(f.stat().st_size for f in weights.files)
    kind = f"{HF_KIND} ({type(built).__name__}, {weights.kind})"
    return HFSkeleton(built, kind, folder_digest(folder, weights.files), size, weights.files)


def hf_probe_inputs(model: nn.Module, samples: int = 32, tokens: int = 16, seed: int = 0) -> dict[str, torch.Tensor] | None:
    """A seeded random batch of token ids `(samples, tokens)` and an all-ones attention mask for a
    transformers text model, or None when the model does not take `input_ids`."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if getattr(model, "main_input_name", None) != "input_ids" or not isinstance(vocab, int) or vocab < 1:
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        tokens = min(tokens, limit)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (samples, tokens), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# The files a tokenizer can be saved as (tokenizer.save_pretrained writes the first two).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in a model folder, through transformers' AutoTokenizer, offline and
    without remote code. Raises InputError naming the files looked for when the folder has none."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's tokenizer "
            "into the folder (tokenizer.save_pretrained)"
        )
    transformers = _import_transformers()
    with _Quiet(transformers):
        try:
            return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise InputError(f"{folder}: transformers cannot load the tokenizer ({one_line(exc)})") from None


def encode(tokenizer: Any, text: str, *, special: bool = True) -> list[int]:
    """The token ids of `text` (with the special tokens the tokenizer adds, unless not
    `special`), without transformers' warning that the sequence is longer than the model takes
    (text.py cuts it)."""
    with _Quiet(_import_transformers()):
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def is_causal_lm(model: nn.Module) -> bool:
    """True for a transformers model that predicts the next token (GPT2LMHeadModel,
    LlamaForCausalLM, ...): a class that AutoModelForCausalLM maps to."""
    name = type(model).__name__
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names
    except ImportError:  # pragma: no cover - an older or newer layout of transformers
        return name.endswith(("ForCausalLM", "LMHeadModel"))
    return name in set(names.values())


def position_limit(model: nn.Module) -> int | None:
    """The most tokens a transformers model takes in one sequence (`n_positions` or
    `max_position_embeddings` of its config), or None when its config gives none."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
