"""Float sources in: checkpoints, model factories, and input/label tensors.

Nothing here unpickles code unless the caller says `trust_pickle=True`: state dicts load with
`torch.load(weights_only=True)`, and a whole pickled module loads the same way with an allowlist
of the `torch.nn` module classes it names.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .budget import check_budget, format_size
from .errors import InputError, one_line
from .files import CONFIG_NAME, FORMAT, QLIN_PLAN, SafetensorsHeader, check_file, file_sha256, read_header, read_into, read_tensor
from .hf import (
    HF_KIND, WeightFiles, hf_skeleton, is_hf_folder, load_hf_folder, parameters_on_meta, quant_method, weight_files,
)
from .pickles import scan_pickle

__all__ = [
    "Source", "read_checkpoint", "load_source", "load_factory", "load_tensors", "LazySource", "load_source_lazily",
    "SourceKind", "what_is", "QLIN_FILE", "CT_WEIGHTS", "QUANTIZED_FOLDER", "SAFETENSORS", "PICKLE",
]


@dataclass
class Source:
    """A float model and where it came from."""

    model: nn.Module
    path: Path
    kind: str  # "pickled module" | "state dict" | "safetensors state dict"
    sha256: str
    size_bytes: int


# ----------------------------------------------------------------------------- what a path is

QLIN_FILE = "qlin file"
CT_WEIGHTS = "compressed-tensors weights"  # the weights file of a compressed-tensors folder qlin wrote
QUANTIZED_FOLDER = "quantized model folder"  # its config.json has a quantization_config
SAFETENSORS = "safetensors state dict"
PICKLE = "pickle"  # a torch.save file: a state dict or a whole pickled module, which only loading tells


@dataclass(frozen=True)
class SourceKind:
    """What a model path is, decided once (`what_is`) and handed to whatever loads it.

    kind: HF_KIND (a folder with config.json), QUANTIZED_FOLDER (one whose config.json has a
    quantization_config: a compressed-tensors folder, or another method's), QLIN_FILE, CT_WEIGHTS,
    SAFETENSORS or PICKLE (by its name: any file not named .safetensors). A problem found inside
    the file or folder is kept, not raised: the command says it when it comes to load it.
    """

    path: Path
    kind: str
    header: SafetensorsHeader | None = None  # a .safetensors file's header, when it reads
    header_problem: str | None = None  # else why it does not ("ValueError: ...")
    quant_method: str | None = None  # a model folder's quantization_config method
    weights: WeightFiles | None = None  # a model folder's weight files
    weights_problem: str | None = None  # else why it has none

    @property
    def folder(self) -> bool:
        return self.kind in (HF_KIND, QUANTIZED_FOLDER)

    @property
    def quantized(self) -> bool:
        """True for what `read_qfile` reads (a qlin file, a compressed-tensors folder or its weights
        file), and for any other quantized model folder (which it refuses with the reason)."""
        return self.kind in (QLIN_FILE, CT_WEIGHTS, QUANTIZED_FOLDER)

    def weight_files(self) -> WeightFiles:
        """A model folder's weight files; InputError when it has none."""
        if self.weights is None:
            raise InputError(self.weights_problem)
        return self.weights

    def safetensors_header(self, what: str = "source") -> SafetensorsHeader:
        """A .safetensors file's header; InputError (naming the file `what`) when it does not read."""
        if self.header is None:
            raise _not_safetensors(what, self.path, self.header_problem)
        return self.header

    def stream_problem(self) -> str | None:
        """Why this source cannot be streamed (pickles load whole), or None."""
        if self.folder:
            kind = self.weight_files().kind
            return None if "safetensors" in kind else f"{self.path} holds {kind} weights, a pickle that loads whole"
        return None if self.path.suffix == ".safetensors" else f"{self.path} is a pickle, which loads whole"


def what_is(path: str | Path, what: str = "source") -> SourceKind:
    """What the model path `path` is: a model folder (Hugging Face, or quantized), or a file:
    a qlin file, a compressed-tensors weights file, a safetensors state dict, or a pickle.
    InputError (naming the path `what`) for a folder that is not a model folder and for a path
    that `check_file` refuses; a header that does not read or a folder without weights is kept
    in the result for the loader to report."""
    path = Path(path)
    if is_hf_folder(path):
        method = quant_method(path)
        try:
            weights, problem = weight_files(path), None
        except InputError as exc:
            weights, problem = None, str(exc)
        return SourceKind(path, QUANTIZED_FOLDER if method else HF_KIND, quant_method=method, weights=weights,
                          weights_problem=problem)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder but not a model folder (it has no {CONFIG_NAME})")
    return _file_kind(check_file(path, what))


def _file_kind(path: Path) -> SourceKind:
    """A file's kind: a pickle by its name, a .safetensors file by its header's metadata."""
    if path.suffix != ".safetensors":
        return SourceKind(path, PICKLE)
    try:
        header = read_header(path)
    except (OSError, ValueError) as exc:
        return SourceKind(path, SAFETENSORS, header_problem=one_line(exc))
    meta = header.metadata
    kind = QLIN_FILE if meta.get("format") == FORMAT else CT_WEIGHTS if QLIN_PLAN in meta else SAFETENSORS
    return SourceKind(path, kind, header=header)


def _kind_of(source: str | Path | SourceKind) -> SourceKind:
    return source if isinstance(source, SourceKind) else what_is(source)


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Resolve `package.module:function` or `path/to/file.py:function` (relative to the current
    folder, which is put on sys.path as `python -m` does)."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise InputError(f"`model` {spec!r} must look like package.module:factory or file.py:factory")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        if mod_name.endswith(".py"):
            file = Path(mod_name)
            if not file.is_file():
                raise InputError(f"`model` {spec!r}: file {file} does not exist")
            module_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[file.stem] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except InputError:
        raise
    except SystemExit as exc:  # user code that exits: say so, rather than exit quietly
        raise InputError(f"`model` {spec!r}: importing {mod_name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:  # importing user code can raise anything
        raise InputError(f"`model` {spec!r}: cannot import {mod_name!r} ({one_line(exc)})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError(f"`model` {spec!r}: {mod_name!r} has no callable {fn_name!r}")
    return fn


def _build(spec: str) -> nn.Module:
    fn = load_factory(spec)
    try:
        model = fn()
    except SystemExit as exc:  # a factory that exits would end qlin quietly, with its code
        raise InputError(f"`model` {spec!r}: the factory called sys.exit({exc.code!r}) instead of returning a model") from None
    except Exception as exc:
        raise InputError(f"`model` {spec!r}: the factory raised {one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"`model` {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _nn_class(name: str) -> type | None:
    """The torch.nn Module class that a pickle global like 'torch.nn.modules.linear.Linear'
    names, or None if it names anything else (or nothing)."""
    mod_name, _, attr = name.rpartition(".")
    if not mod_name.startswith("torch.nn.modules"):
        return None
    try:
        module = sys.modules.get(mod_name) or importlib.import_module(mod_name)
    except (ImportError, ValueError):  # no such module, or a name no module can have
        return None
    obj = getattr(module, attr, None)
    return obj if inspect.isclass(obj) and issubclass(obj, nn.Module) else None


MAX_DEPTH = 200  # modules or dicts nested deeper: refused (torch's own recursion ends near 500)


def _tensors_of(obj: Any, path: Path) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a loaded checkpoint (a module's parameters and buffers, a dict's values at
    any depth) with its name, found without recursion; nesting deeper than MAX_DEPTH is refused."""
    found, stack = [], [("", obj, 0)]
    while stack:
        prefix, o, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InputError(f"{path} nests modules or dicts more than {MAX_DEPTH} deep")
        if isinstance(o, torch.Tensor):
            found.append((prefix, o))
        elif isinstance(o, nn.Module):
            for k, v in (*o._parameters.items(), *o._buffers.items(), *o._modules.items()):
                if v is not None:
                    stack.append((f"{prefix}{k}" if isinstance(v, torch.Tensor) else f"{prefix}{k}.", v, depth + 1))
        elif isinstance(o, dict):
            for k, v in o.items():
                stack.append((f"{prefix}{k}" if isinstance(v, torch.Tensor) else f"{prefix}{k}.", v, depth + 1))
    return found


def _check_tensors(obj: Any, path: Path) -> None:
    """Refuse tensors that describe more than their storage holds (a view that repeats one
    element 30000 x 30000 times by stride 0, a meta tensor) or that are not dense, and more
    tensor bytes in all than `max_memory`: qlin would make each of them whole."""
    total = 0
    for key, t in sorted(_tensors_of(obj, path), key=lambda kv: kv[0]):
        name = f"tensor {key!r} " if key else "its tensor "
        if t.layout != torch.strided:
            raise InputError(f"{path}: {name}is {t.layout} ({tuple(t.shape)}); qlin reads dense tensors only")
        logical = t.numel() * t.element_size()
        held = t.untyped_storage().nbytes() if t.device.type != "meta" else 0
        if logical > held:
            raise InputError(
                f"{path}: {name}{tuple(t.shape)} describes {format_size(logical)} but its storage holds "
                f"{format_size(held)} (a repeated or missing view); qlin reads tensors whose elements are in the file"
            )
        total += logical
    check_budget(total, str(path))


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """torch.load with weights_only, allowing the torch.nn module classes the file names, after
    `_scan_pickle` has checked what loading it would call and allocate."""
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)  # the user trusts it
        except Exception as exc:
            raise InputError(f"{path} could not be unpickled: {one_line(exc)}") from None
    allowed = []
    legacy = not zipfile.is_zipfile(path)
    if legacy:
        with path.open("rb") as f:
            if f.read(1) != b"\x80":  # torch.save writes a zip archive or a protocol 2+ pickle
                raise InputError(f"{path} is not a PyTorch checkpoint or safetensors file (neither a zip archive nor a pickle)")
    if legacy and _legacy_module(path):
        # torch's legacy format stores each module class with its source code, which
        # weights_only cannot read, even for torch.nn classes (the zip format loads them)
        raise InputError(
            f"{path} is a whole module in PyTorch's legacy (non-zip) torch.save format, which cannot be "
            "loaded safely: save it again with torch.save(model, path) (the zip format, PyTorch >= 1.6), "
            "save its state_dict() and pass `model`, or pass `trust_pickle` if you trust the file"
        )
    scan_pickle(path, lambda detail: InputError(
        f"{path} cannot be loaded safely ({detail}); pass `trust_pickle` if you trust the file"))
    if zipfile.is_zipfile(path):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as exc:
            raise InputError(f"{path} is not a readable PyTorch checkpoint ({one_line(exc)})") from None
        for name in names:
            cls = _nn_class(name)
            if cls is None:
                raise InputError(
                    f"{path} pickles {name}, which is not a torch.nn class, and unpickling it "
                    "could run code: pass `trust_pickle` if you trust the file, or give a state "
                    "dict with `model` package.module:factory"
                )
            allowed.append(cls)
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickling_detail(exc)
        raise InputError(
            f"{path} cannot be loaded safely ({detail}); pass `trust_pickle` if you trust the file"
        ) from None
    except Exception as exc:
        raise InputError(f"{path} is not a PyTorch checkpoint or safetensors file ({one_line(exc)})") from None
    _check_tensors(obj, path)
    return obj


def _legacy_module(path: Path) -> bool:
    """True if a legacy (non-zip) torch.save file pickles a torch.nn module class: its first
    pickles (magic number, protocol, system info, the object) are read opcode by opcode, never
    run, looking for a GLOBAL that names one."""
    try:
        with path.open("rb") as f:
            for _ in range(4):
                for op, arg, _pos in pickletools.genops(f):
                    if op.name == "GLOBAL" and _nn_class(str(arg).replace(" ", ".")) is not None:
                        return True
    except Exception:  # not a pickle stream we can read: the checks below say what it is
        return False
    return False


def _pickled_global(exc: Exception) -> str | None:
    """The class or function named by torch's weights_only refusal ('Unsupported global: GLOBAL
    x.Y' -> 'x.Y'), or None."""
    match = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
    return match.group(1) if match else None


def _unpickling_detail(exc: Exception) -> str:
    """The useful line of torch's weights_only refusal (e.g. 'Unsupported global: GLOBAL x.Y')."""
    text = str(exc)
    name = _pickled_global(exc)
    if name:
        return f"it pickles {name}, which could run code"
    match = re.search(r"(Unsupported operand \d+|Unsupported class [\w.]+)", text)
    if match:
        return match.group(1)
    lines = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
    return lines[0][:160] if lines else "unsupported content"


_BAD_SAFETENSORS = (SafetensorError, OSError, ValueError, RuntimeError)


def _not_safetensors(what: str, path: Path, detail: str) -> InputError:
    return InputError(f"{what} {path} is not a valid safetensors file ({detail})")


def _header(path: Path, what: str) -> SafetensorsHeader:
    """`read_header`, its refusal as the InputError a user sees."""
    try:
        return read_header(path)
    except (OSError, ValueError) as exc:
        raise _not_safetensors(what, path, one_line(exc)) from None


def _read_safetensors(path: Path, header: SafetensorsHeader, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, once its header says they fit `max_memory`."""
    check_budget(header.nbytes, f"{what} {path}")
    try:
        return load_file(path)
    except _BAD_SAFETENSORS as exc:
        raise _not_safetensors(what, path, one_line(exc)) from None


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """A state dict (str -> Tensor), unwrapping {'state_dict': ...} / {'model': ...}; else None."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict) and len(obj) <= 4:
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    return None


def _check_keys(model_keys, file_keys, path: Path, spec: str) -> None:
    missing = sorted(set(model_keys) - set(file_keys))
    unexpected = sorted(set(file_keys) - set(model_keys))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        raise InputError(f"{path} does not fit `model` {spec}: keys {', '.join(parts)}")


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, spec: str) -> None:
    _check_keys(model.state_dict(), state, path, spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        detail = lines[0] if lines else one_line(exc)
        raise InputError(f"{path} does not fit `model` {spec}: {detail}") from None


def _plain_loading(model: nn.Module) -> bool:
    """True if no module of `model` customizes how its state dict loads (hooks, or its own
    `_load_from_state_dict`), so that filling its tensors in place is what load_state_dict does."""
    return all(
        type(m)._load_from_state_dict is nn.Module._load_from_state_dict
        and not m._load_state_dict_pre_hooks and not m._load_state_dict_post_hooks
        for m in model.modules()
    )


def _read_into(f, start: int, t: torch.Tensor) -> None:
    try:
        read_into(f, start, t)
    except EOFError:
        raise InputError(f"{f.name} ends before its last tensor") from None


def _fill_from_safetensors(model: nn.Module, path: Path, header: SafetensorsHeader, spec: str) -> None:
    """Read the safetensors state dict at `path` (its validated `header`) straight into `model`'s
    own tensors, one at a time, so that loading needs no memory beyond the model (load_file +
    load_state_dict held the whole state dict besides it: +1x the model). A tensor of another
    dtype than the model's is read aside and converted, as load_state_dict does."""
    targets = model.state_dict(keep_vars=True)
    _check_keys(targets, header.tensors, path, spec)
    try:
        with open(path, "rb", buffering=0) as f:
            for key, target in targets.items():
                t, entry = target.detach(), header.tensors[key]
                if tuple(t.shape) != entry.shape:
                    raise InputError(
                        f"{path} does not fit `model` {spec}: size mismatch for {key}: "
                        f"{list(entry.shape)} in the file, {list(t.shape)} in the model"
                    )
                dtype = entry.torch_dtype
                if dtype is None:  # a dtype qlin does not read itself
                    with safe_open(path, framework="pt") as st:
                        t.copy_(st.get_tensor(key))
                    continue
                direct = dtype == t.dtype and t.is_contiguous() and t.device.type == "cpu"
                buf = t if direct else torch.empty(entry.shape, dtype=dtype)
                _read_into(f, 8 + header.size + entry.start, buf)
                if not direct:
                    t.copy_(buf)
    except _BAD_SAFETENSORS as exc:
        raise _not_safetensors("source", path, one_line(exc)) from None


def read_checkpoint(source: str | Path | SourceKind, *, trust_pickle: bool = False) -> tuple[Any, str]:
    """What a checkpoint file holds, safely: (an nn.Module, "pickled module") or (a state dict,
    "state dict" / "safetensors state dict"). Raises InputError for anything else."""
    kind = _kind_of(source)
    path = kind.path
    if kind.folder:
        check_file(path, "source")  # says it is a folder, not a file
    if path.suffix == ".safetensors":
        state = _read_safetensors(path, kind.safetensors_header(), "source")
        _reject_qlin_file(kind)
        return state, "safetensors state dict"
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj, "pickled module"
    state = _as_state_dict(obj)
    if state is None:
        raise InputError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")
    return state, "state dict"


def load_source(
    source: str | Path | SourceKind, *, model: str | None = None, trust_pickle: bool = False
) -> Source:
    """Load a float model from a checkpoint (a path, or what `what_is` found it to be).

    - `.safetensors`: a state dict; needs `model` (`package.module:factory`).
    - anything else: `torch.load`; a state dict needs `model`; a whole pickled module loads
      without it when built from torch.nn classes only, else only with `trust_pickle`.
    - a Hugging Face model folder (config.json + weights): through transformers (hf.py).
    """
    source = _kind_of(source)
    path = source.path
    if source.folder:
        hf = load_hf_folder(path, model=model)
        return Source(hf.model, path, hf.kind, hf.sha256, hf.size_bytes)
    if path.suffix == ".safetensors" and model is not None:
        header = source.safetensors_header()
        check_budget(header.nbytes, f"source {path}")
        _reject_qlin_file(source)  # before the model is built
        built, kind = _build(model), "safetensors state dict"
        if _plain_loading(built):
            _fill_from_safetensors(built, path, header, model)
        else:
            _load_state(built, _read_safetensors(path, header, "source"), path, model)
    else:
        obj, kind = read_checkpoint(source, trust_pickle=trust_pickle)
        if isinstance(obj, nn.Module):
            built = obj
        else:
            if model is None:
                raise InputError(
                    f"{path} is a state dict ({len(obj)} tensors): pass `model` package.module:factory "
                    "to say which architecture it belongs to"
                )
            built = _build(model)
            _load_state(built, obj, path, model)
    built.eval()
    return Source(built, path, kind, file_sha256(path), path.stat().st_size)


def _reject_qlin_file(source: SourceKind) -> None:
    """Refuse a qlin file as a float source."""
    if source.kind == QLIN_FILE:
        raise InputError(f"{source.path} is already a qlin int8 file; pass the float checkpoint")


def load_tensors(path: str | Path, what: str = "inputs") -> torch.Tensor | dict[str, torch.Tensor]:
    """Model inputs or labels: one tensor whose first dimension is samples, or a dict of such
    tensors (passed as keyword arguments). A safetensors file or a dict holding exactly one tensor
    gives that tensor."""
    path = check_file(path, what)
    if path.suffix == ".safetensors":
        obj: Any = _read_safetensors(path, _header(path, what), what)
    else:
        scan_pickle(path, lambda detail: InputError(f"{what} {path} cannot be loaded as tensors ({detail})"))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{what} {path} cannot be loaded as tensors ({one_line(exc)})") from None
        _check_tensors(obj, path)
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            raise InputError(f"{what} {path} holds a scalar; the first dimension must be samples")
        if obj.shape[0] == 0:
            raise InputError(f"{what} {path} holds 0 samples (shape {tuple(obj.shape)})")
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sizes = {k: v.shape[0] if v.dim() else None for k, v in obj.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise InputError(f"{what} {path}: tensors disagree on the number of samples {sizes}")
        if 0 in sizes.values():
            raise InputError(f"{what} {path} holds 0 samples")
        return obj
    raise InputError(f"{what} {path} holds a {type(obj).__name__}, not a tensor or a dict of tensors")


# ----------------------------------------------------------------------------- streamed sources


class _TensorReader:
    """Tensors of safetensors files read one at a time with plain reads (no mmap: the pages of a
    mapped file count in the process's resident memory while it stays mapped)."""

    def __init__(self, sources: list[SourceKind]) -> None:
        self.entries: dict[str, tuple[Path, SafetensorsHeader]] = {}  # key -> (file, its header)
        for source in sources:
            header = source.safetensors_header()
            _reject_qlin_file(source)
            for key in header.tensors:
                self.entries.setdefault(key, (source.path, header))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def read(self, key: str) -> torch.Tensor:
        path, header = self.entries[key]
        try:
            with open(path, "rb", buffering=0) as f:
                return read_tensor(f, path, header, key)
        except EOFError:
            raise InputError(f"{path} ends before its last tensor") from None
        except _BAD_SAFETENSORS as exc:
            raise _not_safetensors("source", path, one_line(exc)) from None


@dataclass
class LazySource:
    """A float model whose weights stay on disk: `model` has its parameters on the meta device
    (buffers real); `tensor(key)` reads one state-dict tensor and `loaded(module)` puts a module's
    real parameters in place for the time of a `with`. Peak memory is then one layer, not the
    model (`qlin quantize --stream`)."""

    model: nn.Module
    path: Path
    kind: str
    sha256: str
    size_bytes: int
    reader: _TensorReader

    def __post_init__(self) -> None:
        self.state = self.model.state_dict(keep_vars=True)  # the float model's tensors (meta or real)
        self.names: dict[int, list[str]] = {}  # id(tensor) -> every state-dict name it has (ties)
        for key, t in self.state.items():
            self.names.setdefault(id(t), []).append(key)
        missing = [names[0] for names in self.names.values()
                   if self.state[names[0]].device.type == "meta" and not any(n in self.reader for n in names)]
        if missing:
            raise InputError(
                f"{self.path}: {len(missing)} of the model's tensors are not in the checkpoint under the model's names "
                f"(e.g. {missing[0]!r}); quantize without `stream`"
            )

    def value(self, t: torch.Tensor, key: str) -> torch.Tensor:
        """The real value of the model's tensor `t` (state-dict name `key`): read from the
        checkpoint under any of its names and converted to `t`'s dtype, as load_state_dict would;
        a real buffer missing from the checkpoint is itself."""
        for name in self.names.get(id(t), [key]):
            if name in self.reader:
                value = self.reader.read(name)
                if tuple(value.shape) != tuple(t.shape):
                    raise InputError(
                        f"{self.path}: size mismatch for {name}: {list(value.shape)} in the checkpoint, "
                        f"{list(t.shape)} in the model"
                    )
                return value.to(t.dtype)
        assert t.device.type != "meta", key
        return t

    def tensor(self, key: str) -> torch.Tensor:
        """The float model's state-dict tensor `key`, real."""
        return self.value(self.state[key], key)

    @contextlib.contextmanager
    def loaded(self, module: nn.Module, prefix: str, recurse: bool = True):
        """`module` (at path `prefix`) with its real parameters (without `recurse`: its own, not
        its children's) for the time of the `with`; they are dropped (back to meta) after it."""
        saved = []
        for name, sub in module.named_modules() if recurse else [("", module)]:
            for attr, p in list(sub._parameters.items()):
                if p is not None and p.device.type == "meta":
                    key = ".".join(x for x in (prefix, name, attr) if x)
                    sub._parameters[attr] = nn.Parameter(self.value(p, key), requires_grad=False)
                    saved.append((sub, attr, p))
        try:
            yield module
        finally:
            for sub, attr, p in saved:
                sub._parameters[attr] = p


def load_source_lazily(source: str | Path | SourceKind, *, model: str | None = None) -> LazySource:
    """A streamed source (`LazySource`): a Hugging Face folder with safetensors weights (single or
    sharded), or a safetensors state dict with `model` (a path, or what `what_is` found it to be).
    Pickles (`.pt`, `.bin`) cannot be read a tensor at a time: InputError."""
    source = _kind_of(source)
    path = source.path
    why = source.stream_problem()
    if why is not None:
        raise InputError(f"`stream`: {why} (it cannot be read a layer at a time); convert it to safetensors")
    if source.folder:
        hf = hf_skeleton(path, model=model)
        shards = [_file_kind(f) for f in hf.files if f.suffix == ".safetensors"]
        return LazySource(hf.model, path, hf.kind, hf.sha256, hf.size_bytes, _TensorReader(shards))
    if model is None:
        raise InputError(f"{path} is a safetensors state dict: pass `model` package.module:factory")
    reader = _TensorReader([source])  # the header is checked before the model is built
    with parameters_on_meta():
        built = _build(model)
    _check_keys(built.state_dict(), reader.entries, path, model)
    built.eval()
    return LazySource(built, path, "safetensors state dict", file_sha256(path), path.stat().st_size, reader)
