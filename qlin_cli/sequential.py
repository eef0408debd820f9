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
outputs, and one block with its int8 copy and one batch's activations through it; plus the kept
activations of the calibration and probe batches, at most `KEEP_BYTES` of them.

What the next block is fed (`propagation`), a property of the rounding methods in the plan:
- `float`: the float block's outputs, the very activations the whole-model path's calibration
  sees (it runs the float model once), batch for batch: the file is byte-identical to the one the
  whole-model path writes (round to nearest, SmoothQuant, static mode).
- `quantized`: with any layer rounded by GPTQ, the quantized block's outputs, as GPTQ's paper
  (and GPTQModel, llm-compressor) run it: each layer's statistic then holds the error of the
  blocks before it, which GPTQ compensates. The file differs from the whole-model path's, whose
  GPTQ statistics come from the float model.
AWQ's search and folds read the block's own inputs either way (AutoAWQ feeds float outputs).
The probe is carried through twice, float and int8, whatever the propagation, in batches of
`batch_size` (the whole-model path runs it as one batch: so does this one where a planned
kernel is not batch-invariant, `probe_batch_size`) and compared a few samples at a time.

The activations kept between blocks (each batch's arguments to the next block, the last block's
outputs) stay in memory up to `KEEP_BYTES`; beyond, they wait in temporary files beside the
output (`_Stash`), read back a batch at a time.

The blocks' keyword arguments (attention mask, position embeddings) are the first block's for
every block: a model whose blocks take different ones (transformers' `layer_types` mixing
sliding and full attention) is not run block by block (`block_problem`).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .config import QuantConfig
from .data import Inputs, Progress, StopForward, batches, first_tensor, num_samples, run_model
from .errors import InputError, one_line
from .files import Spill
from .kernels.select import select_kernel
from .plan import Plan, find_linears, swap_module
from .qfile import save_streamed
from .quantize import LayerResult, QuantizeResult, _release_freed_memory, quantize_model
from .report import OutputComparison
from .sources import LazySource

__all__ = ["Blocks", "find_blocks", "block_problem", "propagation", "PROPAGATION_NOTES", "SequentialResult",
           "quantize_sequential"]

FLOAT, QUANTIZED = "float", "quantized"
PROPAGATION_NOTES = {  # what a block's calibration statistics come from, as the report says it
    FLOAT: "float outputs of the blocks before (block by block; the activations the whole-model path sees)",
    QUANTIZED: "quantized outputs of the blocks before (block by block, with GPTQ layers, as in GPTQ's paper)",
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


def _block_lists(model: nn.Module) -> list[tuple[int, str, nn.ModuleList]]:
    """Every nn.ModuleList of children of one class, each holding a Linear layer: (how many
    Linear layers it holds, its path, it)."""
    linears = [name for name, *_ in find_linears(model)]
    found = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 1 or len({type(c) for c in m}) != 1:
            continue
        counts = [sum(n.startswith(f"{path}.{i}." if path else f"{i}.") for n in linears) for i in range(len(m))]
        if min(counts) > 0:
            found.append((sum(counts), path, m))
    return found


def find_blocks(model: nn.Module) -> Blocks | None:
    """The list of blocks (`_block_lists`) that holds the most Linear layers of the model (a
    transformer's layers); None if it has none."""
    found = _block_lists(model)
    if not found:
        return None
    _, path, m = max(found, key=lambda f: f[0])
    return Blocks(path, tuple(m))


def block_problem(model: nn.Module, blocks: Blocks | None, plan: Plan) -> str | None:
    """Why `model` cannot be quantized block by block (None: it can)."""
    if blocks is None:
        return "its Linear layers do not sit in a repeated list of blocks"
    others = [p for _, p, _ in _block_lists(model) if not (p + ".").startswith(blocks.path + ".")
              and not (blocks.path + ".").startswith(p + ".")]
    if others:
        return f"it has two lists of blocks ({blocks.path}, {others[0]}), the second fed by more than the first's outputs"
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

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

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
    """The block's output on one batch; the heap its temporaries freed given back (glibc keeps
    freed blocks under its mmap threshold: with batches of long windows that held a third of
    the peak)."""
    try:
        out = block(*c.args, **c.kwargs)
        _release_freed_memory()
        return out
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


# the activations kept between blocks (every calibration and probe batch's arguments and
# outputs) stay in memory up to this many bytes; more wait in temporary files beside the output
# (`_Stash`), one batch in memory at a time
KEEP_BYTES = 1 << 26


@dataclass(frozen=True)
class _Parked:
    """A tensor that waits in a `_Stash`'s file under `key`."""

    key: str


class _Stash:
    """A list of batches (a block's arguments, `_Call`s, or its outputs) whose tensors wait in a
    temporary file beside the output (`files.Spill`), read back one batch at a time: the
    activations of a long calibration set, bounded by a batch in memory. The file goes when the
    stash is closed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.spill = Spill(folder).__enter__()
        self.items: list[Any] = []

    def append(self, value: Any) -> None:
        j, tensors = len(self.items), itertools.count()

        def park(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                key = f"{j} {next(tensors)}"
                self.spill.put(key, v)
                return _Parked(key)
            return _mapped(v, park)

        self.items.append(park(value))

    def __getitem__(self, j: int) -> Any:
        def fetch(v: Any) -> Any:
            return self.spill.get(v.key) if isinstance(v, _Parked) else _mapped(v, fetch)

        return fetch(self.items[j])

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return (self[j] for j in range(len(self)))

    def close(self) -> None:
        self.spill.__exit__(None, None, None)


def _mapped(v: Any, f: Callable[[Any], Any]) -> Any:
    """`v` with `f` applied to each element of its containers (a `_Call`, a tuple or list, a dict
    or ModelOutput); anything else as it is."""
    if isinstance(v, _Call):
        return _Call(f(v.args), f(v.kwargs))
    if type(v) in (tuple, list):
        return type(v)(f(x) for x in v)
    if isinstance(v, dict):
        mapped = {k: f(x) for k, x in v.items()}
        return mapped if type(v) is dict else type(v)(**mapped)
    return v


def _batches_like(batches: Any) -> Any:
    """An empty list of batches kept where `batches` are kept: a `_Stash` beside theirs, or a list."""
    return _Stash(batches.folder) if isinstance(batches, _Stash) else []


def _stashed(batches: list[Any], folder: Path) -> _Stash:
    stash = _Stash(folder)
    for b in batches:
        stash.append(b)
    return stash


def _nbytes(value: Any) -> int:
    """The bytes of the tensors in `value` (containers as `_mapped` walks them)."""
    total = [0]

    def count(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            total[0] += v.nbytes
        else:
            _mapped(v, count)
        return v

    count(value)
    return total[0]


def _run_block(block: nn.Module, calls: Any, what: str) -> Any:
    """The block's output on each batch of `calls`, kept where they are kept."""
    outputs = _batches_like(calls)
    for c in calls:
        outputs.append(_call(block, c, what))
    return outputs


def _fed(calls: Any, outputs: Any) -> Any:
    """The next block's arguments: these, with the hidden states replaced by `outputs`'."""
    fed = _batches_like(calls)
    for c, o in zip(calls, outputs):
        fed.append(c.fed(first_tensor(o)[0]))
    return fed


def _close(*lists: Any) -> None:
    """Close the stashes among `lists` (their files go)."""
    for b in lists:
        if isinstance(b, _Stash):
            b.close()


def _same(a: Inputs | None, b: Inputs) -> bool:
    """Whether inputs `a` are `b` itself, or views of the very same tensors (the probe cut from
    the calibration data where it holds all of it)."""
    if a is None:
        return False
    if isinstance(a, dict) != isinstance(b, dict) or (isinstance(a, dict) and a.keys() != b.keys()):
        return False
    pairs = [(a[k], b[k]) for k in a] if isinstance(a, dict) else [(a, b)]
    return all(x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype
               for x, y in pairs)


@dataclass(frozen=True)
class SequentialResult:
    """What `quantize_sequential` gives: the file's result; the probe's error (`compare_outputs`'
    metrics; None: not measured, for `probe_note`) and where in the output it was found; the
    propagation."""

    result: QuantizeResult
    probe_metrics: dict[str, float | None] | None
    compared: str | None
    probe_note: str
    propagation: str


# float values of the probe's output compared at a time: a language model's logits of long
# probe windows (12 x 1024 x 32000 floats, 1.6 GB) are compared a few samples at a time
PROBE_VALUES = 1 << 24


def _take(value: Any, rows: slice) -> Any:
    """The samples `rows` of a batch: of inputs (a tensor, or a dict of them) or of a block's
    output (a tensor, or a tuple/list holding tensors); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value[rows]
    if isinstance(value, dict):  # a dict of inputs, or a ModelOutput (a dict subclass)
        taken = {k: _take(v, rows) for k, v in value.items()}
        return taken if type(value) is dict else type(value)(**taken)
    if isinstance(value, (tuple, list)):
        return type(value)(_take(x, rows) for x in value)
    return value


def probe_batch_size(plan: Plan, probe: Inputs | None, batch_size: int) -> int:
    """The batches a probe runs in block by block: `batch_size`, or all of it at once where a
    planned layer's kernel is not batch-invariant (per-tensor activation scales: then the error
    is the whole-model path's, which runs the probe as one batch)."""
    if probe is None:
        return batch_size
    for e in plan.quantized:
        if not select_kernel(e.scheme, device="cpu", dtype=e.torch_dtype, in_features=e.in_features,
                             out_features=e.out_features).batch_invariant:
            return max(1, num_samples(probe))
    return batch_size


def output_parts(model: nn.Module, replay: "_Replay", finals: Any, inputs: Inputs, batch_size: int
                 ) -> tuple[str, list[tuple[int, slice, Inputs]]]:
    """Where in the model's output it is compared, and the parts its outputs on `inputs` are
    computed and compared in: each batch of `batch_size` samples (whose last block outputs are
    `finals`, given back by `replay`) whole, or cut into parts of at most `PROBE_VALUES` output
    values (one sample's output is weighed first): (batch, samples of it, their inputs)."""
    replay.output = _take(finals[0], slice(0, 1))
    first, compared = first_tensor(run_model(model, next(batches(inputs, 1))))
    per_sample = max(1, first.numel())
    del first
    parts: list[tuple[int, slice, Inputs]] = []
    for j, chunk in enumerate(batches(inputs, batch_size)):
        n = num_samples(chunk)
        step = n if per_sample * n <= PROBE_VALUES else max(1, PROBE_VALUES // per_sample)
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            parts.append((j, sl, chunk if step == n else _take(chunk, sl)))
    return compared, parts


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


def _outside(source: LazySource, blocks: Blocks) -> list[tuple[str, nn.Module]]:
    """The modules outside the blocks that own parameters on disk (meta), by path."""
    inside = {id(m) for b in blocks.modules for m in b.modules()}
    return [(name, m) for name, m in source.model.named_modules()
            if id(m) not in inside and any(p.device.type == "meta" for p in m._parameters.values() if p is not None)]


@contextlib.contextmanager
def _read_when_called(source: LazySource, modules: list[tuple[str, nn.Module]], ran: set[str]) -> Iterator[None]:
    """Each of `modules` with its own parameters read for the time of its forward only (an
    embedding table is in memory while it runs, not with the head); the paths of those that ran
    are added to `ran`."""
    open_: dict[int, list] = {}

    def load(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            ctx = source.loaded(module, name, recurse=False)
            ctx.__enter__()
            open_.setdefault(id(module), []).append(ctx)
            ran.add(name)
        return hook

    def drop(module: nn.Module, args: Any, output: Any) -> None:
        if open_.get(id(module)):
            open_[id(module)].pop().__exit__(None, None, None)

    with contextlib.ExitStack() as stack:
        for name, m in modules:
            stack.callback(m.register_forward_pre_hook(load(name)).remove)
            stack.callback(m.register_forward_hook(drop, always_call=True).remove)
        yield


@contextlib.contextmanager
def _read_all(source: LazySource, modules: list[tuple[str, nn.Module]]) -> Iterator[None]:
    """Each of `modules` with its own parameters read for the time of the `with`."""
    with contextlib.ExitStack() as stack:
        for name, m in modules:
            stack.enter_context(source.loaded(m, name, recurse=False))
        yield


@contextlib.contextmanager
def _stand_ins(modules: list[tuple[str, nn.Module]]) -> Iterator[set[int]]:
    """Each of `modules` with zeros for its parameters (one element, expanded: no memory) for
    the time of the `with`, which gives their ids: the tail runs the modules before the first
    block only for the shapes of what they give the blocks, which the replay ignores."""
    saved = []
    for _, m in modules:
        for attr, p in list(m._parameters.items()):
            if p is not None and p.device.type == "meta":
                m._parameters[attr] = nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False)
                saved.append((m, attr, p))
    try:
        yield {id(m._parameters[attr]) for m, attr, _ in saved}
    finally:
        for m, attr, p in saved:
            m._parameters[attr] = p


@contextlib.contextmanager
def _stop_once_seen(layers: list[nn.Module]) -> Iterator[None]:
    """End the forward (StopForward) when the last of `layers` is called, after the hooks that
    were there before (calibration's, which have then seen its input): the tail's calibration
    needs the layers' inputs, not a language model's logits of a calibration batch (windows x
    tokens x vocabulary floats, 5x the model's size here)."""
    waiting = {id(m) for m in layers}

    def hook(module: nn.Module, args: Any) -> None:
        waiting.discard(id(module))
        if not waiting:
            raise StopForward

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _capture_all(source: LazySource, blocks: Blocks, inputs: list[tuple[Inputs, int]], ran: set[str]
                 ) -> list[list[_Call]]:
    """`_capture` of each (inputs, batch size), the modules outside the blocks read as they run
    (`ran`: which did); a model whose forward reads a module's parameters outside that module's
    own forward gets them all read at once instead."""
    outside = _outside(source, blocks)
    try:
        with _read_when_called(source, outside, ran):
            return [_capture(source.model, blocks.modules[0], x, size) for x, size in inputs]
    except (InputError, RuntimeError, NotImplementedError):
        ran.update(name for name, _ in outside)
        with _read_all(source, outside):
            return [_capture(source.model, blocks.modules[0], x, size) for x, size in inputs]


@contextlib.contextmanager
def _tail(source: LazySource, blocks: Blocks, ran: set[str], outer: list) -> Iterator[set[int]]:
    """The modules outside the blocks for the tail, which gives the ids of the stand-in
    parameters: those that ran before the first block as zeros (`_stand_ins`; the Linear layers
    among them are quantized already, `_Run.before_blocks`), the rest read; all read where an
    AWQ layer after the blocks may fold its factors into them."""
    outside = _outside(source, blocks)
    if any(e.scheme is not None and e.scheme.awq for e in outer):
        with _read_all(source, outside):
            yield set()
        return
    with _stand_ins([(n, m) for n, m in outside if n in ran]) as zeros, \
            _read_all(source, [(n, m) for n, m in outside if n not in ran]):
        yield zeros


@torch.no_grad()
def quantize_sequential(
    source: LazySource,
    config: QuantConfig,
    plan: Plan,
    blocks: Blocks,
    output: Path,
    *,
    calib: Inputs | None,
    probe: Inputs | None,
    batch_size: int = 32,
    force: bool = False,
    source_name: str = "",
    source_sha256: str = "",
    progress: Progress | None = None,
    min_sqnr_db: float | None = None,
    sensitivity: bool = False,
    eval_inputs: Inputs | None = None,
) -> SequentialResult:
    """Quantize `source`'s model under `plan` block by block on `calib` (in batches of
    `batch_size`; None: nothing to calibrate, the blocks are quantized without running) and
    write the qlin file at `output` (module docstring). `probe`: inputs, run in batches of
    `batch_size` too (`probe_batch_size`), to compare the float and the int8 model's outputs on
    (None: not measured; the whole-model path runs it as one batch: with more than one, of
    batch-invariant kernels only, the error is the same to float rounding). `min_sqnr_db`,
    `sensitivity`: fallback.py's accuracy fallback, measured block by block on `eval_inputs`
    (sequential_fallback.py). On the CPU: the activations kept between blocks are the
    calibration and probe batches' (in temporary files beyond `KEEP_BYTES`)."""
    with Spill(output.parent) as spill:
        measured = min_sqnr_db is not None or sensitivity
        run = _Run(source, config, plan, blocks, spill, calib, probe, batch_size, keep_int8=measured)
        try:
            run.capture()
            run.before_blocks()
            for i in range(len(blocks.modules)):
                run.block(i)
                if progress is not None:
                    progress(sum(len(run.inside.get(j, [])) for j in range(i + 1)), len(plan.entries), blocks.prefix(i))
            metrics, compared = run.tail()
        finally:
            run.close()
        fallback = None
        if measured:
            from .sequential_fallback import fall_back_streamed  # it builds on this module
            fallback, metrics = fall_back_streamed(run, plan, eval_inputs, min_sqnr_db, sensitivity, metrics)
        final = Plan(tuple(run.results[e.name].plan for e in plan.entries))
        result = save_streamed(source.model, config, final, ((run.results[e.name], None) for e in plan.entries),
                               lambda key: spill.get(key) if key in spill else source.tensor(key), output,
                               force=force, source_name=source_name, source_sha256=source_sha256)
    if fallback is not None:
        result = replace(result, fallback=fallback.fallback, sensitivity=fallback.sensitivity)
    return SequentialResult(result, metrics, compared, run.note, run.spread)


class _Run:
    """One block-by-block run's state (`quantize_sequential` calls its stages in order):
    `calls`, the calibration batches' arguments to the next block (`finals`: the last block's
    outputs); `probes`, the probe's float and int8 arguments (then outputs), or None."""

    def __init__(self, source: LazySource, config: QuantConfig, plan: Plan, blocks: Blocks, spill: Spill,
                 calib: Inputs | None, probe: Inputs | None, batch_size: int, keep_int8: bool = False) -> None:
        self.source, self.model, self.config, self.blocks, self.spill = source, source.model, config, blocks, spill
        self.calib, self.probe, self.batch_size = calib, probe, batch_size
        self.spread = propagation(plan)
        self.chunks = [] if calib is None else list(batches(calib, batch_size))  # none: nothing to calibrate
        self.probe_batch = probe_batch_size(plan, probe, batch_size)
        self.inside: dict[int | None, list] = {}
        for e in plan.entries:
            self.inside.setdefault(blocks.index_of(e.name), []).append(e)
        self.results: dict[str, LayerResult] = {}
        # the float layers outside the blocks by path (every path of a layer), swapped back at the end
        self.floats: dict[str, nn.Module] = {}
        self.int8: dict[str, nn.Module] | None = {} if keep_int8 else None  # the int8 layers, for the fallback
        self.ran: set[str] = set()  # the modules outside the blocks that run before the first
        self.note = ""
        # the probe is the calibration data in the same batches, whose float outputs the blocks compute anyway
        self.shared = (calib is not None and _same(probe, calib) and self.spread == FLOAT
                       and (self.probe_batch == batch_size or len(self.chunks) == 1))
        self.calls: Any = []  # each list of batches: a list, or a `_Stash` (`park`)
        self.probes: list[Any] | None = None
        self.finals: Any = []
        self.park = False  # whether the activations wait in temporary files (`KEEP_BYTES`)

    def capture(self) -> None:
        """The calibration batches (and the probe) run up to the first block."""
        sets = [] if self.calib is None else [(self.calib, self.batch_size)]
        if self.probe is not None and not self.shared:
            sets.append((self.probe, self.probe_batch))
        try:
            found = _capture_all(self.source, self.blocks, sets, self.ran)
        except InputError as exc:
            if self.calib is not None and len(sets) == 1:
                raise
            self.note, self.probe = f"{exc}; pass --inputs FILE to measure it", None
            found = _capture_all(self.source, self.blocks, sets[:-1], self.ran)
        self.park = sum(_nbytes(c) for calls in found for c in calls) > KEEP_BYTES
        self.calls = [] if self.calib is None else self._kept(found[0])
        if self.probe is not None:
            first = self.calls if self.shared else self._kept(found[-1])
            self.probes = [first, first]

    def _kept(self, batches: list[Any]) -> Any:
        """`batches` as the run keeps them: in a `_Stash` where the activations are large."""
        return _stashed(batches, self.spill.folder) if self.park else batches

    def close(self) -> None:
        """Close the stashes left (their files go)."""
        _close(self.calls, self.finals, *(self.probes or ()))

    def before_blocks(self) -> None:
        """The Linear layers that run before the first block (an input projection): calibrated on
        the capture's run, its output the first block's input; then the int8 probe (and, fed
        quantized outputs, the calibration batches) captured again through them."""
        first = [e for e in self.inside.get(None, []) if any(p in self.ran for p in e.paths)]
        if not first:
            return
        modules = [(n, m) for n, m in _outside(self.source, self.blocks) if n in self.ran]
        with _read_all(self.source, modules):
            def run(j: int) -> torch.Tensor:
                c = _capture(self.model, self.blocks.modules[0], self.chunks[j], self.batch_size)[0]
                return c.hidden

            self.floats.update(_float_paths(self.model, first))
            self._quantize(dict(self.model.named_children()), run, first)
            if self.spread == QUANTIZED:
                self.calls = self._kept(_capture(self.model, self.blocks.modules[0], self.calib, self.batch_size))
            if self.probes is not None:
                self.probes[1] = self._kept(_capture(self.model, self.blocks.modules[0], self.probe, self.probe_batch))
            _spill_state(self.spill, self.model, "")  # what AWQ may have folded into them, and the int8 layers
        self.inside[None] = [e for e in self.inside[None] if e not in first]

    def block(self, i: int) -> None:
        """Block `i`: read, calibrated and quantized on its inputs, its outputs the next one's
        inputs, its tensors spilled, dropped."""
        block, prefix = self.blocks.modules[i], self.blocks.prefix(i)
        what, entries, calls, probes = f"block {prefix}", self.inside.get(i, []), self.calls, self.probes
        floats = _float_paths(self.model, entries)
        with self.source.loaded(block, prefix):
            outputs = _run_block(block, calls, what) if self.spread == FLOAT else None
            float_probe = None if probes is None else outputs if self.shared else _run_block(block, probes[0], what)
            self._quantize({prefix: block}, lambda j: _call(block, calls[j], what), entries)
            if self.spread == QUANTIZED:
                outputs = _run_block(block, calls, what)
            int8_probe = None if probes is None else _run_block(block, probes[1], what)
            _spill_state(self.spill, block, prefix)
            for name, f in floats.items():  # the float layers back (at every path), to go back to meta
                swap_module(self.model, name, f)
        if i < len(self.blocks.modules) - 1:
            self.calls = _fed(calls, outputs)
            self.probes = None if probes is None else [
                self.calls if self.shared else _fed(probes[0], float_probe), _fed(probes[1], int8_probe)]
            _close(outputs, float_probe, int8_probe)
        else:  # the last block's outputs, which the tail's replay gives back
            self.finals, self.probes = outputs, None if probes is None else [float_probe, int8_probe]
        _close(calls, *(probes or ()))
        _release_freed_memory()

    def tail(self) -> tuple[dict[str, float | None] | None, str | None]:
        """The Linear layers after the blocks calibrated and quantized on the model's own forward
        with the blocks replaced by `_Replay`; the probe's error, int8 against float, and where
        in the output it was found (None: not measured)."""
        model, outer = self.model, self.inside.get(None, [])
        metrics = compared = None
        with _tail(self.source, self.blocks, self.ran, outer) as zeros:
            replay = _Replay()
            for i in range(len(self.blocks.modules)):
                swap_module(model, self.blocks.prefix(i), replay)
            try:
                probe = None if self.probes is None else self._probe_run(model, replay, self.probes[0])
                _release_freed_memory()
                if probe is not None:
                    compared, rows = probe[0], probe[1]
                planned = [model.get_submodule(e.name) for e in outer if e.scheme is not None]
                whole = not planned or any(e.scheme is not None and e.scheme.awq for e in outer)

                def run(j: int) -> Any:
                    replay.output = self.finals[j]
                    with contextlib.nullcontext() if whole else _stop_once_seen(planned):
                        try:
                            return run_model(model, self.chunks[j], "model during calibration")
                        except StopForward:
                            return None

                self.floats.update(_float_paths(model, outer))
                self._quantize(dict(model.named_children()), run, outer)
                _drop_weights([f for path, f in self.floats.items() if model.get_submodule(path) is not f])
                _release_freed_memory()  # the head's float weight and quantization temporaries
                if probe is not None:
                    comparison = OutputComparison()
                    for k, (j, sl, chunk) in enumerate(rows):
                        replay.output = _take(self.probes[1][j], sl)
                        out = first_tensor(run_model(model, chunk, "int8 model"))[0]
                        comparison.add(self.spill.get(f"\0probe {k}"), out)
                        del out
                        _release_freed_memory()
                    metrics = comparison.metrics()
                _spill_state(self.spill, model, "", skip=zeros)
                for name, f in self.floats.items():
                    swap_module(model, name, f)
            finally:
                for i, block in enumerate(self.blocks.modules):
                    swap_module(model, self.blocks.prefix(i), block)
        return metrics, compared

    def _probe_run(self, model: nn.Module, replay: _Replay, finals: Any) -> tuple[str, list[tuple[int, slice, Inputs]]]:
        """The float model's output on the probe (whose batches the blocks ran: `finals`, the last
        block's outputs), spilled a part at a time (`output_parts`): where in the output it was
        found, and the parts."""
        compared, parts = output_parts(model, replay, finals, self.probe, self.probe_batch)
        for k, (j, sl, part) in enumerate(parts):
            replay.output = _take(finals[j], sl)
            self.spill.put(f"\0probe {k}", first_tensor(run_model(model, part))[0].float())
        return compared, parts

    def _quantize(self, modules: dict[str, nn.Module], run: Callable[[int], Any], entries: list) -> None:
        """`quantize_model` on a part of the model (`modules` by path) whose forward over the
        calibration batches is `run(i)`; each int8 layer swapped into the model itself."""
        if not entries:
            return
        part = _Replayed(modules, run)
        calib = torch.arange(len(self.chunks)) if self.chunks else None
        res = quantize_model(part, self.config, calib=calib, batch_size=1,
                             plan=Plan(tuple(entries)))
        for r in res.layers:
            self.results[r.name] = r
            for path in r.plan.paths if r.plan.scheme is not None else ():
                swap_module(self.model, path, part.get_submodule(path))
            if self.int8 is not None and r.plan.scheme is not None:
                self.int8[r.name] = part.get_submodule(r.plan.paths[0])


def _drop_weights(modules: list[nn.Module]) -> None:
    """Put the parameters of `modules` (float layers their int8 copies replaced in the model) back
    on the meta device: the tail then compares the probe without the float head in memory. The
    `with` that read them restores its own meta tensors at its end."""
    for m in modules:
        for attr, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[attr] = nn.Parameter(p.to("meta"), requires_grad=False)


def _float_paths(model: nn.Module, entries: list) -> dict[str, nn.Module]:
    """The float module at every path of each of `entries` (a layer used at several paths is
    swapped at each of them, and back)."""
    return {path: model.get_submodule(path) for e in entries for path in e.paths}


def _spill_state(spill: Spill, module: nn.Module, prefix: str, skip: set[int] = frozenset()) -> None:
    """Every tensor of `module`'s state dict in memory (int8 layers and the rest, changed or
    not) but those whose ids are in `skip`, under its key in the model; the file's writer reads
    the others (meta: left on disk) from the source."""
    for key, t in module.state_dict(keep_vars=True).items():
        if t.device.type != "meta" and id(t) not in skip:
            spill.put(f"{prefix}.{key}" if prefix else key, t)
