"""`min_sqnr` and `sensitivity` block by block: the accuracy fallback (fallback.py's steps,
unchanged) measured on a model whose weights stay on disk.

Every measurement of fallback.py is the model's output SQNR on the measurement data with some set
of layers in int8 and the others float: the model as it stands (`measure`), or each layer alone
(`sensitivities`). Block by block, a set of such sets is one pass (`_Passes.outputs`): the data,
captured at the first block, goes through each block in turn, read once from the file for all
the sets, each set with its own int8 layers swapped in; sets that agree on the layers up to a
block share its run (the sensitivities of the layers of block 9 share the float run of blocks
0-8), so the sensitivities of every layer cost one read of the file and half the block runs of
the whole-model path's, which runs the whole model once per layer. The float model's output on
the data (the reference) is spilled to disk a batch at a time.

Held in memory, besides one block and the activations: every int8 layer (about the output file's
size: the fallback swaps them in and out), and one copy of the data's activations per set in the
pass; a pass holds at most as many copies as fit in the size of the largest block (or 256 MiB,
`PASS_BYTES`, where that is more), and more sets are measured in several passes (each a read of
the file).

The file is the whole-model path's wherever its calibration is (`sequential.propagation`: float
outputs); the output SQNRs are the whole-model path's to float rounding (each batch's norms are
added up), and the very numbers where the data is one batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from .data import Inputs, batches, first_tensor, run_model
from .errors import ConfigError
from .fallback import _Swappable, _widen, fall_back
from .plan import Plan, swap_module
from .primitives import _db
from .quantize import Fallback, QuantizeResult, Sensitivity, _release_freed_memory
from .report import OutputComparison
from .sequential import _capture_all, _fed, _Replay, _run_block, _Run, _tail

__all__ = ["StreamedFallback", "StreamedSwaps", "check_measurable", "fall_back_streamed"]


# the activations a pass may hold, where the largest block is smaller: a pass reads every block
PASS_BYTES = 1 << 28


class _Passes:
    """The data `inputs` run through the model of `run` (a `sequential._Run` whose blocks are
    done) block by block, with sets of layers in int8 (`outputs`)."""

    def __init__(self, run: _Run, layers: dict[str, _Swappable], inputs: Inputs) -> None:
        self.run, self.layers, self.inputs = run, layers, inputs
        self.chunks = list(batches(inputs, run.batch_size))
        last = len(run.blocks.modules)
        # where each layer runs: -1 before the blocks, i in block i, `last` after them
        self.where = {name: self._where(name, last) for name in layers}
        # sets a pass takes: the data's activations measured at the first block, float
        self.size = self._per_pass(_capture_all(run.source, run.blocks, [(inputs, run.batch_size)], set())[0])

    def _where(self, name: str, last: int) -> int:
        i = self.run.blocks.index_of(name)
        if i is not None:
            return i
        return -1 if any(p in self.run.ran for p in self.layers[name].paths) else last

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
        return sum(c.args[0].nbytes if c.args else c.kwargs["hidden_states"].nbytes for c in calls)

    def _per_pass(self, calls: list) -> int:
        """How many sets a pass takes: as many copies of the activations as fit in the largest
        block's size, or in `PASS_BYTES` where that is more (at least one)."""
        biggest = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in self.run.blocks.modules)
        return max(1, max(biggest, PASS_BYTES) // max(1, self._stream_bytes(calls)))

    def outputs(self, sets: list[frozenset[str]]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(set index, batch index, the model's output on that batch with that set's layers in
        int8), batch by batch, each batch's sets in order; in passes of `size` sets."""
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
                streams[pre] = _capture_all(run.source, blocks, [(self.inputs, run.batch_size)], set())[0]
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
                for j, chunk in enumerate(self.chunks):
                    for k, s in enumerate(sets):
                        replay.output = streams[self._upto(s, last)][j]
                        with self._int8(s - self._upto(s, last)):
                            out = first_tensor(run_model(model, chunk, "model"))[0].float()
                        yield k, j, out
            finally:
                for i, block in enumerate(blocks.modules):
                    swap_module(model, blocks.prefix(i), block)


class StreamedSwaps:
    """fallback.py's `_Swaps` for a model quantized block by block (`sequential._Run`, its int8
    layers kept): which layers are int8 is a set of names, and each measurement a pass
    (`_Passes`) against the float model's output on `inputs`, spilled a batch at a time."""

    def __init__(self, run: _Run, layers: list[_Swappable], inputs: Inputs, what: str = "eval") -> None:
        self.run, self.layers, self.what = run, layers, what
        self.on = {layer.name for layer in layers}  # the layers in int8 now
        self.passes = _Passes(run, {layer.name: layer for layer in layers}, inputs)
        for _, j, out in self.passes.outputs([frozenset()]):
            run.spill.put(self._reference(j), out)

    def _reference(self, j: int) -> str:
        return f"\0{self.what} reference {j}"

    def put(self, layer: _Swappable, int8: bool) -> None:
        (self.on.add if int8 else self.on.discard)(layer.name)

    def widen(self, layer: _Swappable, device: Any) -> None:
        with self.run.source.loaded(layer.float, layer.name):
            _widen(layer, device)

    def _sqnrs(self, sets: list[frozenset[str]]) -> list[float]:
        """The output SQNR (dB) with each set's layers in int8: `sqnr_db` of the whole output,
        its norms added up batch by batch."""
        signal, noise = [0.0] * len(sets), [0.0] * len(sets)
        reference, at = None, None
        for k, j, out in self.passes.outputs(sets):
            if at != j:
                reference, at = self.run.spill.get(self._reference(j)), j
            noise[k] += float(torch.linalg.vector_norm(reference - out)) ** 2
            signal[k] += float(torch.linalg.vector_norm(reference)) ** 2
        return [_db(s, n) for s, n in zip(signal, noise)]

    def measure(self) -> float:
        return self._sqnrs([frozenset(self.on)])[0]

    def sensitivities(self, which: list[_Swappable]) -> list[_Swappable]:
        for layer, db in zip(which, self._sqnrs([frozenset({layer.name}) for layer in which])):
            layer.alone_sqnr_db = db
        return sorted(which, key=lambda layer: (layer.alone_sqnr_db, layer.name))

    def compare(self, comparison: Any) -> None:
        """The float model's output against the model as it stands, batch by batch, into
        `comparison` (report.OutputComparison)."""
        for _, j, out in self.passes.outputs([frozenset(self.on)]):
            comparison.add(self.run.spill.get(self._reference(j)), out)


def check_measurable(plan: Plan) -> None:
    """ConfigError where the fallback cannot be measured block by block: AWQ's folds change the
    modules around a layer, so its float layer is no longer the one on disk."""
    awq = [e.name for e in plan.quantized if e.scheme.awq]
    if awq:
        raise ConfigError(f"`min_sqnr`/`sensitivity` with AWQ (layer {awq[0]}) cannot run with `stream`: its folds "
                          "change the float model, which stays on disk; quantize without `stream`")


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
    layers = [_Swappable(r.name, r.plan.paths, run.model.get_submodule(r.name), run.int8[r.name], r)
              for r in before.quantized]
    swaps = StreamedSwaps(run, layers, inputs)
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
        probe, comparison = StreamedSwaps(run, layers, run.probe, "probe"), OutputComparison()
        probe.on = set(swaps.on)
        probe.compare(comparison)
        probe_metrics = comparison.metrics()
    return StreamedFallback(after.fallback, after.sensitivity), probe_metrics
