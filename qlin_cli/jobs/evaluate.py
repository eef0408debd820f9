"""The eval jobs: `evaluate_checkpoint` (the float and the int8 model on the same inputs:
errors, agreement, accuracy against labels, latency, sizes) and `evaluate_text` (on a text:
perplexity, or an encoder's embeddings), each on the pair of models `_load_pair` loads."""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from ..budget import limit
from ..data import (
    Inputs, Progress, batches, check_finite_inputs, first_tensor, model_inputs, non_finite, non_finite_error,
    num_samples, run_model, time_models,
)
from ..errors import ConfigError, InputError
from ..files import size_bytes
from ..hf import load_tokenizer
from ..qfile import load_quantized, read_metadata
from ..qlinear import QuantizedLinear, compile_model
from ..report import EvalReport, OutputComparison, TextEvalReport
from ..sources import Source, SourceKind, load_source, load_tensors, what_is
from ..text import embedding_scores, lm_scores, read_text, text_inputs
from .options import check_device
from .run_data import to_device

__all__ = ["TEXT_BATCH_SIZE", "evaluate_checkpoint", "evaluate_text"]

TEXT_BATCH_SIZE = 8  # windows per forward pass: a window's logits are (max_length, vocabulary)


class _Pair(NamedTuple):
    """The float model of a source and the int8 model of a qlin file (or compressed-tensors
    folder qlin wrote) made from it."""

    source: Source
    float_model: nn.Module
    int8_model: nn.Module
    qpath: Path
    kernels: dict[str, int]
    size_int8_bytes: int  # the file's, or the folder's files'
    source_matches: bool  # the quantized model records this source's sha256


def _load_pair(source_path: str | Path | SourceKind, quantized_path: str | Path, *, model: str | None,
               trust_pickle: bool, dev: torch.device) -> _Pair:
    source = load_source(source_path, model=model, trust_pickle=trust_pickle)
    float_model = source.model.to(dev)
    qpath = Path(quantized_path)
    int8_model = load_quantized(copy.deepcopy(float_model), qpath, device=dev)
    kernels = Counter(m.kernel.name for m in int8_model.modules() if isinstance(m, QuantizedLinear))
    return _Pair(source, float_model, int8_model, qpath, dict(sorted(kernels.items())), size_bytes(qpath),
                 read_metadata(qpath).get("source_sha256") == source.sha256)


@torch.no_grad()
def evaluate_checkpoint(
    source_path: str | Path,
    quantized_path: str | Path,
    inputs_path: str | Path,
    labels_path: str | Path | None = None,
    *,
    model: str | None = None,
    trust_pickle: bool = False,
    batch_size: int = 64,
    repeats: int = 5,
    device: str = "cpu",
    compile: bool = False,
    max_memory: int | None = None,
    progress: Progress | None = None,
) -> EvalReport:
    """Run the float and the int8 model (a qlin file or a compressed-tensors folder qlin wrote)
    on the same inputs; errors, agreement, accuracy, latency (min, median and max of the timed
    forwards, and the CPU other processes used meanwhile) and sizes. `compile` compiles both
    models (`qlinear.compile_model` for the int8 one; torch.compile for the float one, so that the
    speedup compares like with like) and reports their first call, which compiles, apart from the
    timed runs. `max_memory`: the most bytes of tensors any one file may describe (default: half
    the physical memory, budget.py). `progress(done, total, what)` follows the batches compared,
    then timed."""
    with limit(max_memory):
        if batch_size < 1 or repeats < 1:
            raise ConfigError("`batch_size` and `repeats` must be at least 1")
        dev = check_device(device)
        if progress is not None:
            progress(0, 0, "loading models")
        pair = _load_pair(source_path, quantized_path, model=model, trust_pickle=trust_pickle, dev=dev)
        runs = {"float model": pair.float_model, "int8 model": pair.int8_model}
        if compile:
            runs = {"float model": torch.compile(pair.float_model), "int8 model": compile_model(pair.int8_model)}
        inputs = model_inputs(pair.float_model, load_tensors(inputs_path, "inputs"))
        check_finite_inputs(inputs, f"inputs {inputs_path}")
        n = num_samples(inputs)
        labels = None if labels_path is None else _read_labels(labels_path, n)
        compared = _compare(runs, inputs, batch_size, dev, progress)
        if compared.non_finite is not None:
            raise non_finite_error(f"the float model's {compared.where} on inputs {inputs_path}", compared.non_finite, n)
        accuracy = (None, None) if labels is None else _accuracy(compared, labels, labels_path)
        timing = time_models(list(runs.values()), to_device(inputs, dev), batch_size, repeats, progress)
        return EvalReport(
            source=str(source_path), quantized=str(quantized_path), compared=compared.where, samples=n,
            output_shape=list(compared.comparison.shape), metrics=compared.comparison.metrics(),
            accuracy_float=accuracy[0], accuracy_int8=accuracy[1], timing=timing,
            threads=torch.get_num_threads(), size_float_bytes=pair.source.size_bytes,
            size_int8_bytes=pair.size_int8_bytes, kernels=pair.kernels, device=str(dev),
            source_matches=pair.source_matches,
            compile_s={"float": compared.first_call_s["float model"], "int8": compared.first_call_s["int8 model"]} if compile else None,
        )


def _read_labels(labels_path: str | Path, n: int) -> torch.Tensor:
    """One 1-D tensor of `n` integer class indices."""
    labels = load_tensors(labels_path, "labels")
    if isinstance(labels, dict) or labels.dim() != 1:
        raise InputError(f"labels {labels_path} must be one 1-D tensor of class indices")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise InputError(f"labels {labels_path} are {str(labels.dtype).removeprefix('torch.')}; "
                         "give integer class indices (int64)")
    if labels.shape[0] != n:
        raise InputError(f"labels {labels_path} has {labels.shape[0]} entries but the inputs have {n} samples")
    return labels


@dataclass
class _Compared:
    """Both models' outputs on the inputs, compared batch by batch: the comparison (no output
    kept), where in the output it was found, each model's top-1 class per sample for 2-D outputs
    `(N, classes)` (`(N,)` each), the float output's first NaN or Inf (data.non_finite, indices
    over all samples), and each model's first call (s)."""

    comparison: OutputComparison = field(default_factory=OutputComparison)
    where: str = "output"
    top1: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {"float model": [], "int8 model": []})
    non_finite: tuple[int, int, tuple[int, ...]] | None = None
    first_call_s: dict[str, float] = field(default_factory=dict)

    def add(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        """The next batch of the float model's and the int8 model's outputs `(n, ...)`."""
        start = self.comparison.shape[0] if self.comparison.shape else 0
        found = non_finite(ref)
        if found is not None:  # counted over all batches, the first index over all samples
            count, samples, first = self.non_finite or (0, 0, (found[2][0] + start, *found[2][1:]))
            self.non_finite = (count + found[0], samples + found[1], first)
        self.comparison.add(ref, out)
        if ref.dim() == 2:
            self.top1["float model"].append(ref.argmax(1))
            self.top1["int8 model"].append(out.argmax(1))


def _compare(runs: dict[str, nn.Module], inputs: Inputs, batch_size: int, dev: torch.device,
             progress: Progress | None) -> _Compared:
    """Both models on `inputs` in batches, each batch's outputs (as float32 on the CPU) compared
    and dropped: memory follows the batch, not the inputs (a language model's logits are
    (samples, tokens, vocabulary) per model)."""
    done = _Compared()
    chunks = -(-num_samples(inputs) // batch_size)
    for i, chunk in enumerate(batches(inputs, batch_size)):
        chunk = to_device(chunk, dev)
        outputs = {}
        for what, m in runs.items():
            t0 = time.perf_counter()
            outputs[what], done.where = first_tensor(run_model(m, chunk, what))
            done.first_call_s.setdefault(what, time.perf_counter() - t0)
        done.add(outputs["float model"].float().cpu(), outputs["int8 model"].float().cpu())
        del outputs
        if progress is not None:
            progress(i + 1, chunks, "comparing")
    return done


def _accuracy(compared: _Compared, labels: torch.Tensor, labels_path: str | Path) -> tuple[float, float]:
    """The float and the int8 model's top-1 accuracy: outputs `(N, classes)`, `labels` `(N,)`
    checked to be classes of the model."""
    shape = compared.comparison.shape
    if shape is None or len(shape) != 2:
        raise InputError(f"`labels` needs (samples, classes) outputs; {compared.where} has shape {shape}")
    classes = shape[1]
    outside = (labels < 0) | (labels >= classes)
    if bool(outside.any()):
        first = int(outside.to(torch.uint8).argmax())
        raise InputError(
            f"labels {labels_path}: {int(outside.sum())} label(s) outside [0, {classes}) for the model's "
            f"{classes} classes, the first {int(labels[first])} at sample {first}"
        )
    ref, out = (torch.cat(compared.top1[k]) for k in ("float model", "int8 model"))
    return float((ref == labels).double().mean()), float((out == labels).double().mean())


@torch.no_grad()
def evaluate_text(
    source_path: str | Path,
    quantized_path: str | Path,
    text_path: str | Path,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = TEXT_BATCH_SIZE,
    device: str = "cpu",
    max_memory: int | None = None,
    progress: Progress | None = None,
) -> TextEvalReport:
    """Run the float model of a Hugging Face folder and the int8 model of a qlin file made from
    it on a UTF-8 text, tokenized with the folder's tokenizer (text.text_inputs). A causal LM
    gets the perplexity of each on the same windows and their top-1 next-token agreement; an
    encoder the cosine of each line's mean-pooled embedding and the nearest-neighbour agreement.
    `max_memory`: the most bytes of tensors any one file may describe, and of the text's tokens
    (budget.py). `progress(done, total, what)` follows the tokenizing and the scoring."""
    with limit(max_memory):
        if batch_size < 1:
            raise ConfigError("`batch_size` must be at least 1")
        dev = check_device(device)
        source = what_is(source_path)
        source_path = source.path
        if not source.folder:
            raise ConfigError(f"`text` is tokenized with a model folder's tokenizer; {source_path} is not a Hugging "
                              "Face folder: pass `inputs` FILE")
        tokenizer = load_tokenizer(source_path)
        raw = read_text(text_path, "text")
        pair = _load_pair(source, quantized_path, model=None, trust_pickle=False, dev=dev)
        text = text_inputs(pair.float_model, tokenizer, raw, text_path, max_length=max_length, stride=stride,
                           progress=progress)
        del raw
        models = {"float": pair.float_model, "int8": pair.int8_model}
        scores = (lm_scores if text.kind == "causal-lm" else embedding_scores)(models, text, batch_size, dev, progress)
        seconds = scores.pop("seconds")
        return TextEvalReport(
            source=str(source_path), quantized=str(quantized_path), text=str(text_path), kind=text.kind,
            tokens=text.tokens, samples=text.samples, max_length=text.max_length, stride=text.stride,
            scored_tokens=text.scored if text.kind == "causal-lm" else None,
            truncated_lines=text.truncated if text.kind == "encoder" else None, metrics=scores,
            seconds_float=seconds["float"], seconds_int8=seconds["int8"], batch_size=batch_size,
            threads=torch.get_num_threads(), size_float_bytes=pair.source.size_bytes,
            size_int8_bytes=pair.size_int8_bytes, kernels=pair.kernels, device=str(dev),
            source_matches=pair.source_matches,
        )
