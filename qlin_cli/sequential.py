"""Quantizing a model block by block, in bounded memory (DESIGN "The sequential pipeline"), for
a model whose Linear layers sit in a repeated list of blocks (transformers' decoder and encoder
layers: found by shape, `find_blocks`, not by architecture name) and whose weights stay on disk
(`sources.LazySource`). What `qlin quantize --stream` runs when the plan needs the model's
forward (calibration data, SmoothQuant, static mode, GPTQ, AWQ):

    capture  the tensors outside the blocks are read; the calibration (and probe) batches run
             up to the first block, whose arguments (positional and keyword) are kept; those
             tensors are dropped again
    blocks   for each block in turn: its weights are read; `quantize.quantize_model` runs on it
             alone (`_Replayed`: the kept arguments are its inputs), so SmoothQuant's ranges,
             static observers, GPTQ's statistic and AWQ's search and folds are the whole-model
             path's own code; the block's outputs become the next block's inputs; its tensors
             (int8 layers and whatever else it holds) go to a spill file; it is dropped
    tail     the tensors outside the blocks are read again and every block is replaced by a
             module that gives back the last block's output (`_Replay`): the Linear layers outside
             the blocks (a language model's head) are calibrated and quantized on the model's own
             forward, and the probe's float and int8 outputs are compared (the model-level error)
    write    the qlin file (`qfile.save_streamed`), one tensor at a time from the spill

Peak memory: the larger of the tensors outside the blocks (embeddings, head) with one batch's
outputs, and one block with its int8 copy; plus the kept activations of the calibration batches.

What the next block is fed (`propagation`), a property of the rounding methods in the plan:
- `float`: the float block's outputs, the very activations the whole-model path's calibration
  sees (it runs the float model once), batch for batch: the file is byte-identical to the one the
  whole-model path writes (round to nearest, SmoothQuant, static mode).
- `quantized`: with any layer rounded by GPTQ, the quantized block's outputs, as GPTQ's paper
  (and GPTQModel, llm-compressor) run it: each layer's statistic then holds the error of the
  blocks before it, which GPTQ compensates. The file differs from the whole-model path's, whose
  GPTQ statistics come from the float model.
AWQ's search and folds read the block's own inputs either way (AutoAWQ feeds float outputs).
The probe is carried through twice, float and int8, whatever the propagation.

The blocks' keyword arguments (attention mask, position embeddings) are the first block's for
every block: a model whose blocks take different ones (transformers' `layer_types` mixing
sliding and full attention) is not run block by block (`block_problem`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .config import QuantConfig
from .data import Inputs, Progress, StopForward, batches, first_tensor, num_samples, run_model
from .errors import InputError, one_line
from .files import Spill
from .plan import Plan, find_linears, swap_module
from .qfile import save_streamed
from .quantize import LayerResult, QuantizeResult, _release_freed_memory, quantize_model
from .sources import LazySource

__all__ = ["Blocks", "find_blocks", "block_problem", "propagation", "PROPAGATION_NOTES", "SequentialResult",
           "quantize_sequential"]

FLOAT, QUANTIZED = "float", "quantized"
PROPAGATION_NOTES = {
    FLOAT: "each block calibrated on the float outputs of the blocks before it (as the whole-model path)",
    QUANTIZED: "each block calibrated on the quantized outputs of the blocks before it (GPTQ, as in its paper)",
}


@dataclass(frozen=True)
class Blocks:
    """The model's repeated blocks: the nn.ModuleList at `path` and its children, in order."""

    path: str
    modules: tuple[nn.Module, ...]

    def prefix(self, i: int) -> str:
        return f"{self.path}.{i}" if self.path else str(i)

    def index_of(self, layer: str) -> int | None:
        """The block that holds module path `layer`, or None (outside the blocks)."""
        head = f"{self.path}." if self.path else ""
        if not layer.startswith(head):
            return None
        first = layer[len(head):].split(".", 1)[0]
        return int(first) if first.isdigit() and int(first) < len(self.modules) else None


def find_blocks(model: nn.Module) -> Blocks | None:
    """The nn.ModuleList of at least two children of one class, each holding a Linear layer,
    that holds the most Linear layers of the model (a transformer's layers); None if none."""
    linears = [name for name, *_ in find_linears(model)]
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or len({type(c) for c in m}) != 1:
            continue
        heads = [f"{path}.{i}." if path else f"{i}." for i in range(len(m))]
        counts = [sum(n.startswith(h) for n in linears) for h in heads]
        if min(counts) > 0 and (best is None or sum(counts) > best[0]):
            best = (sum(counts), path, m)
    return None if best is None else Blocks(best[1], tuple(best[2]))


def block_problem(model: nn.Module, blocks: Blocks | None, plan: Plan) -> str | None:
    """Why `model` cannot be quantized block by block (None: it can)."""
    if blocks is None:
        return "its Linear layers do not sit in a repeated list of blocks"
    kinds = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(set(kinds)) > 1:
        return f"its blocks take different attention masks (layer_types {sorted(set(kinds))})"
    for e in plan.entries:
        where = {blocks.index_of(p) for p in e.paths}
        if len(where) > 1:
            return f"layer {e.name!r} is used in more than one block"
    return None


def propagation(plan: Plan) -> str:
    """What the next block is fed: the quantized outputs where a layer rounds with GPTQ, else
    the float outputs (module docstring)."""
    return QUANTIZED if any(e.scheme.gptq for e in plan.quantized) else FLOAT


@dataclass
class _Call:
    """One batch's arguments to a block; the hidden states are the first positional argument
    or the keyword `hidden_states`."""

    args: tuple
    kwargs: dict[str, Any]

    def fed(self, hidden: torch.Tensor) -> "_Call":
        if self.args:
            return _Call((hidden, *self.args[1:]), self.kwargs)
        return _Call((), {**self.kwargs, "hidden_states": hidden})


# a block's keyword arguments that hold a cache: each block would add its keys and values to it
_CACHES = ("past_key_value", "past_key_values", "layer_past")


def _is_cache(value: Any) -> bool:
    """A key/value cache (transformers' `Cache` and its subclasses), which a block passed the
    same one twice would extend, attending to stale keys the second time."""
    return any(c.__name__ == "Cache" for c in type(value).__mro__)


def _without_cache(args: tuple, kwargs: dict[str, Any]) -> _Call:
    """A block's arguments with every cache replaced by None (and `use_cache` False): each
    replay of the call then sees its own keys and values only, as the capture did."""
    out = {k: (None if k in _CACHES or _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return _Call(tuple(None if _is_cache(a) else a for a in args), out)


def _call(block: nn.Module, c: _Call, what: str) -> Any:
    try:
        return block(*c.args, **c.kwargs)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{what} does not run on the inputs captured at the first block ({one_line(exc, 160)}); "
                         "quantize without `stream`") from None


class _Replayed(nn.Module):
    """Recorded batches run by `run(i)`, as a module that holds `modules` under their paths in
    the model: `quantize_model` (calibration, AWQ's search and folds, the swap) takes it for the
    model and `torch.arange(batches)` for its inputs, in batches of 1, and hooks, folds and
    swaps the real modules."""

    def __init__(self, modules: dict[str, nn.Module], run: Callable[[int], Any]) -> None:
        super().__init__()
        for path, module in modules.items():
            parent: nn.Module = self
            *heads, last = path.split(".")
            for h in heads:
                if h not in parent._modules:
                    parent.add_module(h, nn.Module())
                parent = parent._modules[h]
            parent.add_module(last, module)
        self._run = run

    def forward(self, index: torch.Tensor) -> Any:
        return self._run(int(index.reshape(-1)[0]))


class _Replay(nn.Module):
    """Stands for every block in the tail: whatever it is given, the last block's `output`."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _run_block(block: nn.Module, calls: list[_Call], what: str) -> list[Any]:
    return [_call(block, c, what) for c in calls]


def _fed(calls: list[_Call], outputs: list[Any]) -> list[_Call]:
    """The next block's arguments: these, with the hidden states replaced by `outputs`'."""
    return [c.fed(first_tensor(o)[0]) for c, o in zip(calls, outputs)]


@dataclass(frozen=True)
class SequentialResult:
    """What `quantize_sequential` gives: the file's result; the probe's float and int8 outputs
    (None, None: not measured, for `probe_note`) and where in the output they were found; the
    propagation."""

    result: QuantizeResult
    reference: torch.Tensor | None
    output: torch.Tensor | None
    compared: str | None
    probe_note: str
    propagation: str


def _capture(model: nn.Module, first: nn.Module, inputs: Inputs, batch_size: int) -> list[_Call]:
    """Run `inputs` in batches up to the block `first`; its arguments, one `_Call` a batch."""
    calls: list[_Call] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(_without_cache(tuple(args), kwargs))
        raise StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk in batches(inputs, batch_size):
            try:
                run_model(model, chunk, "model")
            except StopForward:
                pass
    finally:
        handle.remove()
    if len(calls) != -(-num_samples(inputs) // batch_size):
        raise InputError("the model's forward does not go through its first block")
    return calls


@contextlib.contextmanager
def _outside(source: LazySource, blocks: Blocks) -> Iterator[None]:
    """The model's tensors outside the blocks read for the time of a `with`."""
    inside = {id(m) for b in blocks.modules for m in b.modules()}
    with contextlib.ExitStack() as stack:
        for name, m in source.model.named_modules():
            if id(m) not in inside:
                stack.enter_context(source.loaded(m, name, recurse=False))
        yield


def _quantize_part(model: nn.Module, modules: dict[str, nn.Module], run: Callable[[int], Any], batches_: int,
                   config: QuantConfig, entries: list, device: torch.device) -> QuantizeResult:
    """`quantize_model` on a part of `model` (`modules` by path) whose forward over the kept
    batches is `run(i)`; each int8 layer swapped into `model` itself."""
    part = _Replayed(modules, run)
    res = quantize_model(part, config, calib=torch.arange(batches_), batch_size=1, device=device,
                         plan=Plan(tuple(entries)))
    for r in res.quantized:
        for path in r.plan.paths:
            swap_module(model, path, part.get_submodule(path))
    return res


@torch.no_grad()
def quantize_sequential(
    source: LazySource,
    config: QuantConfig,
    plan: Plan,
    blocks: Blocks,
    output: Path,
    *,
    calib: Inputs,
    probe: Inputs | None,
    batch_size: int = 32,
    force: bool = False,
    source_name: str = "",
    source_sha256: str = "",
    progress: Progress | None = None,
) -> SequentialResult:
    """Quantize `source`'s model under `plan` block by block on `calib` (in batches of
    `batch_size`) and write the qlin file at `output` (module docstring). `probe`: inputs, run
    as one batch, to compare the float and the int8 model's outputs on (None: not measured).
    On the CPU: the activations kept between blocks are the calibration batches'."""
    device = torch.device("cpu")
    model = source.model
    spread = propagation(plan)
    n_calib = -(-num_samples(calib) // batch_size)
    chunks = list(batches(calib, batch_size))
    inside: dict[int | None, list] = {}
    for e in plan.entries:
        inside.setdefault(blocks.index_of(e.name), []).append(e)
    results: dict[str, LayerResult] = {}
    note = ""
    with Spill(output.parent) as spill:
        with _outside(source, blocks):
            calls = _capture(model, blocks.modules[0], calib, batch_size)
            probes: list[list[Any]] | None = None  # the probe's float and int8 calls (then outputs)
            if probe is not None:
                try:
                    first = _capture(model, blocks.modules[0], probe, num_samples(probe))
                    probes = [first, list(first)]
                except InputError as exc:
                    note = f"{exc}; pass --inputs FILE to measure it"
        for i, block in enumerate(blocks.modules):
            prefix, what = blocks.prefix(i), f"block {blocks.prefix(i)}"
            entries = inside.get(i, [])
            floats = {e.name: model.get_submodule(e.name) for e in entries}
            with source.loaded(block, prefix):
                outputs = _run_block(block, calls, what) if spread == FLOAT else None
                float_probe = None if probes is None else _run_block(block, probes[0], what)
                res = _quantize_part(model, {prefix: block}, lambda j, c=calls: _call(block, c[j], what), n_calib,
                                     config, entries, device)
                results.update((r.name, r) for r in res.layers)
                if spread == QUANTIZED:
                    outputs = _run_block(block, calls, what)
                probe_outs = None if probes is None else [float_probe, _run_block(block, probes[1], what)]
                _spill_state(spill, block, prefix)
                for name, f in floats.items():  # the float layers back, to go back to meta
                    swap_module(model, name, f)
            if i < len(blocks.modules) - 1:
                calls = _fed(calls, outputs)
                if probes is not None:
                    probes = [_fed(c, o) for c, o in zip(probes, probe_outs)]
            else:  # the last block's outputs, which the tail's replay gives back
                finals, probes = outputs, probe_outs
            del res
            _release_freed_memory()
            if progress is not None:
                progress(sum(len(inside.get(j, [])) for j in range(i + 1)), len(plan.entries), prefix)
        reference = out = compared = None
        with _outside(source, blocks):
            replay = _Replay()
            for i in range(len(blocks.modules)):
                swap_module(model, blocks.prefix(i), replay)
            try:
                if probes is not None:
                    replay.output = probes[0][0]
                    reference, compared = first_tensor(run_model(model, probe))
                    reference = reference.float().clone()

                def tail(j: int) -> Any:
                    replay.output = finals[j]
                    return run_model(model, chunks[j], "model during calibration")

                outer = inside.get(None, [])
                floats = {e.name: model.get_submodule(e.name) for e in outer}
                if outer:
                    res = _quantize_part(model, dict(model.named_children()), tail, n_calib, config, outer, device)
                    results.update((r.name, r) for r in res.layers)
                if probes is not None:
                    replay.output = probes[1][0]
                    out = first_tensor(run_model(model, probe, "int8 model"))[0].float().clone()
                _spill_state(spill, model, "")
                for name, f in floats.items():
                    swap_module(model, name, f)
            finally:
                for i, block in enumerate(blocks.modules):
                    swap_module(model, blocks.prefix(i), block)
        final = Plan(tuple(results[e.name].plan for e in plan.entries))
        result = save_streamed(model, config, final, ((results[e.name], None) for e in plan.entries),
                               lambda key: spill.get(key) if key in spill else source.tensor(key), output,
                               force=force, source_name=source_name, source_sha256=source_sha256)
    return SequentialResult(result, reference, out, compared, note, spread)


def _spill_state(spill: Spill, module: nn.Module, prefix: str) -> None:
    """Every tensor of `module`'s state dict (int8 layers and the rest, changed or not), under
    its key in the model."""
    for key, t in module.state_dict().items():
        spill.put(f"{prefix}.{key}" if prefix else key, t)
