"""The qlin file (safetensors, format version 2): write atomically and deterministically, read
with validation, and load into a float model skeleton.

Per quantized layer `<name>`: `<name>.weight` int8 `(out, in)` for 8-bit weights, or for B < 8
bits uint8 `(out, ceil(in * B / 8))` packed (below); `<name>.weight_scale` float32 `()`,
`(out,)` or per group `(out, ceil(in / G))`; `<name>.weight_zero_point` int8 of the scale's
shape; `<name>.bias` (float, unchanged, if the layer has one); static mode adds
`<name>.input_scale` float32 `()` and `<name>.input_zero_point` int8 `()`, SmoothQuant
`<name>.smooth_scale` float32 `(in,)`. Every other tensor of the model as in its float state
dict. `__metadata__`: format, format_version, qlin_version, torch_version, source_name,
source_sha256, config (JSON), plan (JSON list, one entry per nn.Linear; version 2 adds each
layer's `bits` and `group_size`), and from version 2 `ties` (JSON map): a tensor that several
modules share (a language-model head tied to the token embedding) is stored once, under its
first name, and each other name maps to it; loading restores the tie.

Packed B-bit weights (`lowbit.pack_bits`): each value q in [-2^(B-1), 2^(B-1) - 1] is stored as the
unsigned B-bit number u = q + 2^(B-1) (offset binary); row by row, value k of a row occupies
bits k*B .. k*B + B - 1 of the row's bit string, least significant bit first, and byte j of the
row holds bits 8j .. 8j + 7 (bit 8j in its lowest bit). Each row starts on a byte; the unused
high bits of its last byte are 0. At 4 bits: byte j holds value 2j in its low nibble and 2j + 1
in its high nibble; at 2 bits, four values per byte from the lowest bits up; at 3 bits, values
cross byte boundaries.

Version 3 (written only when the file has int8 embeddings, `--embeddings`): metadata
`embeddings` (JSON list, one entry per nn.Embedding: name, num_embeddings, embedding_dim, dtype,
status, reason) and, per quantized embedding `<name>`, `<name>.weight` int8 `(num, dim)` and
`<name>.weight_scale` float32 `(num,)` (symmetric per row, `qembedding.py`). A file without
them is written as version 2, so older readers keep reading it; a version-2 reader refuses a
version-3 file instead of loading int8 tables as float.

Version 1 files (8-bit only, no bits/group_size in the plan) load as before.

Reading takes a compressed-tensors folder that qlin wrote, or its weights file, too: its
metadata holds the same config, plan and ties, and `export.from_export` gives its tensors this
layout.

Loading fills a float model skeleton: a real one, or one whose parameters are on the meta device
(`empty_weights()`, or `torch.device("meta")` for a model without non-persistent buffers), so that
loading an int8 model never allocates the float weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from . import __version__
from .config import QuantConfig
from .errors import ConfigError, FormatError, InputError, one_line
from .budget import check_budget
from .export import export_metadata, export_weights, from_export, stored_weight
from .hf import parameters_on_meta
from .files import (
    FORMAT, HASH_KEYS, QLIN_PLAN, SafetensorsHeader, SafetensorsStream, check_file, check_output, file_tensors, header_digest,
    read_header, read_tensor, safetensors_writer, tied_keys, write_atomic,
)
from .plan import EmbeddingEntry, Plan, PlanEntry, find_linears, layer_kind, layer_shape, swap_module
from .kernels.lowbit import pack_bits, unpack_bits
from .primitives import packed_row_bytes
from .qembedding import QuantizedEmbedding
from .qlinear import QuantizedLinear, compile_model, pack_all
from .quantize import LayerResult, QuantizeResult, _release_freed_memory

__all__ = [
    "FORMAT_VERSION",
    "QFile",
    "save_quantized",
    "save_streamed",
    "read_qfile",
    "load_quantized",
    "empty_weights",
    "verify_payload",
    "pack_bits",
    "unpack_bits",
]

FORMAT_VERSION = 3  # the newest this qlin reads and writes; files without int8 embeddings are written as 2
LAYER_TENSORS = ("weight", "weight_scale", "weight_zero_point", "bias", "input_scale", "input_zero_point", "smooth_scale")


def _stored_weight_shape(e: PlanEntry) -> tuple[torch.dtype, tuple[int, int]]:
    """The dtype and shape of a quantized layer's weight in the file."""
    bits = e.scheme.bits
    if bits == 8:
        return torch.int8, (e.out_features, e.in_features)
    return torch.uint8, (e.out_features, packed_row_bytes(e.in_features, bits))


def _metadata(config: QuantConfig, plan: Plan, ties: dict[str, str], source_name: str, source_sha256: str) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION if plan.quantized_embeddings else 2),
        "qlin_version": __version__,
        "torch_version": torch.__version__,
        "source_name": source_name,
        "source_sha256": source_sha256,
        "config": config.to_json(),
        "plan": plan.to_json(),
        "ties": json.dumps(ties, sort_keys=True, separators=(",", ":")),
        **({} if not plan.embeddings else {
            "embeddings": json.dumps([e.to_dict() for e in plan.embeddings], sort_keys=True, separators=(",", ":"))}),
    }


def _file_state(model: nn.Module, plan: Plan, keep_vars: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The int8 model's state dict as the file takes it: a shared quantized layer once, under
    its first path."""
    aliases = tuple(f"{a}." for e in plan.quantized for a in e.aliases)
    return [(k, v) for k, v in model.state_dict(keep_vars=keep_vars).items() if not aliases or not k.startswith(aliases)]


def save_quantized(
    result: QuantizeResult,
    path: str | Path,
    *,
    force: bool = False,
    source_name: str = "",
    source_sha256: str = "",
) -> Path:
    """Write `result` as a qlin file at `path` (atomically; byte-identical for the same input)."""
    path = check_output(path, force=force)
    plan = result.plan
    packed = {f"{e.name}.weight": e.scheme.bits for e in plan.quantized if e.scheme.bits < 8}
    state = _file_state(result.model, plan)
    ties = tied_keys(state)  # a tensor shared by two modules (a head tied to the embedding) is stored once
    metadata = _metadata(result.config, plan, ties, source_name, source_sha256)
    tensors = file_tensors(((k, pack_bits(v, packed[k]) if k in packed else v) for k, v in state), drop_tied=True)
    writer = safetensors_writer(tensors, metadata, digests=True)
    return write_atomic(path, writer, force=force)


@torch.no_grad()
def save_streamed(
    model: nn.Module,
    config: QuantConfig,
    plan: Plan,
    layers: Iterable[tuple[LayerResult, QuantizedLinear | None]],
    tensor: Callable[[str], torch.Tensor],
    path: str | Path,
    *,
    force: bool = False,
    source_name: str = "",
    source_sha256: str = "",
) -> QuantizeResult:
    """Write the qlin file of a model whose weights are not in memory, as `layers` (from
    `quantize.stream_layers`) quantizes them one at a time: the same bytes `save_quantized` writes
    for the same model and options. `model`'s parameters are on the meta device; each quantized
    layer is swapped for a meta QuantizedLinear, so that its state dict gives every tensor's name,
    dtype and shape (and the ties) before anything is read. Each layer's tensors go to the file
    as it comes and are dropped; every other tensor is read with `tensor(key)` at the end, one at
    a time. Returns the result (its model: the int8 skeleton, on the meta device)."""
    path = check_output(path, force=force)
    for e in plan.quantized:
        with torch.device("meta"):
            q = QuantizedLinear(e.in_features, e.out_features, e.scheme, bias=e.has_bias, dtype=e.torch_dtype)
        for alias in e.paths:
            model = swap_module(model, alias, q)
    packed = {f"{e.name}.weight": e.scheme.bits for e in plan.quantized if e.scheme.bits < 8}
    state = _file_state(model, plan, keep_vars=True)
    ties = tied_keys(state)
    specs = {}
    for key, t in state:
        if key not in ties:
            n, k = t.shape if key in packed else (0, 0)
            specs[key] = (torch.uint8, (n, packed_row_bytes(k, packed[key]))) if key in packed else (t.dtype, tuple(t.shape))
    metadata = _metadata(config, plan, ties, source_name, source_sha256)
    results: list[LayerResult] = []

    def write(f) -> None:
        stream = SafetensorsStream(f, specs, metadata)
        for result, q in layers:
            results.append(result)
            if q is not None:
                for suffix, t in q.state_dict().items():
                    key = f"{result.name}.{suffix}"
                    stream.put(key, pack_bits(t.cpu(), packed[key]) if key in packed else t)
        for key in sorted(stream.missing):  # kept-float layers and the rest (or, block by block, all from a spill)
            t = tensor(key)
            stream.put(key, pack_bits(t, packed[key]) if key in packed else t)
        stream.finish()

    write_atomic(path, write, force=force)
    return QuantizeResult(model=model, config=config, layers=tuple(results))


@dataclass
class QFile:
    """A validated qlin file (or compressed-tensors folder qlin wrote: `path` is its weights file)."""

    path: Path
    metadata: dict[str, str]
    config: QuantConfig
    plan: Plan
    tensors: dict[str, torch.Tensor]


def _bad(path: Path, msg: str) -> FormatError:
    return FormatError(f"{path}: {msg}")


def _validate_layer(path: Path, e: PlanEntry, tensors: dict[str, torch.Tensor], unpack: bool = True) -> None:
    """A quantized layer's tensors against its plan entry: names, dtypes, shapes, and scales
    that are finite and positive."""
    name, out_f, in_f, scheme = e.name, e.out_features, e.in_features, e.scheme
    sshape = scheme.granularity.scale_shape((out_f, in_f))
    want = {
        "weight": _stored_weight_shape(e),
        "weight_scale": (torch.float32, sshape),
        "weight_zero_point": (torch.int8, sshape),
    }
    if scheme.static:
        want.update(input_scale=(torch.float32, ()), input_zero_point=(torch.int8, ()))
    if scheme.smooth is not None:
        want["smooth_scale"] = (torch.float32, (in_f,))
    for suffix in ("input_scale", "input_zero_point", "smooth_scale"):
        if suffix not in want and f"{name}.{suffix}" in tensors:
            raise _bad(path, f"tensor {name}.{suffix} does not belong to a {scheme.mode} layer")
    for suffix, (dtype, shape) in want.items():
        t = tensors.get(f"{name}.{suffix}")
        if t is None:
            raise _bad(path, f"layer {name!r} has no tensor {name}.{suffix}")
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise _bad(
                path, f"{name}.{suffix} is {t.dtype} {tuple(t.shape)}, the plan says {dtype} {shape}"
            )
    bias = tensors.get(f"{name}.bias")
    if e.has_bias != (bias is not None):
        raise _bad(path, f"layer {name!r}: bias {'missing' if e.has_bias else 'unexpected'}")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (out_f,)):
        raise _bad(path, f"{name}.bias is {bias.dtype} {tuple(bias.shape)}, expected float ({out_f},)")
    for suffix in ("weight_scale", "input_scale", "smooth_scale"):
        t = tensors.get(f"{name}.{suffix}")
        if suffix in want and (not bool(torch.isfinite(t).all()) or bool((t <= 0).any())):
            raise _bad(path, f"{name}.{suffix} has values that are not finite and positive")
    if scheme.bits < 8:
        packed = tensors[f"{name}.weight"]
        if in_f * scheme.bits % 8 and bool((packed[:, -1] >> (in_f * scheme.bits % 8)).any()):
            raise _bad(path, f"{name}.weight has bits set past the end of its rows ({scheme.bits}-bit packing)")
        if unpack:
            tensors[f"{name}.weight"] = unpack_bits(packed, scheme.bits, in_f)  # the canonical int8 values


def _ties(path: Path, metadata: dict[str, str]) -> dict[str, str]:
    """The file's ties (a key stored once -> under its first name), {} for version 1."""
    try:
        ties = json.loads(metadata.get("ties", "{}"))
    except ValueError:
        raise _bad(path, "metadata 'ties' is not JSON") from None
    if not isinstance(ties, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ties.items()):
        raise _bad(path, "metadata 'ties' is not a map of tensor names")
    return ties


def _restore_ties(path: Path, metadata: dict[str, str], tensors: dict) -> None:
    """Give each tied key the tensor it is stored under (the same tensor object; or the same
    (dtype, shape) for a header's)."""
    for key, source in _ties(path, metadata).items():
        if key in tensors or source not in tensors:
            raise _bad(path, f"tie {key} -> {source}: {'the tied name has its own tensor' if key in tensors else 'no such tensor'}")
        tensors[key] = tensors[source]


def _retie(model: nn.Module, ties: dict[str, str]) -> None:
    """Make each tied parameter of `model` the very Parameter of its source again (a skeleton
    that was not tied, or a load that copied into two), as the float model had them."""
    params = dict(model.named_parameters(remove_duplicate=False)) if ties else {}
    for key, source in ties.items():
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner)
        target = params.get(source)  # a buffer tie needs no re-tying: both keys were given one tensor
        if target is not None and getattr(module, attr) is not target:
            setattr(module, attr, target)


def _validate_embedding(path: Path, e: EmbeddingEntry, tensors: dict[str, torch.Tensor]) -> None:
    """A quantized embedding's table `(num, dim)` int8 and its scales `(num,)`, finite and positive."""
    for suffix, (dtype, shape) in {"weight": (torch.int8, (e.num_embeddings, e.embedding_dim)),
                                   "weight_scale": (torch.float32, (e.num_embeddings,))}.items():
        t = tensors.get(f"{e.name}.{suffix}")
        if t is None:
            raise _bad(path, f"embedding {e.name!r} has no tensor {e.name}.{suffix}")
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise _bad(path, f"{e.name}.{suffix} is {t.dtype} {tuple(t.shape)}, the plan says {dtype} {shape}")
    scale = tensors[f"{e.name}.weight_scale"]
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise _bad(path, f"{e.name}.weight_scale has values that are not finite and positive")


def verify_payload(path: Path, header: SafetensorsHeader) -> None:
    """Recompute the sha256 of the tensor payload and of the `header` (the file's, read), and
    compare them with the ones its metadata records."""
    metadata = header.metadata
    for key in HASH_KEYS:
        if not metadata.get(key):
            raise _bad(path, f"records no {key} to verify against")
    with path.open("rb") as f:
        f.seek(8 + header.size)
        payload = hashlib.file_digest(f, "sha256").hexdigest()
    for what, actual, recorded in (
        ("tensor payload", payload, metadata["payload_sha256"]),
        ("header (tensor names, shapes, offsets, metadata)", header_digest(header.raw), metadata["header_sha256"]),
    ):
        if actual != recorded:
            raise _bad(path, f"{what} sha256 {actual[:12]}... does not match the recorded {recorded[:12]}...: the file was changed or damaged")


def _check_against_header(path: Path, plan: Plan, header: SafetensorsHeader, metadata: dict[str, str], export: bool) -> None:
    """The plan against the file's header, before any tensor is read: every layer's weight is
    in the file, a quantized layer's with the dtype and shape its plan entry says (what the plan
    claims is backed by the file's bytes), and what reading takes (the file's tensors, plus what
    unpacking and conversion make from them) is within `max_memory`."""
    shapes = {k: (e.torch_dtype, e.shape) for k, e in header.tensors.items()}
    _restore_ties(path, metadata, shapes)  # the ties' names and sources, checked as they will be on the tensors
    grows = 0
    for e in plan.entries:
        suffix, dtype, shape = ("weight", None, None) if e.scheme is None else (
            stored_weight(e) if export else ("weight", *_stored_weight_shape(e)))
        found = shapes.get(f"{e.name}.{suffix}") or (shapes.get(f"{e.name}.weight") if e.scheme is None else None)
        if found is None:
            raise _bad(path, f"layer {e.name!r} has no tensor {e.name}.{suffix}")
        if dtype is not None and found != (dtype, shape):
            raise _bad(path, f"{e.name}.{suffix} is {found[0]} {found[1]}, the plan says {dtype} {shape}")
        if e.scheme is not None:
            values = e.out_features * e.in_features
            scales = math.prod(e.scheme.granularity.scale_shape((e.out_features, e.in_features)))
            grows += (values if e.scheme.bits < 8 or suffix == "weight_packed" else 0) + (5 * scales if export else 0)
    check_budget(header.nbytes + grows, f"qlin file {path}")


def _not_safetensors(path: Path, exc: BaseException) -> str:
    """Why `path` does not read as a qlin file, in words a person acts on: a float checkpoint
    (torch.save writes a zip, or an older pickle) is named as one, with what to give instead."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError:
        magic = b""
    fix = "give the .safetensors file (or compressed-tensors folder) that `qlin quantize` wrote"
    if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
        return f"a PyTorch checkpoint (torch.save), not a qlin file: {fix}, or quantize this one first"
    return f"not a valid safetensors file ({one_line(exc, 120)}), so no qlin file: {fix}"


def _open_qfile(path: str | Path, verify: bool) -> tuple[Path, Path | None, SafetensorsHeader, dict[str, str], bool]:
    """(weights file, the folder or None, its header, qlin's metadata, whether it is a
    compressed-tensors export) of a qlin file or a folder qlin wrote, from its header alone."""
    path = Path(path)
    folder = path if path.is_dir() else None
    path = check_file(path if folder is None else export_weights(folder), "qlin file")
    try:
        header = read_header(path)
    except (OSError, ValueError) as exc:
        raise _bad(path, _not_safetensors(path, exc)) from None
    metadata = header.metadata
    export = metadata.get("format") != FORMAT and QLIN_PLAN in metadata
    if export:
        if verify:
            raise ConfigError(f"`verify` checks qlin files; {folder or path} is a compressed-tensors export, which records no payload sha256")
        metadata = export_metadata(metadata)
    elif folder is not None:
        raise _bad(folder, "a compressed-tensors folder that this qlin did not write (its weights hold no qlin "
                           "plan); transformers loads it (with compressed-tensors installed)")
    elif metadata.get("format") != FORMAT:
        raise _bad(path, "not a qlin file (its metadata has no format=qlin); is it a float checkpoint?")
    return path, folder, header, metadata, export


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a qlin file or a compressed-tensors folder qlin wrote, from the header
    alone: no tensor is read (`read_qfile` reads and validates them all)."""
    return _open_qfile(path, verify=False)[3]


def read_qfile(path: str | Path, *, verify: bool = False, unpack: bool = True, mapped: bool = True) -> QFile:
    """Open and validate a qlin file, or a compressed-tensors folder qlin wrote (or its weights
    file): its plan against the header's names, dtypes and shapes and `max_memory` before any
    tensor is read, then every tensor against the plan; the payload's sha256 against the
    recorded one with `verify` (a qlin file only). A layer narrower than 8 bits holds its weight
    as int8 values (N, K); with `unpack=False`, as the file packs it (uint8, validated), which
    `load_quantized` unpacks one layer at a time. `mapped`: the tensors are views of the file
    mapped into memory, its pages read as they are used (`inspect` reads little of a file);
    False reads each into memory of its own, as a model that keeps them needs (a map that its
    tensors keep alive keeps every page that loading read resident)."""
    path, folder, header, metadata, export = _open_qfile(path, verify)
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise _bad(path, f"format_version {metadata.get('format_version')!r} is not a number") from None
    if version > FORMAT_VERSION:
        raise _bad(path, f"written in qlin format version {version}; this qlin reads up to {FORMAT_VERSION}: upgrade qlin")
    if version < 1:
        raise _bad(path, f"format_version {version} is not valid")
    try:
        config = QuantConfig.from_dict(json.loads(metadata["config"]))
        plan_data = json.loads(metadata["plan"])
        embeddings_data = json.loads(metadata.get("embeddings", "[]"))
    except KeyError as exc:
        raise _bad(path, f"metadata has no {exc.args[0]!r}") from None
    except (ValueError, RecursionError, ConfigError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise _bad(path, f"metadata config/plan is invalid ({str(exc)[:160]})") from None
    try:
        if not isinstance(embeddings_data, list):
            raise ValueError("metadata embeddings is not a list of embeddings")
        plan = Plan(Plan.from_list(plan_data).entries, tuple(EmbeddingEntry.from_dict(e) for e in embeddings_data))
    except ValueError as exc:
        raise _bad(path, str(exc)) from None
    _check_against_header(path, plan, header, metadata, export)
    try:
        tensors = _mapped_tensors(path) if mapped else _read_tensors(path, header)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as exc:
        raise _bad(path, f"not a valid safetensors file ({one_line(exc)})") from None
    if export:
        _, tensors = from_export(path, header.metadata, tensors, plan)
    _restore_ties(path, metadata, tensors)
    for e in plan.quantized:
        _validate_layer(path, e, tensors, unpack)
    for e in plan.quantized_embeddings:
        _validate_embedding(path, e, tensors)
    quantized_names = {e.name for e in plan.quantized} | {e.name for e in plan.quantized_embeddings}
    for key in tensors:
        layer, _, suffix = key.rpartition(".")
        if suffix in LAYER_TENSORS[1:] and suffix != "bias" and layer not in quantized_names:
            raise _bad(path, f"tensor {key} belongs to no quantized layer of the plan")
    if verify:
        verify_payload(path, header)
    return QFile(path, metadata, config, plan, tensors)


def _mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _read_tensors(path: Path, header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    """Every tensor of the file in memory of its own, read (not mapped: a tensor the model keeps
    would keep the whole map and every page of it that loading read, the codes its kernels packed
    included, resident: an int8 weight-only model held 2x its panels)."""
    with open(path, "rb", buffering=0) as f:
        return {key: read_tensor(f, path, header, key) for key in header.tensors}


@torch.no_grad()
def load_quantized(
    model: nn.Module, path: str | Path | QFile, *, device: torch.device | str = "cpu", verify: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Turn a float model skeleton (same architecture as the quantized one) into the int8 model
    stored at `path` (a qlin file, a compressed-tensors folder qlin wrote, or a `read_qfile`
    result), packed for `device`. Changes `model` in place and returns it (a new module if the
    model itself is one quantized `nn.Linear`).

    The skeleton's parameters may be on the meta device (build it under `empty_weights()`): its
    Linear layers are replaced and every other tensor is materialised from the file, so the float
    weights are never allocated. Shapes and dtypes are always checked; with `verify` the payload's
    sha256 too. `compile` returns `qlinear.compile_model(model)`: the first call compiles (tens of
    seconds), later calls run the fused graph.

    No copy: the model takes the tensors read from the file, and a layer narrower than 8 bits is
    unpacked just before its kernel packs it, so the peak is about the file's size plus one
    layer's temporaries. Given a `QFile`, the model shares its tensors, which that QFile keeps
    alive (`read_qfile`'s default maps the file: read it with `unpack=False, mapped=False` to load
    as from a path)."""
    model = _load_packed(model, path, device, verify)
    # the memory loading freed (the file's unpacked codes, the tensors a kernel absorbed) back to
    # the system, once nothing of the load holds it: glibc keeps freed blocks, and a 4-bit model
    # stayed ~7x its weights' size without this (RESULTS.md "lowbit-memory"); trimmed inside the
    # load, the state_dict it held kept an 8-layer Llama's int8 weight-only model at 1.5x
    _release_freed_memory()
    return compile_model(model.eval()) if compile else model.eval()


def _load_packed(model: nn.Module, path: str | Path | QFile, device: torch.device | str, verify: bool) -> nn.Module:
    """load_quantized's work: the file's layers swapped into `model`, every tensor loaded, the
    layers packed for `device`."""
    qf = path if isinstance(path, QFile) else read_qfile(path, verify=verify, unpack=False, mapped=False)
    state = dict(qf.tensors)
    model, swapped, packed_codes = _swap_in(model, qf, state)  # (a real skeleton's float layers freed)
    later = {f"{alias}.weight" for _, paths in packed_codes.values() for alias in paths}
    skeleton_ties = _assign(model, qf, state, later)
    state.clear()  # the model holds the only references now (but for a caller's QFile), so each
    if qf is not path:  # layer's unpacked codes are freed as soon as its kernel has packed them
        qf.tensors.clear()
    _retie(model, {**skeleton_ties, **_ties(qf.path, qf.metadata)})
    for q in list(packed_codes):  # one layer's int8 values at a time, freed once its kernel packed them
        q._buffers["weight"] = unpack_bits(packed_codes.pop(q)[0], q.scheme.bits, q.in_features)
        q.pack(device)
    model.to(device)
    pack_all([q for q in swapped if q._run is None], device)
    return model


def _swap_in(model: nn.Module, qf: QFile, state: dict[str, torch.Tensor]
             ) -> tuple[nn.Module, list[QuantizedLinear], dict[QuantizedLinear, tuple[torch.Tensor, tuple[str, ...]]]]:
    """The file's quantized layers and int8 tables put in `model`'s place, built on the meta
    device (the file's tensors replace their buffers: zero-filled ones were a model's worth of
    memory); a shared layer's tensors entered in `state` under each of its names. Returns the
    model, the layers, and those whose weight `state` held as the file's packed bytes, taken out
    of `state` (their codes and names: unpacked when the layer packs)."""
    found = find_linears(model)
    linears = {name: m for name, m, _, _ in found}
    aliases = {name: sorted(a) for name, _, a, _ in found}
    swapped = []
    packed_codes: dict[QuantizedLinear, tuple[torch.Tensor, tuple[str, ...]]] = {}
    for e in qf.plan.quantized:
        linear = linears.get(e.name)
        if linear is None or layer_shape(linear) != (e.in_features, e.out_features) or layer_kind(linear) != e.module:
            raise FormatError(
                f"{qf.path}: the model has no {'nn.Linear' if e.module == 'Linear' else e.module} {e.name!r} of shape "
                f"({e.out_features}, {e.in_features}); is it the model the file was made from?"
            )
        if sorted(e.aliases) != aliases[e.name]:
            raise FormatError(
                f"{qf.path}: layer {e.name!r} is shared at {list(e.aliases)} in the file but at "
                f"{aliases[e.name]} in the model; is it the model the file was made from?"
            )
        with torch.device("meta"):
            q = QuantizedLinear(e.in_features, e.out_features, e.scheme, bias=e.has_bias, dtype=linear.weight.dtype)
        weight = state.get(f"{e.name}.weight")
        if e.scheme.bits < 8 and weight is not None and weight.dtype == torch.uint8:
            packed_codes[q] = (state.pop(f"{e.name}.weight"), e.paths)
        for alias in e.paths:
            model = swap_module(model, alias, q)
            if alias != e.name:
                for suffix in LAYER_TENSORS:
                    if f"{e.name}.{suffix}" in state:
                        state[f"{alias}.{suffix}"] = state[f"{e.name}.{suffix}"]
        swapped.append(q)
    for e in qf.plan.quantized_embeddings:
        table = dict(model.named_modules()).get(e.name)
        if not isinstance(table, nn.Embedding) or (table.num_embeddings, table.embedding_dim) != (e.num_embeddings, e.embedding_dim):
            raise FormatError(
                f"{qf.path}: the model has no nn.Embedding {e.name!r} of shape ({e.num_embeddings}, "
                f"{e.embedding_dim}); is it the model the file was made from?")
        with torch.device("meta"):
            qtable = QuantizedEmbedding(e.num_embeddings, e.embedding_dim, padding_idx=table.padding_idx,
                                        dtype=getattr(torch, e.dtype))
        model = swap_module(model, e.name, qtable)
    return model, swapped, packed_codes


def _assign(model: nn.Module, qf: QFile, state: dict[str, torch.Tensor], later: set[str]) -> dict[str, str]:
    """`state`'s tensors made `model`'s own (load_state_dict(assign=True): no second copy), every
    key but those in `later` (filled when their layer packs); converted first where the model's
    dtype differs, as copying into it did. Returns the ties the skeleton had, which assigning
    breaks (each key gets its tensor), for `_retie`."""
    targets = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(targets) - set(state) - later), sorted(set(state) - set(targets))
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise FormatError(
            f"{qf.path} does not fit the model: {len(missing)} missing and {len(unexpected)} "
            f"unexpected tensors (e.g. {first!r})"
        )
    _refuse_unfilled_meta(model, targets)
    skeleton_ties = tied_keys(targets.items())
    converted: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # once a tensor (a tied one stays one)
    for key, target in targets.items():
        t = state.get(key)
        if t is not None and (t.dtype != target.dtype or not t.is_contiguous()):
            if (id(t), target.dtype) not in converted:
                converted[id(t), target.dtype] = t.to(target.dtype).contiguous()
            state[key] = converted[id(t), target.dtype]
    try:
        model.load_state_dict(state, strict=not later, assign=True)  # (`later`: the only keys missing)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise FormatError(f"{qf.path} does not fit the model: {lines[0] if lines else exc}") from None
    return skeleton_ties


def _refuse_unfilled_meta(model: nn.Module, targets: dict[str, torch.Tensor]) -> None:
    """Refuse a meta-device parameter or buffer of `model` that the state dict does not fill (a
    non-persistent buffer, which the file cannot hold) before anything is loaded."""
    in_state = {id(t) for t in targets.values()}
    for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        if t.is_meta and id(t) not in in_state:
            raise InputError(
                f"the model's {name!r} is on the meta device and not in the file (a buffer the model computes "
                "when it is built): build the skeleton under qlin_cli.empty_weights(), which keeps buffers real"
            )


# The public name of `hf.parameters_on_meta` (streaming builds its skeletons with it too): build
# a skeleton for `load_quantized` without its weights, every parameter on the meta device and
# buffers (e.g. position ids computed in `__init__`) real:
#
#     with empty_weights():
#         skeleton = build_model()          # or AutoModelForCausalLM.from_config(config)
#     model = load_quantized(skeleton, "model.int8.safetensors")
empty_weights = parameters_on_meta
