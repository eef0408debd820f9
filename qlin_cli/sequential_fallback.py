"""`min_sqnr` and `sensitivity` block by block: the accuracy fallback (fallback.py's steps,
unchanged) measured on a model whose weights stay on disk.

Every measurement of fallback.py is the model's output SQNR on the measurement data with some set
of layers in int8 and the others float: the model as it stands (`measure`), or each layer alone
(`sensitivities`). Block by block, a set of such sets is one pass (`_Passes.outputs`): the data,
captured at the first block, goes through each block in turn, read once from the file for all
the sets, each set with its own int8 layers swapped in; sets that agree on the layers up to a
block share its run (the sensitivities of the layers of block 9 share the float run of blocks
0-8), so the sensitivities of every layer cost one read of the file where their activations fit
in a pass (below), and half the block runs of the whole-model path's, which runs the whole model
once per layer.

Held in memory, besides one block: every int8 layer (from the first block on, about the output
file's size: the fallback swaps them in and out), and one copy of the data's activations per set
in the pass (two while a block runs: its inputs and outputs); a pass holds at most as many copies
as fit in the size of the largest block (or 256 MiB, `PASS_BYTES`, where that is more), and more
sets are measured in several passes (each a read of the file). The model's outputs are computed
and compared a part at a time (`sequential.output_parts`), the reference's parts spilled.

The file is the whole-model path's wherever its calibration is (`sequential.propagation`: float
outputs); the output SQNRs are the whole-model path's to float rounding (each part's norms are
added up), and the very numbers where the data is one part.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .data import Inputs, first_tensor, run_model
from .fallback import _Swappable, _widen, fall_back
from .plan import Plan, swap_module
from .primitives import _db
from .quantize import Fallback, QuantizeResult, Sensitivity, _release_freed_memory
from .report import OutputComparison
from .sequential import _capture_all, _fed, _Replay, _run_block, _Run, _tail, _take, output_parts

__all__ = ["StreamedFallback", "StreamedSwaps", "fall_back_streamed"]


# the activations a pass may hold, where the largest block is smaller: a pass reads every block
PASS_BYTES = 1 << 28


class _Passes:
    """The data `inputs` run through the model of `run` (a `sequential._Run` whose blocks are
    done) block by block, with sets of layers in int8 (`outputs`)."""

    def __init__(self, run: _Run, layers: dict[str, _Swappable], inputs: Inputs, batch_size: int) -> None:
        self.run, self.layers, self.inputs, self.batch_size = run, layers, inputs, batch_size
        # where each layer runs: -1 before the blocks (called on the way to the first), i in
        # block i, after them the number of blocks
        inside = {name: run.blocks.index_of(name) for name in layers}
        outside = {name: layer for name, layer in layers.items() if inside[name] is None}
        called: set[str] = set()
        with contextlib.ExitStack() as stack:
            for name, layer in outside.items():
                stack.callback(layer.float.register_forward_pre_hook(lambda m, a, name=name: called.add(name)).remove)
            calls = _capture_all(run.source, run.blocks, [(inputs, batch_size)], set())[0]
        self.where = {name: i if i is not None else -1 if name in called else len(run.blocks.modules)
                      for name, i in inside.items()}
        self.size = self._per_pass(calls)  # sets a pass takes: from the data's activations at the first block
        self.parts: list | None = None  # the parts the outputs are compared in (`sequential.output_parts`)

    def _upto(self, names: frozenset[str], i: int) -> frozenset[str]:
        return frozenset(n for n in names if self.where[n] <= i)

    @contextlib.contextmanager
    def _int8(self, names: frozenset[str]) -> Iterator[None]:
        """`names` swapped to their int8 modules for the time of the `with`."""
        model = self.run.model
        try:
            for n in names:
                for path in self.layers[n].paths:
                    swap_module(model, path, self.layers[n].int8)
            yield
        finally:
            for n in names:
                for path in self.layers[n].paths:
                    swap_module(model, path, self.layers[n].float)

    def _stream_bytes(self, calls: list) -> int:
        return sum(c.hidden.nbytes for c in calls)

    def _per_pass(self, calls: list) -> int:
        """How many sets a pass takes: as many copies of the activations as fit in the largest
        block's size, or in `PASS_BYTES` where that is more (at least one)."""
        biggest = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in self.run.blocks.modules)
        return max(1, max(biggest, PASS_BYTES) // max(1, self._stream_bytes(calls)))

    def outputs(self, sets: list[frozenset[str]]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(set index, part index, the model's output on that part with that set's layers in
        int8), part by part (`sequential.output_parts`: batches, cut where their outputs are
        large), each part's sets in order; in passes of `size` sets."""
        done = 0
        while done < len(sets):
            group = sets[done:done + self.size]
            for k, j, out in self._pass(group):
                yield done + k, j, out
            done += len(group)

    def _pass(self, sets: list[frozenset[str]]) -> Iterator[tuple[int, int, torch.Tensor]]:
        run, blocks = self.run, self.run.blocks
        last = len(blocks.modules) - 1
        streams: dict[frozenset[str], list] = {}
        for pre in {self._upto(s, -1) for s in sets}:  # the data at the first block
            with self._int8(pre):
                streams[pre] = _capture_all(run.source, blocks, [(self.inputs, self.batch_size)], set())[0]
        for i, block in enumerate(blocks.modules):
            prefix, nxt = blocks.prefix(i), {}
            with run.source.loaded(block, prefix):
                for s in sets:
                    key, before = self._upto(s, i), self._upto(s, i - 1)
                    if key in nxt:
                        continue
                    calls = streams[before]
                    with self._int8(key - before):
                        outs = _run_block(block, calls, f"block {prefix}")
                    nxt[key] = outs if i == last else _fed(calls, outs)
            streams = nxt
            _release_freed_memory()
        model = run.model
        with _tail(run.source, blocks, run.ran, run.inside.get(None, [])):
            replay = _Replay()
            for i in range(len(blocks.modules)):
                swap_module(model, blocks.prefix(i), replay)
            try:
                if self.parts is None:  # weighed once (a one-sample forward), the same for every pass
                    _, self.parts = output_parts(model, replay, streams[self._upto(sets[0], last)], self.inputs,
                                                 self.batch_size)
                for p, (j, rows, part) in enumerate(self.parts):
                    for k, s in enumerate(sets):
                        replay.output = _take(streams[self._upto(s, last)][j], rows)
                        with self._int8(s - self._upto(s, last)):
                            out = first_tensor(run_model(model, part, "model"))[0].float()
                        yield k, p, out
            finally:
                for i, block in enumerate(blocks.modules):
                    swap_module(model, blocks.prefix(i), block)


class StreamedSwaps:
    """fallback.py's `_Swaps` for a model quantized block by block (`sequential._Run`, its int8
    layers kept): which layers are int8 is a set of names, and each measurement a pass
    (`_Passes`) against the float model's output on `inputs` (in batches of `batch_size`),
    spilled a part at a time, with its sum of squares."""

    def __init__(self, run: _Run, layers: list[_Swappable], inputs: Inputs, batch_size: int, what: str = "eval") -> None:
        self.run, self.layers, self.what = run, layers, what
        self.on = {layer.name for layer in layers}  # the layers in int8 now
        self.passes = _Passes(run, {layer.name: layer for layer in layers}, inputs, batch_size)
        self.signal: list[float] = []  # each part's sum of squares, as `sqnr_db` reduces it
        for _, p, out in self.passes.outputs([frozenset()]):
            run.spill.put(self._reference(p), out)
            self.signal.append(float(torch.linalg.vector_norm(out)) ** 2)

    def _reference(self, p: int) -> str:
        return f"\0{self.what} reference {p}"

    def put(self, layer: _Swappable, int8: bool) -> None:
        (self.on.add if int8 else self.on.discard)(layer.name)

    def widen(self, layer: _Swappable, device: Any) -> None:
        with self.run.source.loaded(layer.float, layer.name):
            _widen(layer, device)

    def _sqnrs(self, sets: list[frozenset[str]]) -> list[float]:
        """The output SQNR (dB) with each set's layers in int8: `sqnr_db` of the whole output,
        its norms added up part by part."""
        noise = [0.0] * len(sets)
        reference, at = None, None
        for k, p, out in self.passes.outputs(sets):
            if at != p:
                reference, at = self.run.spill.get(self._reference(p)), p
            noise[k] += float(torch.linalg.vector_norm(reference - out)) ** 2
        return [_db(sum(self.signal), n) for n in noise]

    def measure(self) -> float:
        return self._sqnrs([frozenset(self.on)])[0]

    def sensitivities(self, which: list[_Swappable]) -> list[_Swappable]:
        for layer, db in zip(which, self._sqnrs([frozenset({layer.name}) for layer in which])):
            layer.alone_sqnr_db = db
        return sorted(which, key=lambda layer: (layer.alone_sqnr_db, layer.name))

    def compare(self, comparison: Any) -> None:
        """The float model's output against the model as it stands, part by part, into
        `comparison` (report.OutputComparison)."""
        for _, p, out in self.passes.outputs([frozenset(self.on)]):
            comparison.add(self.run.spill.get(self._reference(p)), out)


@dataclass(frozen=True)
class StreamedFallback:
    """What `fall_back_streamed` measured: fallback.py's record of the steps and sensitivities."""

    fallback: Fallback | None
    sensitivity: Sensitivity | None


def fall_back_streamed(run: _Run, plan: Plan, inputs: Inputs, min_sqnr_db: float | None, sensitivity: bool,
                       probe_metrics: dict[str, float | None] | None
                       ) -> tuple[StreamedFallback, dict[str, float | None] | None]:
    """fallback.py's fallback on `run`'s model (its blocks and tail done, its int8 layers kept),
    measured on `inputs`: each widened layer's tensors spilled again, each layer put back in
    float taken out of the spill (the file then reads its weights from the source), `run.results`
    updated; the probe's error measured again where a layer changed (else `probe_metrics`)."""
    before = QuantizeResult(run.model, run.config, tuple(run.results[e.name] for e in plan.entries))
    # the int8 layers move from the run to the fallback (a widened layer's old one then goes)
    layers = [_Swappable(r.name, r.plan.paths, run.model.get_submodule(r.name), run.int8.pop(r.name), r)
              for r in before.quantized]
    swaps = StreamedSwaps(run, layers, inputs, run.batch_size)
    after = fall_back(before, swaps, min_sqnr_db, sensitivity, "cpu")
    by_name = {layer.name: layer for layer in layers}
    changed = [r for r in after.layers if r is not run.results[r.name]]
    for r in changed:
        run.spill.drop(r.name)
        if r.plan.scheme is not None:  # widened to 8 bits
            for key, t in by_name[r.name].int8.state_dict().items():
                run.spill.put(f"{r.name}.{key}", t)
        run.results[r.name] = r
    if changed and probe_metrics is not None:
        probe = StreamedSwaps(run, layers, run.probe, run.probe_batch, "probe")
        comparison = OutputComparison()
        probe.on = set(swaps.on)
        probe.compare(comparison)
        probe_metrics = comparison.metrics()
    return StreamedFallback(after.fallback, after.sensitivity), probe_metrics
