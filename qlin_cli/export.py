"""compressed-tensors export: a model folder that the compressed-tensors ecosystem (transformers'
CompressedTensorsHfQuantizer, vLLM, llm-compressor) loads.

The folder holds `model.safetensors` and `config.json` (the source folder's config.json for a
Hugging Face source, else a minimal one) with a `quantization_config`; for a Hugging Face source
also the files besides the weights that transformers reads from a model folder (`EXTRA_FILES`:
tokenizer, generation and processor configs, chat template), copied unchanged and nothing else
(a README, a license, notes, code are the user's to copy). A file reached through a link must
stay inside the source folder (or, for a Hugging Face cache snapshot, its repository's `blobs`):
one that leads elsewhere (`special_tokens_map.json -> /proc/self/environ`) is not copied, with a
warning. The files are copied by streaming, at most `max_memory` bytes in all (what a tokenizer
would read into memory).

Each quantized layer gets the format compressed-tensors itself infers for its scheme
(`infer_module_format`), except that 8-bit weight-only layers per channel or per tensor stay
naive-quantized as qlin always wrote them (`layer_format`):
- "int-quantized" (dynamic and static layers, any width) and "naive-quantized" (8-bit
  weight-only, per channel or per tensor): `<name>.weight` int8 `(out, in)`, qlin's values
  unchanged (B-bit values in int8);
- "pack-quantized" (weight-only layers of 2 or 4 bits, and 8-bit weight-only layers per group;
  the W4A16 / W8A16 form vLLM serves): `<name>.weight_packed` int32 `(out, ceil(in * B / 32))`
  and `<name>.weight_shape` int64 `[out, in]` instead of `weight`. Packing (compressed-tensors'
  `compressors/pack_quantized/helpers.py`, `pack_to_int32`): a value q is stored as the unsigned
  B-bit number q + 2^(B-1); value k of a row occupies bits k*B .. k*B + B - 1 of the row's bit
  string, least significant bit first, and int32 word w holds bits 32w .. 32w + 31 (at 4 bits:
  value k in bits 4(k % 8) .. 4(k % 8) + 3 of word k // 8); the unused high bits of a row's last
  word are 0 (`pack_int32`). That is the qlin file's bit string padded to whole words.
Then, for every quantized layer:
- `<name>.weight_scale`: the model's float dtype, `(out, ceil(in / G))` per group (strategy
  "group", `group_size` G), `(out, 1)` per channel, `(1,)` per tensor;
- `<name>.weight_zero_point`, only for asymmetric weights: int8 of the scale's shape, except in
  pack-quantized layers per group or per channel, where it is packed as the weight is but along
  the output channels: int32 `(ceil(out * B / 32), ceil(in / G))` (or `(..., 1)` per channel);
- `<name>.input_scale` `(1,)` and `<name>.input_zero_point` int8 `(1,)`: static mode only
  (qlin's static activations are asymmetric);
- `<name>.bias` and every other tensor as in the float state dict.
Weights dequantize as `weight_scale * (q - weight_zero_point)` per group of G inputs of a row,
as in qlin (`primitives.dequantize`).

The `quantization_config` follows compressed-tensors' `QuantizationConfig` (pydantic) schema:
`quant_method` "compressed-tensors", `format` (the layers' format, or "mixed-precision" when
they differ), `quantization_status` "compressed", `ignore` (the Linear layers kept in float) and
`config_groups`: one group with `targets: ["Linear"]` when every quantized layer has the same
scheme, else one group per scheme that targets its layers by name, each with its own `format`.
Each group has `weights` QuantizationArgs (`num_bits` B, `type` "int", `symmetric`, `strategy`
"group" | "channel" | "tensor", `group_size` G or None, `dynamic` false, `observer`) and
`input_activations`: dynamic mode `{"num_bits": 8, "strategy": "token" | "tensor", "dynamic":
true, "symmetric": false}` (qlin's dynamic activations are asymmetric: each row's min and max
span the 256 levels), static mode `{"strategy": "tensor", "dynamic": false, "symmetric":
false}`, weight-only (every grouped layer) None.

Not expressible, so refused before any work (`check_exportable`): transformers' Conv1D layers
(compressed-tensors quantizes nn.Linear); a group size that does not divide a layer's input (compressed-tensors
and vLLM split each row into whole groups and refuse a shorter last one); pack-quantized widths
that do not divide 32 (3, 5, 6, 7 bits: compressed-tensors up to 0.17 put 32 // B values in each
int32, 0.18 and later pack them densely across words, so one file would read differently in
different loaders). Loading note: transformers' `CompressedTensorsConfig(dequantize=True)` reads
every layer with the first config group's scheme, so a model with several groups loads through
the default (compressed) route, where compressed-tensors applies each layer's own scheme; and
that route cannot load asymmetric pack-quantized layers per group or per channel (transformers
5.24 with compressed-tensors 0.20: its empty model expects the zero point unpacked, while
compressed-tensors' own compressor writes it packed, as here), which load with dequantize=True.

GPTQ and AWQ (rounding.py) change the values and scales only, so their layers are written as
above. GPTQ's activation order fixes every group's scale from the float weights first (static
groups): the file needs no `g_idx`, and the weights' QuantizationArgs say `actorder` "weight"
(compressed-tensors' name for that form). AWQ's factors are folded into the norm or Linear before
a layer where the model's output stays the same; a layer whose factors could only stay per
layer goes without them (the format has no per-input-channel factor; its note says so).

The format has no per-input-channel factor, so it cannot divide activations by SmoothQuant's
factors inside the kernel: `api.quantize_checkpoint` folds them into the LayerNorm/RMSNorm that
feeds the layers instead (`calibrate.fold_smoothing`, SmoothQuant's original form) and exports
the other layers without SmoothQuant, each layer's note saying which. A result that still holds
`smooth_scale` is refused here, as are int8 embeddings (`--embeddings`: Linear layers only).
The folder is written atomically (a temporary folder beside it, then renamed into place) and is
byte-identical for the same input and options.

The weights file's metadata also holds qlin's own config, plan and ties (`qlin_format_version`,
`qlin_config`, `qlin_plan`, `qlin_ties`, as in a qlin file; other loaders ignore them), so that
qlin reads the folder back: `from_export` turns its tensors into the qlin file's layout, and
`qlin inspect`, `qlin eval` and `load_quantized` take the folder wherever they take a qlin file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from . import __version__
from .budget import format_size, max_memory
from .errors import ConfigError, FormatError, InputError
from .files import CONFIG_NAME, QLIN_PLAN, check_output_dir, file_tensors, safetensors_writer, tied_keys, write_folder_atomic
from .hf import quant_method
from .plan import Plan, PlanEntry
from .quantize import QuantizeResult
from .scheme import PER_TENSOR, LayerScheme

__all__ = [
    "FORMATS",
    "CT_FORMAT",
    "EXTRA_FILES",
    "check_exportable",
    "layer_format",
    "pack_int32",
    "quantization_config",
    "plan_quantization_config",
    "check_config_agrees",
    "export_tensors",
    "save_compressed_tensors",
    "export_weights",
    "from_export",
    "export_metadata",
    "stored_weight",
]

FORMATS = ("qlin", "compressed-tensors")
CT_FORMAT = "compressed-tensors"
WEIGHTS_NAME = "model.safetensors"
QLIN_FORMAT_VERSION = 2  # the qlin file format (qfile.FORMAT_VERSION) of that config, plan and ties

# qlin's observers as compressed-tensors names them (the closest one where there is no twin;
# loaders of a compressed checkpoint do not use observers, they only describe calibration).
_WEIGHT_OBSERVERS = {"minmax": "minmax", "absmax": "minmax", "percentile": "minmax", "mse": "mse", "moving-average": "minmax"}
_ACT_OBSERVERS = {"minmax": "static_minmax", "absmax": "static_minmax", "percentile": "static_minmax",
                  "mse": "mse", "moving-average": "minmax"}
# the files of a Hugging Face folder, besides config.json and the weights, that transformers reads
# when it loads the model, its tokenizer or its processor (transformers' GENERATION_CONFIG_NAME,
# PROCESSOR_NAME, CHAT_TEMPLATE_FILE, the tokenizers' TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE,
# ADDED_TOKENS_FILE and their VOCAB_FILES_NAMES): what the export copies, and nothing else
EXTRA_FILES = (
    "generation_config.json", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "chat_template.jinja", "chat_template.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "tiktoken.model", "spiece.model",
    "sentencepiece.bpe.model", "sentencepiece.model", "spm.model",
)
_log = logging.getLogger("qlin")


def _args(*, bits: int = 8, symmetric: bool, strategy: str, group_size: int | None = None, dynamic: bool,
          observer: str | None) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs for B-bit ints, as its model_dump() writes them."""
    args: dict[str, Any] = {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
        "strategy": strategy, "dynamic": dynamic,
    }
    if observer is not None:
        args["observer"] = observer
    return args


def layer_format(scheme: LayerScheme) -> str:
    """The compressed-tensors format of a layer quantized with `scheme` (the one compressed-tensors'
    own `infer_module_format` picks for such a scheme, but for 8-bit weight-only per channel or per
    tensor, which stays naive-quantized as qlin always wrote it): int-quantized when activations
    are quantized (int8 storage, any width), pack-quantized for weight-only layers of fewer than
    8 bits or with groups, naive-quantized for the other weight-only layers."""
    if scheme.mode != "weight-only":
        return "int-quantized"
    if scheme.bits < 8 or scheme.group_size is not None:
        return "pack-quantized"
    return "naive-quantized"


def check_exportable(plan: Plan) -> None:
    """Raise ConfigError, before any work, if a planned layer's scheme has no compressed-tensors
    form: transformers' Conv1D layers (compressed-tensors quantizes nn.Linear, and would read
    the (out, in) weight into an (in, out) one); SmoothQuant factors left to divide inside the
    kernel (`calibrate.fold_smoothing` moves them out first); a group size that
    does not divide the layer's input (compressed-tensors and vLLM reshape each row into whole
    groups: a shorter last group is refused when the model loads); pack-quantized widths that do
    not divide 32 (3, 5, 6 and 7 bits: their pack-quantized layout changed between
    compressed-tensors releases, from 32 // B values per int32 to a dense bit string, so one file
    would read differently in different loaders); int8 embeddings."""
    for e in plan.quantized:
        s = e.scheme
        if e.module != "Linear":
            raise ConfigError(
                f"`format` compressed-tensors quantizes nn.Linear layers only, and layer {e.name!r} is a "
                f"transformers {e.module} (weight stored (in, out)): use the qlin format"
            )
        if s.smooth is not None:
            raise ConfigError(
                f"`format` compressed-tensors cannot divide by SmoothQuant factors inside the kernel, which "
                f"layer {e.name!r} needs: fold them into the model first (calibrate.fold_smoothing)"
            )
        if s.group_size is not None and e.in_features % s.group_size:
            raise ConfigError(
                f"`format` compressed-tensors needs whole groups: layer {e.name!r} has {e.in_features} inputs, "
                f"not a multiple of `group_size` {s.group_size} (its last group would be shorter, which "
                f"compressed-tensors and vLLM refuse); use a group size that divides it, or the qlin format"
            )
        if layer_format(s) == "pack-quantized" and 32 % s.bits:
            raise ConfigError(
                f"`format` compressed-tensors packs {s.bits}-bit weights (layer {e.name!r}) differently in "
                f"different compressed-tensors releases (32 // {s.bits} values per int32 up to 0.17, a dense "
                f"bit string since 0.18), so loaders would disagree: use `bits` 2, 4 or 8, or the qlin format"
            )
    if plan.quantized_embeddings:
        raise ConfigError("`format` compressed-tensors describes Linear layers only: drop `embeddings`")


def _scheme(e: PlanEntry) -> dict[str, Any]:
    """The QuantizationScheme (without targets) of a quantized layer."""
    s = e.scheme
    strategy = "group" if s.group_size is not None else str(s.granularity)
    weights = _args(bits=s.bits, symmetric=s.symmetric, strategy=strategy, group_size=s.group_size, dynamic=False,
                    observer=_WEIGHT_OBSERVERS.get(s.weight_observer, "minmax"))
    if s.gptq and s.act_order:  # GPTQ in activation order with every scale fixed first: no g_idx
        weights["actorder"] = "weight"
    if s.mode == "weight-only":
        acts = None
    elif s.mode == "dynamic":
        acts = _args(symmetric=False, strategy=str(s.act_granularity), dynamic=True, observer=None)
    else:  # static
        acts = _args(symmetric=False, strategy="tensor", dynamic=False,
                     observer=_ACT_OBSERVERS.get(s.observer, "static_minmax"))
    return {"weights": weights, "input_activations": acts, "output_activations": None, "format": layer_format(s)}


def quantization_config(result: QuantizeResult) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for a quantized model."""
    return plan_quantization_config(result.plan)


def plan_quantization_config(plan: Plan) -> dict[str, Any]:
    """The `quantization_config` that describes `plan` (what the export writes, and what a folder
    it wrote must still hold when it is read back: `check_config_agrees`)."""
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
        why = next((f" (e.g. {e.name!r}: {e.reason})" for e in plan.entries if e.reason), "")
        raise ConfigError(f"no layer was quantized{why}: there is nothing to export as compressed-tensors")
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


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 B-bit values `(N, K)` (B = 1, 2, 4 or 8) -> int32 `(N, ceil(K * B / 32))`,
    compressed-tensors' pack-quantized layout: value q is stored as u = q + 2^(B-1); value k of a
    row occupies bits k*B .. k*B + B - 1 of the row's bit string (least significant first), and
    int32 word w holds bits 32w .. 32w + 31 (bit 32w in its lowest bit); unused high bits of a
    row's last word are 0. (The qlin file's bit string, `lowbit.pack_bits`, padded to whole words.)
    Built byte by byte in uint8, since B divides 8 (4096 x 4096 values at 4 bits: ~0.1 s)."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"pack_int32 packs 1, 2, 4 or 8 bits, not {bits}")
    n, k = q.shape
    words = -(-k * bits // 32)
    # q + 2^(B-1) is q's low B bits (two's complement) with the top one flipped
    u = (q.view(torch.uint8) & ((1 << bits) - 1)) ^ (1 << (bits - 1))  # (N, K) uint8 in [0, 2^B)
    per = 8 // bits  # values per byte
    u = torch.nn.functional.pad(u, (0, words * 32 // bits - k)).reshape(n, words * 4, per)
    packed = u[..., 0].clone()  # (N, 4 * words): byte j of a row holds values per*j .. per*j + per - 1
    for j in range(1, per):
        packed |= u[..., j] << (j * bits)
    packed = packed.reshape(n, words, 4)
    if sys.byteorder == "big":  # the view below reads a word's bytes in the machine's order
        packed = packed.flip(-1)
    return packed.contiguous().view(torch.int32).reshape(n, words)


def _layer_tensors(e: PlanEntry, key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """What the export stores for tensor `<e.name>.<suffix>` = `key` of quantized layer `e`, in
    compressed-tensors' names, shapes and dtypes (see the module docstring)."""
    s, dtype = e.scheme, e.torch_dtype
    suffix = key.rpartition(".")[2]
    grouped, packed = s.group_size is not None, layer_format(s) == "pack-quantized"
    # scales: (out, groups) per group, (out, 1) per channel, (1,) per tensor
    shape = (-1, t.shape[-1]) if grouped else (1,) if s.granularity == PER_TENSOR else (-1, 1)
    if suffix == "weight":
        if not packed:
            return [(key, t)]
        shape_t = torch.tensor([e.out_features, e.in_features], dtype=torch.int64)
        return [(f"{key}_packed", pack_int32(t, s.bits)), (f"{key}_shape", shape_t)]
    if suffix == "weight_scale":
        return [(key, t.to(dtype).reshape(shape))]
    if suffix == "weight_zero_point":
        if s.symmetric:
            return []
        zp = t.reshape(shape)
        if packed and s.granularity != PER_TENSOR:  # packed along the output channels
            zp = pack_int32(zp.t(), s.bits).t().contiguous()  # (ceil(out * B / 32), groups)
        return [(key, zp)]
    if suffix == "input_scale":
        return [(key, t.to(dtype).reshape(1))]
    if suffix == "input_zero_point":
        return [(key, t.reshape(1))]
    if suffix == "smooth_scale":
        raise ConfigError(f"layer {e.name!r} uses SmoothQuant, which compressed-tensors cannot express")
    return [(key, t)]


def export_tensors(result: QuantizeResult, *, drop_tied: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of the export, by name (see the module docstring), on CPU and contiguous.

    `drop_tied`: leave out a tensor that is the very same tensor as one named before it (tied
    weights, e.g. `lm_head.weight` of a head tied to the embedding), as `save_pretrained` does;
    the config's `tie_word_embeddings` restores the tie on load. Otherwise such a tensor is
    written again (a copy)."""
    quantized = {e.name: e for e in result.plan.quantized}
    aliases = tuple(f"{a}." for e in quantized.values() for a in e.aliases)

    def items():  # a quantized layer's tensors under its first path (file_tensors skips the aliases)
        for key, t in result.model.state_dict().items():
            e = quantized.get(key.rpartition(".")[0])
            if e is None:
                yield key, t
            else:
                yield from _layer_tensors(e, key, t.detach().cpu())

    return file_tensors(items(), skip_prefixes=aliases, drop_tied=drop_tied)


def _inside(folder: Path, name: str) -> Path | str:
    """The real path of `folder / name` if following its links keeps it inside `folder` (or, for a
    Hugging Face cache snapshot `.../snapshots/<rev>`, inside the repository's `blobs`, where
    the snapshot's links lead) and it is a regular file; else why not, in words."""
    path = folder / name
    real = path.resolve()
    roots = [folder.resolve()]
    if folder.resolve().parent.name == "snapshots":
        roots.append(folder.resolve().parent.parent / "blobs")
    if not any(real == r or r in real.parents for r in roots):
        return f"it leads to {real}, outside the folder"
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if not stat.S_ISREG(mode):
        return "it is not a regular file"
    return real


def _streamed(real: Path, size: int) -> Callable[[BinaryIO], None]:
    """A writer that copies the regular file `real` of `size` bytes into the open file, 1 MiB at a
    time, refusing a file that changed since it was checked (another file, another size)."""
    checked = os.stat(real)

    def copy(f: BinaryIO) -> None:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as src:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size) != (checked.st_dev, checked.st_ino, size) or not stat.S_ISREG(st.st_mode):
                raise InputError(f"{real} changed while it was copied; run again")
            left = size
            while left:
                chunk = src.read(min(left, 2**20))
                if not chunk:
                    raise InputError(f"{real} changed while it was copied; run again")
                f.write(chunk)
                left -= len(chunk)

    return copy


def _extra_files(folder: Path) -> dict[str, Callable[[BinaryIO], None]]:
    """The files of `EXTRA_FILES` that the Hugging Face folder holds, as writers that stream each
    into the export. A file whose links lead out of the folder, or that is not a regular file,
    is left out with a warning; all of them together may take at most `max_memory` bytes."""
    out, sizes = {}, {}
    for name in EXTRA_FILES:
        if not os.path.lexists(folder / name):
            continue
        real = _inside(folder, name)
        if isinstance(real, str):
            _log.warning(f"{folder / name} is not copied into the export: {real}", extra={"kind": "warning"})
            continue
        sizes[name] = os.stat(real).st_size
        out[name] = _streamed(real, sizes[name])
    total, cap = sum(sizes.values()), max_memory()
    if total > cap:
        largest = max(sizes, key=sizes.get)
        raise InputError(
            f"{folder}: the files the export copies take {format_size(total)} ({largest}: {format_size(sizes[largest])}), "
            f"more than `max_memory` {format_size(cap)}; pass a larger `max_memory` if that is meant")
    return out


def _source_config(folder: Path) -> dict:
    """The source folder's config.json as a JSON object (the export's config.json adds the
    quantization_config to it); it too must stay inside the folder and within `max_memory`."""
    real = _inside(folder, CONFIG_NAME)
    if isinstance(real, str):
        raise InputError(f"{folder / CONFIG_NAME}: {real}; qlin reads a model folder's files only from inside it")
    size = os.stat(real).st_size
    if size > max_memory():
        raise InputError(f"{folder / CONFIG_NAME} takes {format_size(size)}, more than `max_memory` {format_size(max_memory())}")
    try:
        config = json.loads(real.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{folder / CONFIG_NAME} is not valid JSON ({str(exc)[:160]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{folder / CONFIG_NAME} is not a JSON object")
    return config


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
        config = _source_config(source_dir)
        files = _extra_files(source_dir)
    else:
        config, files = {}, {}
    config["quantization_config"] = qconfig
    metadata = {"format": "pt", "producer": f"qlin {__version__}", "source_name": source_name,
                "source_sha256": source_sha256, "qlin_format_version": str(QLIN_FORMAT_VERSION),
                "qlin_config": result.config.to_json(), QLIN_PLAN: result.plan.to_json()}
    drop_tied = source_dir is not None
    aliases = tuple(f"{a}." for e in result.plan.quantized for a in e.aliases)
    state = [(k, v) for k, v in result.model.state_dict().items() if not (aliases and k.startswith(aliases))]
    metadata["qlin_ties"] = json.dumps(tied_keys(state) if drop_tied else {}, sort_keys=True, separators=(",", ":"))
    tensors = export_tensors(result, drop_tied=drop_tied)
    files[WEIGHTS_NAME] = safetensors_writer(tensors, metadata)
    files[CONFIG_NAME] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return write_folder_atomic(path, files, force=force)


def export_weights(folder: Path) -> Path:
    """The weights file of a compressed-tensors model folder; FormatError for another folder."""
    method = quant_method(folder)
    if method != CT_FORMAT:
        what = f"a {method} model" if method else "not a compressed-tensors model folder (no quantization_config in a config.json)"
        raise FormatError(f"{folder} is a folder, {what}; qlin reads qlin files and the compressed-tensors folders it writes")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FormatError(f"{folder} has no {WEIGHTS_NAME}: it is not a compressed-tensors folder that qlin wrote")
    return weights


def _word_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 `(N, W)` -> uint8 `(N, 4 W)`: each row's bit string, byte 0 first (`pack_int32`)."""
    b = words.contiguous().view(torch.uint8).reshape(words.shape[0], -1, 4)
    return (b.flip(-1) if sys.byteorder == "big" else b).reshape(words.shape[0], -1)


def _unpack_int32(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """`pack_int32`'s inverse: int32 `(N, W)` -> int8 B-bit values `(N, K)`."""
    b, per = _word_bytes(words), 8 // bits
    u = torch.stack([(b >> (j * bits)) & ((1 << bits) - 1) for j in range(per)], dim=-1).reshape(b.shape[0], -1)
    return (u[:, :k].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def _disagreement(stored: Any, wanted: Any, where: str) -> str | None:
    """The first field of `stored` (config.json's) that differs from `wanted` (the plan's), as
    'field (stored value; the plan gives wanted value)', or None. A field the plan does not give
    may be there only empty (null, {}, [])."""
    if isinstance(wanted, dict) and isinstance(stored, dict):
        for key, value in wanted.items():
            if key not in stored:
                return f"{where}{key} (missing; the plan gives {json.dumps(value)[:80]})"
            found = _disagreement(stored[key], value, f"{where}{key}.")
            if found:
                return found
        for key, value in stored.items():
            if key not in wanted and value not in (None, {}, []):
                return f"{where}{key} ({json.dumps(value)[:80]}; the plan has no such field)"
        return None
    if stored != wanted or type(stored) is not type(wanted):
        return f"{where.rstrip('.')} ({json.dumps(stored)[:80]}; the plan gives {json.dumps(wanted)[:80]})"
    return None


def check_config_agrees(folder: Path, plan: Plan) -> None:
    """Refuse a compressed-tensors folder whose config.json `quantization_config` no longer says
    what the plan stored in its weights says (`symmetric` flipped, a layer added to `ignore`):
    transformers and vLLM read the layers by the config, qlin by the plan, and the two would run
    different models. FormatError naming the first field that differs."""
    config = folder / CONFIG_NAME
    try:
        stored = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError, RecursionError, AttributeError) as exc:
        raise FormatError(f"{config} does not read as a JSON object ({str(exc)[:120]})") from None
    try:
        wanted = plan_quantization_config(plan)
    except ConfigError as exc:
        raise FormatError(f"{folder}: its qlin_plan describes no compressed-tensors model ({exc})") from None
    field = _disagreement(stored, wanted, "")
    if field is not None:
        raise FormatError(
            f"{folder}: config.json's quantization_config disagrees with the plan qlin stored in {WEIGHTS_NAME} at "
            f"{field}; transformers would load another model than qlin reads: restore config.json, or quantize again")


def stored_weight(e: PlanEntry) -> tuple[str, torch.dtype, tuple[int, int]]:
    """The tensor that holds quantized layer `e`'s weight in the export (`_layer_tensors`): its
    name's suffix, dtype and shape, so that a reader can check a plan against a header before
    it loads anything."""
    s = e.scheme
    if layer_format(s) == "pack-quantized":
        return "weight_packed", torch.int32, (e.out_features, -(-e.in_features * s.bits // 32))
    return "weight", torch.int8, (e.out_features, e.in_features)


def export_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """An export's weights-file metadata in the qlin file's terms (`config`, `plan`, `ties`,
    `format_version`, the source), without reading a tensor."""
    return {"format_version": metadata.get("qlin_format_version", ""), "config": metadata.get("qlin_config", ""),
            "plan": metadata[QLIN_PLAN], "ties": metadata.get("qlin_ties", "{}"),
            "container": f"compressed-tensors folder ({metadata.get('producer', '?')})",
            **{k: metadata[k] for k in ("source_name", "source_sha256") if k in metadata}}


def from_export(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor], plan: Plan | None = None
                ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of an export's weights file (`path`) in the qlin file's terms:
    its `config`, `plan`, `ties` and `format_version`, and per quantized layer the weight (a
    pack-quantized one as the qlin file packs it: the same bit string without the padding to
    whole words, or int8 at 8 bits), the scale as float32 of the scheme's shape, the zero point
    (unpacked; zeros where the export leaves it out), and static mode's input scale and zero
    point of shape `()`. Values are unchanged but for the scales, which the export stores in the
    model's dtype (what a loader of the folder uses, so what qlin runs too). A tensor that does
    not fit is left as it is, for the qlin file's validation to name. `plan`: the plan of the
    metadata, where the caller has read it already."""
    meta = export_metadata(metadata)
    try:
        plan = plan or Plan.from_list(json.loads(metadata[QLIN_PLAN]))
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: its qlin_plan is invalid ({str(exc)[:160]})") from None
    if (path.parent / CONFIG_NAME).is_file():  # the folder's config.json, which other loaders follow
        check_config_agrees(path.parent, plan)
    out = dict(tensors)
    for e in plan.quantized:
        s, name = e.scheme, e.name
        shape = s.granularity.scale_shape((e.out_features, e.in_features))
        packed = out.pop(f"{name}.weight_packed", None)
        out.pop(f"{name}.weight_shape", None)
        words = -(-e.in_features * s.bits // 32)
        if packed is not None and (packed.dtype != torch.int32 or tuple(packed.shape) != (e.out_features, words)):
            raise FormatError(f"{path}: {name}.weight_packed is {packed.dtype} {tuple(packed.shape)}, the plan says "
                              f"torch.int32 {(e.out_features, words)} ({s.bits}-bit values packed in int32)")
        if packed is not None:
            row = _word_bytes(packed)[:, : -(-e.in_features * s.bits // 8)]  # the qlin file's packed row
            out[f"{name}.weight"] = (row ^ 0x80).view(torch.int8) if s.bits == 8 else row.contiguous()
        fits = set()
        for suffix, want in (("weight_scale", shape), ("input_scale", ())):
            t = tensors.get(f"{name}.{suffix}")
            if t is not None and t.numel() == math.prod(want):
                out[f"{name}.{suffix}"] = t.float().reshape(want)
                fits.add(suffix)
        zp = tensors.get(f"{name}.weight_zero_point")
        if zp is None and "weight_scale" not in fits:
            pass  # without a scale of the plan's shape, no zeros of a size that only the plan claims
        elif zp is None:
            out[f"{name}.weight_zero_point"] = torch.zeros(shape, dtype=torch.int8)
        elif zp.dtype == torch.int32:  # pack-quantized: packed along the outputs, (ceil(out * B / 32), groups)
            want = (-(-e.out_features * s.bits // 32), shape[1] if len(shape) == 2 else 1)
            if tuple(zp.shape) != want or s.granularity == PER_TENSOR:
                raise FormatError(f"{path}: {name}.weight_zero_point is torch.int32 {tuple(zp.shape)}, the plan says "
                                  f"{'torch.int8 (1,)' if s.granularity == PER_TENSOR else f'torch.int32 {want}'} "
                                  f"({s.bits}-bit zero points packed along the outputs)")
            out[f"{name}.weight_zero_point"] = _unpack_int32(zp.t(), s.bits, e.out_features).t().reshape(shape).contiguous()
        elif zp.numel() == math.prod(shape):
            out[f"{name}.weight_zero_point"] = zp.reshape(shape)
        t = tensors.get(f"{name}.input_zero_point")
        if t is not None and t.numel() == 1:
            out[f"{name}.input_zero_point"] = t.reshape(())
    return meta, out
