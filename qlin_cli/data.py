"""Model inputs and running a model on them: what calibration, the accuracy fallback and
evaluation share.

`Inputs` is one tensor whose first dimension is samples, or a dict of such tensors, passed to
the model as keyword arguments (e.g. transformers' `input_ids` and `attention_mask`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .errors import InputError, one_line

__all__ = [
    "Inputs",
    "Progress",
    "num_samples",
    "model_inputs",
    "check_finite_inputs",
    "non_finite",
    "non_finite_error",
    "batches",
    "run_model",
    "StopForward",
    "first_tensor",
    "model_output",
    "OtherLoad",
    "BUSY_CORES",
    "Timing",
    "time_models",
]

Inputs = torch.Tensor | dict[str, torch.Tensor]
# (steps done, steps total, what: a layer or a stage); total 0: a step without a count ("loading model")
Progress = Callable[[int, int, str], None]


def first_tensor(output: Any, where: str = "output") -> tuple[torch.Tensor, str]:
    """The first tensor of a model output (a tensor, tuple/list, dict or dataclass such as
    transformers' ModelOutput) and a description of where it was found."""
    if isinstance(output, torch.Tensor):
        return output, where
    if isinstance(output, dict):
        items = list(output.items())
    elif dataclasses.is_dataclass(output):
        items = [(f.name, getattr(output, f.name)) for f in dataclasses.fields(output)]
    elif isinstance(output, (tuple, list)):
        items = list(enumerate(output))
    else:
        items = []
    for key, value in items:
        if value is None:
            continue
        try:
            return first_tensor(value, f"{where}[{key!r}]")
        except InputError:
            continue
    raise InputError(f"the model output ({type(output).__name__}) holds no tensor to compare")


def model_inputs(model: nn.Module, inputs: Inputs) -> Inputs:
    """`inputs` as qlin passes them to `model`: a transformers model's batch without `labels`.
    Given labels, such a model computes a loss and puts that scalar first in its output (and
    logs a line about its loss type); qlin compares what the model outputs, the logits."""
    if isinstance(inputs, dict) and "labels" in inputs and type(model).__module__.startswith("transformers."):
        return {k: v for k, v in inputs.items() if k != "labels"}
    return inputs


def num_samples(inputs: Inputs) -> int:
    return (next(iter(inputs.values())) if isinstance(inputs, dict) else inputs).shape[0]


def non_finite(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]] | None:
    """The NaN and Inf of a float tensor `(samples, ...)`: how many values, in how many samples,
    and the index of the first; None when there are none (or the tensor is not float)."""
    if not (t.is_floating_point() or t.is_complex()):
        return None
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    if not count:
        return None
    first = tuple(int(i) for i in torch.unravel_index(bad.reshape(-1).to(torch.uint8).argmax(), bad.shape))
    return count, int(bad.reshape(bad.shape[0], -1).any(1).sum()), first


def non_finite_error(what: str, found: tuple[int, int, tuple[int, ...]], samples: int) -> InputError:
    """The error for `non_finite`'s `found` in `what` of `samples` samples."""
    count, bad_samples, first = found
    return InputError(
        f"{what} has {count} non-finite value(s) (NaN or Inf) in {bad_samples} of {samples} "
        f"samples, the first at index {first}; fix or drop those samples"
    )


def check_finite_inputs(inputs: Inputs, what: str) -> None:
    """Refuse float inputs that hold NaN or Inf (every error and agreement measured on them
    would be NaN), saying how many values, in how many samples, and the first one's index."""
    for key, t in inputs.items() if isinstance(inputs, dict) else [(None, inputs)]:
        found = non_finite(t)
        if found:
            where = f" (tensor {key!r})" if key is not None else ""
            raise non_finite_error(f"{what}{where}", found, t.shape[0])


def batches(inputs: Inputs, batch_size: int) -> Iterator[Inputs]:
    """Slices of `inputs` along the first (sample) dimension."""
    n = num_samples(inputs)
    for start in range(0, n, batch_size):
        if isinstance(inputs, dict):
            yield {k: v[start : start + batch_size] for k, v in inputs.items()}
        else:
            yield inputs[start : start + batch_size]


class StopForward(Exception):
    """Raised by a hook to end a forward early (the sequential pipeline's capture of a block's
    inputs); `run_model` lets it through."""


@torch.no_grad()
def run_model(model: nn.Module, inputs: Inputs, what: str = "model") -> Any:
    """`model(inputs)` (keyword arguments for a dict), with a one-line error if they don't fit."""
    try:
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)
    except (InputError, StopForward):
        raise
    except Exception as exc:
        shape = (
            {k: tuple(v.shape) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(inputs.shape)
        )
        raise InputError(f"the inputs {shape} do not fit the {what} ({one_line(exc, 160)})") from None


@torch.no_grad()
def model_output(model: nn.Module, inputs: Inputs, batch_size: int) -> torch.Tensor:
    """The first tensor of the model's output on every sample, concatenated `(N, ...)`."""
    parts = [first_tensor(run_model(model, chunk))[0].float() for chunk in batches(inputs, batch_size)]
    return torch.cat(parts)


class OtherLoad:
    """CPU time that other processes used while the block ran, in cores (`cores`: 0.0 when the
    machine was ours; None where /proc is not readable, or when the block took under MIN_S: the
    kernel counts CPU time in ticks of 10 ms, too coarse to tell for a shorter block). A latency
    timed while another process computes is not this machine's speed; benchmarks/common.py
    measures the same way.

        with OtherLoad() as load:
            ...                      # timing
        load.cores                   # e.g. 0.93: another process kept about one core busy
    """

    cores: float | None = None
    MIN_S = 0.25

    def __enter__(self) -> "OtherLoad":
        self._t0, self._start = time.perf_counter(), _jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        end, seconds = _jiffies(), max(time.perf_counter() - self._t0, 1e-6)
        if self._start is not None and end is not None and seconds >= self.MIN_S:
            (all0, own0), (all1, own1) = self._start, end
            self.cores = max(0.0, (all1 - all0) - (own1 - own0)) / os.sysconf("SC_CLK_TCK") / seconds


def _jiffies() -> tuple[int, int] | None:
    """(busy clock ticks of the whole machine, of this process), or None without /proc."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    return sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), int(own[11]) + int(own[12])  # minus idle, iowait


# Other processes using more than this many cores while qlin times (a quarter of a core) make
# its latencies slower and noisier than the machine's own.
BUSY_CORES = 0.25


@dataclass(frozen=True)
class Timing:
    """Latencies of one forward on a batch of `batch_size` samples, per model: (min, median, max)
    ms over `forwards` timed forwards each; `other_load_cores`: what other processes used
    meanwhile (OtherLoad)."""

    latencies_ms: tuple[tuple[float, float, float], ...]
    batch_size: int
    forwards: int
    other_load_cores: float | None


@torch.no_grad()
def time_models(models: list[nn.Module], inputs: Inputs, batch_size: int, repeats: int = 5,
                progress: Progress | None = None) -> Timing:
    """Time one forward per batch for each model, interleaved (every batch goes through each
    model in turn), over `repeats` passes after one warm-up forward each. Only full batches are
    timed (all of the inputs when there are fewer than `batch_size`), so that every timed forward
    has the batch size the result reports."""
    size = min(batch_size, num_samples(inputs))
    chunks = [c for c in batches(inputs, size) if num_samples(c) == size]
    samples: list[list[float]] = [[] for _ in models]
    for model in models:  # warm-up
        run_model(model, chunks[0])
    total = repeats * len(chunks)
    with OtherLoad() as load:
        for r in range(repeats):
            for j, chunk in enumerate(chunks):
                for i, model in enumerate(models):
                    t0 = time.perf_counter()
                    run_model(model, chunk)
                    samples[i].append((time.perf_counter() - t0) * 1e3)
                if progress is not None:
                    progress(r * len(chunks) + j + 1, total, "timing")
    spread = tuple((min(s), statistics.median(s), max(s)) for s in samples)
    return Timing(spread, size, total, load.cores)
