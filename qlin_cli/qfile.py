"""The qlin file (safetensors, format version 1): write atomically and deterministically, read
with validation, and load into a float model skeleton.

Per quantized layer `<name>`: `<name>.weight` int8 `(out, in)`, `<name>.weight_scale` float32
`()` or `(out,)`, `<name>.weight_zero_point` int8 of the scale's shape, `<name>.bias` (float,
unchanged, if the layer has one); static mode adds `<name>.input_scale` float32 `()` and
`<name>.input_zero_point` int8 `()`, SmoothQuant `<name>.smooth_scale` float32 `(in,)`.
Every other tensor of the model as in its float state dict.
`__metadata__`: format, format_version, qlin_version, torch_version, source_name,
source_sha256, config (JSON), plan (JSON list, one entry per nn.Linear).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .config import Granularity, QuantConfig
from .errors import ConfigError, FormatError, OutputError
from .qlinear import QuantizedLinear, pack_all
from .swap import QuantizeResult, find_linears, swap_module

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "QFile",
    "save_quantized",
    "read_qfile",
    "load_quantized",
    "write_atomic",
    "verify_payload",
    "check_output",
    "check_parent",
]

FORMAT = "qlin"
FORMAT_VERSION = 1
LAYER_TENSORS = ("weight", "weight_scale", "weight_zero_point", "bias", "input_scale", "input_zero_point", "smooth_scale")


def _version() -> str:
    from . import __version__

    return __version__


def check_output(path: str | Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an output that is an input, exists without `force`, or whose folder is missing."""
    path = Path(path)
    for src in inputs:
        if path.resolve() == Path(src).resolve():
            raise OutputError(f"output {path} is the input file; choose another -o")
    if path.is_dir():
        raise OutputError(f"output {path} is a directory")
    if path.exists() and not force:
        raise OutputError(f"output {path} exists; pass --force to overwrite it")
    check_parent(path)
    return path


def check_parent(path: Path) -> None:
    """The folder an output goes into must exist, be a folder and be writable."""
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"output folder {parent} is a file, not a folder")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable")


def write_atomic(path: str | Path, data: bytes | Callable[[BinaryIO], None], *, force: bool) -> Path:
    """Write `data` (bytes, or a function that writes into the open file) to a temporary file in
    `path`'s folder, then move it into place: readers see the old file or the whole new one,
    never a part. Without `force` an existing file is kept."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    # The name is chosen before the file exists, so a Ctrl-C at any point after this line
    # reaches the `finally` that removes it (mkstemp could be interrupted after creating it).
    tmp = str(folder / f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise OutputError(f"cannot write in {folder}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobber
            except FileExistsError:
                raise OutputError(f"output {path} exists; pass --force to overwrite it") from None
            except OSError:
                if path.exists():
                    raise OutputError(f"output {path} exists; pass --force to overwrite it") from None
                os.replace(tmp, path)  # filesystems without hard links
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_HASH_KEYS = ("payload_sha256", "header_sha256")


def _header_digest(header: dict) -> str:
    """sha256 of the header's meaning: every tensor's name, dtype, shape and offsets, and all
    metadata but the two hashes (so renaming or swapping tensors is caught, not only bit flips)."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k not in _HASH_KEYS}
    body = {**{k: v for k, v in header.items() if k != "__metadata__"}, "__metadata__": meta}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# safetensors' names of the dtypes a model holds
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.int64: "I64", torch.float32: "F32", torch.int32: "I32",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (native, i.e. little-endian, order), without a copy
    (writable: reading into it fills the tensor)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def safetensors_writer(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, digests: bool = False
) -> Callable[[BinaryIO], None]:
    """A function that writes `tensors` (contiguous, on CPU, not sharing memory) as a safetensors
    file with a canonical header, so that the same content always gives the same bytes.

    Layout: tensors by element size (largest first, so each starts aligned to its element size
    after the 8-byte-padded header), then by name; the header lists them in that order after the
    sorted `__metadata__`. With `digests`, the metadata gains `payload_sha256` (every byte after
    the header) and `header_sha256` (_header_digest). The tensors stream from their own memory
    into the file: safetensors' `save` builds the whole file in memory, and re-heading it took
    two more copies (BERT-base: +530 MB peak RSS and 2 s for a 182 MB file).
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, dict] = {}
    offset = 0
    for key in order:
        t = tensors[key]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise OutputError(f"tensor {key} has dtype {t.dtype}, which safetensors cannot store")
        end = offset + t.numel() * t.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    meta = dict(metadata)
    if digests:
        payload = hashlib.sha256()
        for key in order:
            payload.update(tensor_bytes(tensors[key]))
        meta["payload_sha256"] = payload.hexdigest()
        meta["header_sha256"] = _header_digest({**header, "__metadata__": meta})
    text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header},
                      separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)

    def write(f: BinaryIO) -> None:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key in order:
            f.write(tensor_bytes(tensors[key]))

    return write


def _file_tensors(model: nn.Module, plan: list[dict]) -> dict[str, torch.Tensor]:
    """The model's state dict as the file stores it: aliases of a quantized layer dropped, every
    tensor contiguous, on CPU, and owning its memory (safetensors refuses shared storage)."""
    alias_prefixes = tuple(f"{a}." for e in plan if e["status"] == "quantized" for a in e["aliases"])
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if alias_prefixes and key.startswith(alias_prefixes):
            continue
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


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
    plan = result.plan()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "qlin_version": _version(),
        "torch_version": torch.__version__,
        "source_name": source_name,
        "source_sha256": source_sha256,
        "config": result.config.to_json(),
        "plan": json.dumps(plan, sort_keys=True, separators=(",", ":")),
    }
    writer = safetensors_writer(_file_tensors(result.model, plan), metadata, digests=True)
    return write_atomic(path, writer, force=force)


@dataclass
class QFile:
    """A validated qlin file."""

    path: Path
    metadata: dict[str, str]
    config: QuantConfig
    plan: list[dict]
    tensors: dict[str, torch.Tensor]

    @property
    def quantized(self) -> list[dict]:
        return [e for e in self.plan if e["status"] == "quantized"]


def _bad(path: Path, msg: str) -> FormatError:
    return FormatError(f"{path}: {msg}")


def _validate_layer(path: Path, e: dict, tensors: dict[str, torch.Tensor]) -> None:
    name, out_f, in_f = e["name"], e["out_features"], e["in_features"]
    if out_f < 1 or in_f < 1:
        raise _bad(path, f"layer {name!r} has shape ({out_f}, {in_f})")
    try:  # the layer's scheme must be one qlin can run
        scheme = QuantConfig(
            mode=e.get("mode"), granularity=e.get("granularity"), symmetric=e.get("symmetric"),
            act_granularity=e.get("act_granularity"), kernel=e.get("kernel_request"),
            weight_observer=e.get("weight_observer", "minmax"), observer=e.get("observer") or "minmax",
            smooth=e.get("smooth"),
        )
    except (ConfigError, TypeError) as exc:
        raise _bad(path, f"layer {name!r} has an invalid scheme ({exc})") from None
    if scheme.act_granularity != e.get("act_granularity") or not isinstance(e.get("dtype", "float32"), str):
        raise _bad(path, f"layer {name!r} has an invalid scheme")
    dtype = getattr(torch, e.get("dtype", "float32"), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise _bad(path, f"layer {name!r} has dtype {e.get('dtype')!r}, not a float dtype")
    gran = scheme.granularity
    want = {
        "weight": (torch.int8, (out_f, in_f)),
        "weight_scale": (torch.float32, gran.scale_shape((out_f, in_f))),
        "weight_zero_point": (torch.int8, gran.scale_shape((out_f, in_f))),
    }
    if scheme.mode == "static":
        want.update(input_scale=(torch.float32, ()), input_zero_point=(torch.int8, ()))
    if e.get("smooth") is not None:
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
    if e["has_bias"] != (bias is not None):
        raise _bad(path, f"layer {name!r}: bias {'missing' if e['has_bias'] else 'unexpected'}")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (out_f,)):
        raise _bad(path, f"{name}.bias is {bias.dtype} {tuple(bias.shape)}, expected float ({out_f},)")
    for suffix in ("weight_scale", "input_scale", "smooth_scale"):
        t = tensors.get(f"{name}.{suffix}")
        if suffix in want and (not bool(torch.isfinite(t).all()) or bool((t <= 0).any())):
            raise _bad(path, f"{name}.{suffix} has values that are not finite and positive")


_PLAN_FIELDS = {"name": str, "in_features": int, "out_features": int, "has_bias": bool, "status": str, "aliases": list}


def verify_payload(path: Path, metadata: dict[str, str]) -> None:
    """Recompute the sha256 of the tensor payload and of the header, and compare them with the
    recorded ones."""
    for key in _HASH_KEYS:
        if not metadata.get(key):
            raise _bad(path, f"records no {key} to verify against")
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        payload = hashlib.file_digest(f, "sha256").hexdigest()
    for what, actual, recorded in (
        ("tensor payload", payload, metadata["payload_sha256"]),
        ("header (tensor names, shapes, offsets, metadata)", _header_digest(header), metadata["header_sha256"]),
    ):
        if actual != recorded:
            raise _bad(path, f"{what} sha256 {actual[:12]}... does not match the recorded {recorded[:12]}...: the file was changed or damaged")


def read_qfile(path: str | Path, *, verify: bool = False) -> QFile:
    """Open and validate a qlin file: names, dtypes and shapes against its plan, always; the
    payload's sha256 against the recorded one with `verify`."""
    from .sources import check_file

    path = check_file(path, "qlin file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise _bad(path, f"not a valid safetensors file ({msg})") from None
    if metadata.get("format") != FORMAT:
        raise _bad(path, "not a qlin file (its metadata has no format=qlin); is it a float checkpoint?")
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
        plan = json.loads(metadata["plan"])
    except KeyError as exc:
        raise _bad(path, f"metadata has no {exc.args[0]!r}") from None
    except (ValueError, RecursionError, ConfigError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise _bad(path, f"metadata config/plan is invalid ({str(exc)[:160]})") from None
    if not isinstance(plan, list) or not all(isinstance(e, dict) for e in plan):
        raise _bad(path, "metadata plan is not a list of layers")
    for e in plan:
        for key, typ in _PLAN_FIELDS.items():
            if not isinstance(e.get(key), typ) or (typ is int and isinstance(e.get(key), bool)):
                raise _bad(path, f"plan entry {e.get('name', '?')!r} has no valid {key!r}")
        if not all(isinstance(a, str) for a in e["aliases"]):
            raise _bad(path, f"plan entry {e['name']!r} has aliases that are not module paths")
    quantized_names = set()
    for e in plan:
        if e["status"] == "quantized":
            _validate_layer(path, e, tensors)
            quantized_names.add(e["name"])
    for key in tensors:
        layer, _, suffix = key.rpartition(".")
        if suffix in LAYER_TENSORS[1:] and suffix != "bias" and layer not in quantized_names:
            raise _bad(path, f"tensor {key} belongs to no quantized layer of the plan")
    if verify:
        verify_payload(path, metadata)
    return QFile(path, metadata, config, plan, tensors)


@torch.no_grad()
def load_quantized(
    model: nn.Module, path: str | Path, *, device: torch.device | str = "cpu", verify: bool = False
) -> nn.Module:
    """Turn a float model skeleton (same architecture as the quantized one) into the int8 model
    stored at `path`, packed for `device`. Changes `model` in place and returns it (a new module
    if the model itself is one quantized `nn.Linear`). Shapes and dtypes are always checked; with
    `verify` the payload's sha256 too."""
    qf = read_qfile(path, verify=verify)
    found = find_linears(model)
    linears = {name: m for name, m, _, _ in found}
    aliases = {name: sorted(a) for name, _, a, _ in found}
    state = dict(qf.tensors)
    swapped = []
    for e in qf.quantized:
        linear = linears.get(e["name"])
        if linear is None or (linear.in_features, linear.out_features) != (e["in_features"], e["out_features"]):
            raise FormatError(
                f"{qf.path}: the model has no nn.Linear {e['name']!r} of shape "
                f"({e['out_features']}, {e['in_features']}); is it the model the file was made from?"
            )
        if sorted(e["aliases"]) != aliases[e["name"]]:
            raise FormatError(
                f"{qf.path}: layer {e['name']!r} is shared at {e['aliases']} in the file but at "
                f"{aliases[e['name']]} in the model; is it the model the file was made from?"
            )
        q = QuantizedLinear(
            e["in_features"], e["out_features"], bias=e["has_bias"], mode=e["mode"],
            granularity=Granularity(e["granularity"]), symmetric=e["symmetric"],
            act_granularity=e["act_granularity"], kernel=e["kernel_request"],
            dtype=linear.weight.dtype, smooth=e.get("smooth") is not None,
        )
        for alias in [e["name"], *e["aliases"]]:
            model = swap_module(model, alias, q)
            if alias != e["name"]:
                for suffix in LAYER_TENSORS:
                    if f"{e['name']}.{suffix}" in state:
                        state[f"{alias}.{suffix}"] = state[f"{e['name']}.{suffix}"]
        swapped.append(q)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise FormatError(
            f"{qf.path} does not fit the model: {len(missing)} missing and {len(unexpected)} "
            f"unexpected tensors (e.g. {first!r})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise FormatError(f"{qf.path} does not fit the model: {lines[0] if lines else exc}") from None
    model.to(device)
    pack_all(swapped, device)
    return model.eval()
