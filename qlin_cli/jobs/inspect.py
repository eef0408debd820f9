"""The inspect job (`inspect_path`): a quantized model's metadata and every layer's tensors,
scheme and kernel here (`InspectRow`s), or a float checkpoint's Linear layers and the scale shape
each would get; and `is_quantized`, which tells the two apart."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..budget import limit
from ..errors import ConfigError, InputError
from ..files import size_bytes
from ..kernels import KernelChoice, select_kernel
from ..plan import EmbeddingEntry, PlanEntry, find_linears, layer_shape
from ..qfile import QFile, read_qfile
from ..report import FloatInspectReport, InspectReport, InspectRow
from ..scheme import PerGroup
from ..sources import QLIN_FILE, SourceKind, load_source, read_checkpoint, what_is
from .options import check_device

__all__ = ["inspect_path", "is_quantized"]


def is_quantized(path: Path) -> bool:
    """True for what `read_qfile` reads (a qlin file, or a compressed-tensors export's folder or
    weights file), and for any other quantized model folder (which it refuses with the reason)."""
    try:
        return what_is(path, "file").quantized
    except InputError:
        return False


def inspect_path(
    path: str | Path, *, model: str | None = None, trust_pickle: bool = False, device: str = "cpu",
    verify: bool = False, group_size: int | None = None, max_memory: int | None = None,
) -> InspectReport | FloatInspectReport:
    """Describe a quantized model (a qlin file or a compressed-tensors folder qlin wrote: its
    metadata, every layer's tensors and this machine's kernel) or a float one (a checkpoint or a
    Hugging Face model folder: its Linear layers and the scale shape each would get, per group of
    `group_size` too). `verify` also recomputes a qlin file's payload sha256 (a mismatch is a
    FormatError). `max_memory`: the most bytes of tensors the file may describe (default: half the
    physical memory, budget.py)."""
    path = Path(path)
    with limit(max_memory):
        dev = check_device(device)
        not_qlin = ConfigError(f"`verify` checks qlin files; {path} is not one")
        try:
            kind = what_is(path, "file")
        except InputError:  # not a model path at all: `verify` says so first
            if verify:
                raise not_qlin from None
            raise
        if not kind.quantized:
            if verify:
                raise not_qlin
            return _inspect_float(kind, model, trust_pickle, group_size)
        qf = read_qfile(path, verify=verify)
        layers = [_linear_row(e, qf, dev) for e in qf.plan.entries] + [_embedding_row(e, qf) for e in qf.plan.embeddings]
        meta = {k: v for k, v in sorted(qf.metadata.items()) if k not in ("config", "plan", "embeddings")}  # safetensors returns it unordered
        container = "qlin" if kind.kind == QLIN_FILE else "compressed-tensors"
        return InspectReport(str(path), meta, qf.config, layers, len(qf.tensors), size_bytes(path), verify, container)


# an int8 embedding table's rows are dequantized on lookup (qembedding.py): not a registered kernel
GATHER = KernelChoice("gather", "int8 rows dequantized on lookup", batch_invariant=True, fallback=False)


def _linear_row(e: PlanEntry, qf: QFile, dev: torch.device) -> InspectRow:
    """A Linear layer's row: for a quantized one its tensors, scheme and the kernel it gets on `dev`."""
    row = InspectRow(e.name, e.status, e.reason, (e.out_features, e.in_features), tuple(e.aliases))
    if e.scheme is None:
        return row
    scale, zp = qf.tensors[f"{e.name}.weight_scale"], qf.tensors[f"{e.name}.weight_zero_point"]
    choice = select_kernel(e.scheme, device=dev, dtype=e.torch_dtype, in_features=e.in_features,
                           out_features=e.out_features)
    bits = e.scheme.bits
    static = e.scheme.static
    return InspectRow(
        e.name, e.status, e.reason, row.weight_shape, row.aliases,
        weight_dtype="int8" if bits == 8 else f"int{bits} (packed in uint8)", scale_shape=tuple(scale.shape),
        zero_point_shape=tuple(zp.shape), scale_min=float(scale.min()), scale_max=float(scale.max()), scheme=e.scheme,
        choice=choice,
        input_scale=float(qf.tensors[f"{e.name}.input_scale"]) if static else None,
        input_zero_point=int(qf.tensors[f"{e.name}.input_zero_point"]) if static else None,
    )


def _embedding_row(e: EmbeddingEntry, qf: QFile) -> InspectRow:
    """An embedding table's row: int8 per row, dequantized on lookup, when quantized."""
    shape = (e.num_embeddings, e.embedding_dim)
    if not e.quantized:
        return InspectRow(e.name, e.status, e.reason, shape, embedding=True)
    scale = qf.tensors[f"{e.name}.weight_scale"]
    return InspectRow(e.name, e.status, e.reason, shape, embedding=True, weight_dtype="int8",
                      scale_shape=tuple(scale.shape), scale_min=float(scale.min()), scale_max=float(scale.max()),
                      choice=GATHER)


def _inspect_float(what: SourceKind, model: str | None, trust_pickle: bool, group_size: int | None
                   ) -> FloatInspectReport:
    """A float checkpoint's or model folder's Linear layers (a state dict without `model`: its
    2-D float weights), with the scale shape per group of `group_size` too."""
    path = what.path
    size = size_bytes(path)
    if model is not None or what.folder:
        source = load_source(what, model=model, trust_pickle=trust_pickle)
        obj, kind, size = source.model, source.kind if what.folder else "state dict + --model", source.size_bytes
    else:
        obj, kind = read_checkpoint(what, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        found = [(name, layer_shape(m)[::-1], type(m).__name__) for name, m, _, _ in find_linears(obj)]
        note = "nn.Linear layers of the model"
    else:
        found = [
            (k.removesuffix(".weight"), tuple(v.shape), "2-D weight")
            for k, v in obj.items() if k.endswith("weight") and v.dim() == 2 and v.is_floating_point()
        ]
        note = "2-D float weights of the state dict (Linear or Embedding: pass --model to know)"
    return FloatInspectReport(str(path), f"float ({kind})", note, found, size,
                              None if group_size is None else PerGroup(group_size).size)
