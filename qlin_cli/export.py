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
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import ConfigError
from .files import CONFIG_NAME, check_output_dir, file_tensors, safetensors_writer, write_folder_atomic
from .plan import Plan, PlanEntry
from .quantize import QuantizeResult
from .scheme import PER_CHANNEL

__all__ = [
    "FORMATS",
    "CT_FORMAT",
    "check_exportable",
    "quantization_config",
    "export_tensors",
    "save_compressed_tensors",
]

FORMATS = ("qlin", "compressed-tensors")
CT_FORMAT = "compressed-tensors"
WEIGHTS_NAME = "model.safetensors"

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


def check_exportable(plan: Plan) -> None:
    """Raise ConfigError, before any work, if a planned layer's scheme has no compressed-tensors
    form (SmoothQuant, whether the config or one of its rules asks for it)."""
    for e in plan.quantized:
        if e.scheme.smooth is not None:
            raise ConfigError(
                f"`format` compressed-tensors cannot express SmoothQuant (no per-input-channel factor), which "
                f"layer {e.name!r} uses: drop `smooth`"
            )


def _scheme(e: PlanEntry) -> dict[str, Any]:
    """The QuantizationScheme (without targets) of a quantized layer."""
    s = e.scheme
    weights = _args(symmetric=s.symmetric, strategy=str(s.granularity), dynamic=False,
                    observer=_WEIGHT_OBSERVERS.get(s.weight_observer, "minmax"))
    if s.mode == "weight-only":
        acts, fmt = None, "naive-quantized"
    elif s.mode == "dynamic":
        acts, fmt = _args(symmetric=False, strategy=str(s.act_granularity), dynamic=True, observer=None), "int-quantized"
    else:  # static
        acts = _args(symmetric=False, strategy="tensor", dynamic=False,
                     observer=_ACT_OBSERVERS.get(s.observer, "static_minmax"))
        fmt = "int-quantized"
    return {"weights": weights, "input_activations": acts, "output_activations": None, "format": fmt}


def quantization_config(result: QuantizeResult) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for a quantized model."""
    plan = result.plan
    check_exportable(plan)
    groups: list[tuple[dict, list[str]]] = []  # (scheme, layer paths), in module order
    for e in plan.quantized:
        scheme = _scheme(e)
        for s, names in groups:
            if s == scheme:
                names.extend(e.paths)
                break
        else:
            groups.append((scheme, e.paths))
    if not groups:
        raise ConfigError("no layer was quantized: there is nothing to export as compressed-tensors")
    config_groups = {}
    for i, (scheme, names) in enumerate(groups):
        targets = ["Linear"] if len(groups) == 1 else names
        config_groups[f"group_{i}"] = {"targets": targets, **scheme}
    formats = {scheme["format"] for scheme, _ in groups}
    ignore = [n for e in plan.entries if e.scheme is None for n in e.paths]
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
    quantized = {e.name: e for e in result.plan.quantized}

    def layout(key: str, t: torch.Tensor) -> torch.Tensor | None:
        """A quantized layer's tensor in compressed-tensors' shape and dtype (None: not stored)."""
        layer, _, suffix = key.rpartition(".")
        e = quantized.get(layer)
        if e is None:
            return t
        dtype, per_channel = e.torch_dtype, e.scheme.granularity == PER_CHANNEL
        if suffix == "weight_scale":
            return t.to(dtype).reshape(-1, 1) if per_channel else t.to(dtype).reshape(1)
        if suffix == "weight_zero_point":
            if e.scheme.symmetric:
                return None
            return t.reshape(-1, 1) if per_channel else t.reshape(1)
        if suffix == "input_scale":
            return t.to(dtype).reshape(1)
        if suffix == "input_zero_point":
            return t.reshape(1)
        if suffix == "smooth_scale":
            raise ConfigError(f"layer {layer!r} uses SmoothQuant, which compressed-tensors cannot express")
        return t

    aliases = tuple(f"{a}." for e in quantized.values() for a in e.aliases)
    return file_tensors(result.model.state_dict().items(), skip_prefixes=aliases, transform=layout, drop_tied=drop_tied)


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
