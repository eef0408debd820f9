"""compressed-tensors export: a model folder that the compressed-tensors ecosystem (transformers'
CompressedTensorsHfQuantizer, vLLM, llm-compressor) loads.

The folder holds `model.safetensors` and `config.json` (the source folder's config.json for a
Hugging Face source, else a minimal one) with a `quantization_config`; for a Hugging Face source
also the folder's other small files (tokenizer, generation config), copied unchanged.

Tensors, per quantized layer `<name>` (compressed-tensors' "int-quantized" layout; the same
layout is called "naive-quantized" for weight-only layers, which have no activation scheme):
- `<name>.weight`: int8 `(out, in)`, qlin's int8 values unchanged;
- `<name>.weight_scale`: the model's float dtype, `(out, 1)` per channel or `(1,)` per tensor;
- `<name>.weight_zero_point`: int8 of the scale's shape, only for asymmetric weights;
- `<name>.input_scale` `(1,)` and `<name>.input_zero_point` int8 `(1,)`: static mode only
  (qlin's static activations are asymmetric);
- `<name>.bias` and every other tensor as in the float state dict.
Weights dequantize as `weight_scale * (weight - weight_zero_point)`, as in qlin.

The `quantization_config` follows compressed-tensors' `QuantizationConfig` (pydantic) schema:
`quant_method` "compressed-tensors", `format`, `quantization_status` "compressed", `ignore`
(the Linear layers kept in float) and `config_groups`: one group with `targets: ["Linear"]`
when every quantized layer has the same scheme, else one group per scheme that targets its
layers by name. Each group has `weights` and `input_activations` QuantizationArgs
(`num_bits` 8, `type` "int", `symmetric`, `strategy`, `dynamic`, `observer`): dynamic mode is
`{"strategy": "token" | "tensor", "dynamic": true, "symmetric": false}` (qlin's dynamic
activations are asymmetric: each row's min and max span the 256 levels), static mode
`{"strategy": "tensor", "dynamic": false, "symmetric": false}`, weight-only none.

Not expressible, so refused: SmoothQuant layers (the format has no per-input-channel factor).
The folder is written atomically (a temporary folder beside it, then renamed into place) and is
byte-identical for the same input and options.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from .errors import ConfigError, OutputError
from .qfile import check_parent, safetensors_writer
from .swap import LayerRecord, QuantizeResult

__all__ = [
    "FORMATS",
    "CT_FORMAT",
    "quantization_config",
    "export_tensors",
    "check_output_dir",
    "save_compressed_tensors",
    "write_folder_atomic",
]

FORMATS = ("qlin", "compressed-tensors")
CT_FORMAT = "compressed-tensors"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# qlin's observers as compressed-tensors names them (the closest one where there is no twin;
# loaders of a compressed checkpoint do not use observers, they only describe calibration).
_WEIGHT_OBSERVERS = {"minmax": "minmax", "absmax": "minmax", "percentile": "minmax", "mse": "mse", "moving-average": "minmax"}
_ACT_OBSERVERS = {"minmax": "static_minmax", "absmax": "static_minmax", "percentile": "static_minmax",
                  "mse": "mse", "moving-average": "minmax"}
# files of a Hugging Face folder that are weights (not copied: the export has its own)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def _args(*, symmetric: bool, strategy: str, dynamic: bool, observer: str | None) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs for 8-bit ints, as its model_dump() writes them."""
    args: dict[str, Any] = {
        "num_bits": 8, "type": "int", "symmetric": symmetric, "group_size": None,
        "strategy": strategy, "dynamic": dynamic,
    }
    if observer is not None:
        args["observer"] = observer
    return args


def _scheme(r: LayerRecord) -> dict[str, Any]:
    """The QuantizationScheme (without targets) of a quantized layer."""
    if r.smooth is not None:
        raise ConfigError(
            f"layer {r.name!r} uses SmoothQuant, which compressed-tensors' int-quantized format cannot "
            "express (it has no per-input-channel factor): drop --smooth for --format compressed-tensors"
        )
    weights = _args(symmetric=r.symmetric, strategy=r.granularity, dynamic=False,
                    observer=_WEIGHT_OBSERVERS.get(r.weight_observer or "minmax", "minmax"))
    if r.mode == "weight-only":
        acts, fmt = None, "naive-quantized"
    elif r.mode == "dynamic":
        acts, fmt = _args(symmetric=False, strategy=r.act_granularity, dynamic=True, observer=None), "int-quantized"
    elif r.mode == "static":
        acts = _args(symmetric=False, strategy="tensor", dynamic=False,
                     observer=_ACT_OBSERVERS.get(r.observer or "minmax", "static_minmax"))
        fmt = "int-quantized"
    else:
        raise ConfigError(f"layer {r.name!r}: mode {r.mode!r} has no compressed-tensors equivalent")
    return {"weights": weights, "input_activations": acts, "output_activations": None, "format": fmt}


def quantization_config(result: QuantizeResult) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for a quantized model."""
    groups: list[tuple[dict, list[str]]] = []  # (scheme, layer paths), in module order
    for r in result.quantized:
        scheme = _scheme(r)
        for s, names in groups:
            if s == scheme:
                names.extend([r.name, *r.aliases])
                break
        else:
            groups.append((scheme, [r.name, *r.aliases]))
    if not groups:
        raise ConfigError("no layer was quantized: there is nothing to export as compressed-tensors")
    config_groups = {}
    for i, (scheme, names) in enumerate(groups):
        targets = ["Linear"] if len(groups) == 1 else names
        config_groups[f"group_{i}"] = {"targets": targets, **scheme}
    formats = {scheme["format"] for scheme, _ in groups}
    ignore = [n for r in result.layers if r.status != "quantized" for n in (r.name, *r.aliases)]
    return {
        "config_groups": config_groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def export_tensors(result: QuantizeResult, *, drop_tied: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of the export, by name (see the module docstring), on CPU and contiguous.

    `drop_tied`: leave out a tensor that is the very same tensor as one named before it (tied
    weights, e.g. `lm_head.weight` of a head tied to the embedding), as `save_pretrained` does;
    the config's `tie_word_embeddings` restores the tie on load. Otherwise such a tensor is
    written again (a copy)."""
    quantized = {r.name: r for r in result.quantized}
    alias_prefixes = tuple(f"{a}." for r in result.quantized for a in r.aliases)
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}  # (device, storage, offset, shape, stride, dtype) -> first name
    for key, t in result.model.state_dict().items():
        if alias_prefixes and key.startswith(alias_prefixes):
            continue  # a shared module: its tensors are stored once, under its first path
        layer, _, suffix = key.rpartition(".")
        r = quantized.get(layer)
        if r is not None:
            dtype = getattr(torch, r.dtype)
            if suffix == "weight_scale":
                t = t.to(dtype).reshape(-1, 1) if r.granularity == "channel" else t.to(dtype).reshape(1)
            elif suffix == "weight_zero_point":
                if r.symmetric:
                    continue
                t = t.reshape(-1, 1) if r.granularity == "channel" else t.reshape(1)
            elif suffix == "input_scale":
                t = t.to(dtype).reshape(1)
            elif suffix == "input_zero_point":
                t = t.reshape(1)
            elif suffix == "smooth_scale":
                raise ConfigError(f"layer {layer!r} uses SmoothQuant, which compressed-tensors cannot express")
        t = t.detach()
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if drop_tied and t.numel() and ident in seen:
            continue
        seen.setdefault(ident, key)
        out[key] = t.to("cpu").contiguous()
    # safetensors refuses tensors that share memory: copy any that still do
    ptrs: set[int] = set()
    for key, t in out.items():
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in ptrs:
                out[key] = t = t.clone()
            ptrs.add(t.untyped_storage().data_ptr())
    return out


def _within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output_dir(path: str | Path, *, force: bool, inputs: tuple[Path | None, ...] = ()) -> Path:
    """Refuse an output folder that is or holds an input, exists without `force` (or is not a
    model folder, even with it), is a file, or whose parent is missing or not writable."""
    path = Path(path)
    for src in inputs:
        if src is not None and _within(Path(src), path):
            raise OutputError(f"output folder {path} is or holds the input {src}; choose another -o")
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise OutputError(f"output {path} exists and is not a folder; compressed-tensors output is a folder")
        if not force:
            raise OutputError(f"output folder {path} exists; pass --force to replace it")
        if any(path.iterdir()) and not (path / CONFIG_NAME).is_file():
            raise OutputError(
                f"output folder {path} is not a model folder (no config.json); qlin replaces only model folders, even with --force"
            )
    check_parent(path)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_folder_atomic(path: str | Path, files: dict[str, bytes | Callable[[BinaryIO], None]], *, force: bool) -> Path:
    """Write `files` (name -> bytes, or a function that writes the open file) into a temporary
    folder beside `path`, then rename it into place: readers see the old folder or the whole new
    one. An existing folder is replaced only with `force` (it is moved aside, the new one renamed
    in, then the old one removed)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    token = secrets.token_hex(8)
    # names chosen before anything exists, so a Ctrl-C at any point reaches the cleanup
    tmp, old = parent / f".{path.name}.{token}.tmp", parent / f".{path.name}.{token}.old"
    try:
        try:
            os.mkdir(tmp, 0o755)
        except OSError as exc:
            raise OutputError(f"cannot write in {parent}: {exc.strerror}") from None
        for name in sorted(files):
            fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                files[name](f) if callable(files[name]) else f.write(files[name])
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists() or path.is_symlink():
            if not force:
                raise OutputError(f"output folder {path} exists; pass --force to replace it")
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if old.exists():
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # the new folder did not get in: put the old one back
                os.rename(old, path)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _extra_files(folder: Path) -> dict[str, bytes]:
    """The small files of a Hugging Face folder that a loader wants beside the weights
    (tokenizer, generation config, ...): top-level regular files that are not weights, shard
    indexes, config.json or hidden."""
    out = {}
    for f in sorted(folder.iterdir()):
        name = f.name
        if (not f.is_file() or name.startswith(".") or name == CONFIG_NAME or name.endswith(".index.json")
                or name.endswith(_WEIGHT_SUFFIXES)):
            continue
        out[name] = f.read_bytes()
    return out


def save_compressed_tensors(
    result: QuantizeResult,
    path: str | Path,
    *,
    force: bool = False,
    source_dir: str | Path | None = None,
    source_name: str = "",
    source_sha256: str = "",
) -> Path:
    """Write `result` as a compressed-tensors model folder at `path` (atomically; byte-identical
    for the same input). `source_dir`: the Hugging Face folder the model came from; its
    config.json gets the `quantization_config` and its other small files are copied."""
    from . import __version__

    path = check_output_dir(path, force=force, inputs=(Path(source_dir),) if source_dir else ())
    qconfig = quantization_config(result)
    if source_dir is not None:
        source_dir = Path(source_dir)
        try:
            config = json.loads((source_dir / CONFIG_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{source_dir / CONFIG_NAME} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{source_dir / CONFIG_NAME} is not a JSON object")
        files = _extra_files(source_dir)
    else:
        config, files = {}, {}
    config["quantization_config"] = qconfig
    metadata = {"format": "pt", "producer": f"qlin {__version__}", "source_name": source_name,
                "source_sha256": source_sha256}
    tensors = export_tensors(result, drop_tied=source_dir is not None)
    files[WEIGHTS_NAME] = safetensors_writer(tensors, metadata)
    files[CONFIG_NAME] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return write_folder_atomic(path, files, force=force)
