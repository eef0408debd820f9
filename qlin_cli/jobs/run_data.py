"""The data of a quantize run, chosen once (`RunData`): which samples calibrate, which probe
the model-level error, which give SmoothQuant its factors, and which the fallback and the
sensitivities are measured on, each with the description the report gives it. The jobs read
this record; none decides again which data serves what.

The choice, in order of preference:
- calibration: `calib` (a file of inputs), or `calib_text` cut into windows or lines with the
  model folder's tokenizer; its first `calib_samples`.
- measurement (`--min-sqnr`, `--sensitivity`): `eval_inputs`, else the calibration data, else
  the probe.
- probe: the first `PROBE_SAMPLES` of `inputs`, else of the measurement data, else 32 seeded
  random token-id sequences for a transformers text model, else a seeded random normal batch.
- SmoothQuant: the calibration data, else the probe where it is realistic (not random normal).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data import Inputs, Progress, batches, check_finite_inputs, model_inputs, num_samples
from ..hf import hf_probe_inputs, load_tokenizer
from ..plan import find_linears, layer_shape
from ..sources import load_tensors
from ..text import read_text, text_inputs
from .options import QuantizeOptions

__all__ = ["PROBE_SAMPLES", "Samples", "CalibrationData", "RunData", "read_calibration", "load_data", "choose_data",
           "to_device"]

PROBE_SAMPLES = 64


@dataclass(frozen=True)
class Samples:
    """A set of samples on the device and what it is, as the report names it."""

    inputs: Inputs  # a tensor (samples, ...) or a dict of such tensors (keyword arguments)
    description: str


@dataclass(frozen=True)
class CalibrationData:
    """The user's calibration data (`calib` or `calib_text`), loaded before the plan."""

    samples: Samples  # "N samples of <file name>"
    file: str  # the path as given
    text: str | None  # `calib_text`: what the text became (tokens, windows or lines)


@dataclass(frozen=True)
class RunData:
    """The run's data, each set with its description; see the module docstring for the choice."""

    calibration: CalibrationData | None
    probe: Samples
    probe_given: bool  # from `inputs`: a model that cannot run it is an error, not a note
    smoothing: Samples | None  # SmoothQuant's factors; None: no realistic data
    measurement: Samples  # what --min-sqnr and --sensitivity measure the model on

    def calibration_run(self, needed: bool) -> Inputs | None:
        """What calibration runs on: the calibration data, else (where the plan `needed` it, for
        SmoothQuant) its factors' data."""
        if self.calibration is not None:
            return self.calibration.samples.inputs
        return self.smoothing.inputs if needed and self.smoothing is not None else None


def to_device(inputs: Any, dev: torch.device) -> Any:
    """A tensor, or a dict of tensors, on `dev`."""
    if isinstance(inputs, dict):
        return {k: v.to(dev) for k, v in inputs.items()}
    return inputs.to(dev)


def read_calibration(o: QuantizeOptions, source: Path) -> Any:
    """Read the calibration file before the model loads (a bad file fails fast): `calib`'s
    tensors, or `calib_text`'s tokenizer and text (cut into samples once the model is loaded)."""
    if o.calib is not None:
        return load_tensors(o.calib, "calibration data")
    if o.calib_text is not None:
        return load_tokenizer(source), read_text(o.calib_text, "calibration text")
    return None


def load_data(read: Any, o: QuantizeOptions, model: nn.Module, dev: torch.device, progress: Progress | None = None,
              ) -> tuple[CalibrationData | None, Samples | None]:
    """The calibration data (from what `read_calibration` read; `progress` follows the
    tokenizing of `calib_text`) and the `eval_inputs` (described by the file's name), on `dev`."""
    calibration = None if read is None else _calibration(read, o, model, dev, progress)
    evaluation = None
    if o.eval_inputs is not None:
        inputs = model_inputs(model, load_tensors(o.eval_inputs, "eval inputs"))
        check_finite_inputs(inputs, f"eval inputs {o.eval_inputs}")
        evaluation = Samples(to_device(inputs, dev), Path(o.eval_inputs).name)
    return calibration, evaluation


def _calibration(read: Any, o: QuantizeOptions, model: nn.Module, dev: torch.device, progress: Progress | None
                 ) -> CalibrationData:
    """`calib`'s tensors, or `calib_text` cut into the samples `model` takes; the first
    `calib_samples`, on `dev`."""
    inputs, text = model_inputs(model, read), None
    if o.calib_text is not None:
        tokenizer, raw = read
        cut = text_inputs(model, tokenizer, raw, o.calib_text, max_length=o.max_length, stride=o.stride,
                          what="calibration text", progress=progress)
        inputs = cut.inputs
        text = f"{cut.kind} text: {cut.tokens:,} tokens, " + (
            f"windows of {cut.max_length} tokens, stride {cut.stride}" if cut.kind == "causal-lm"
            else f"one sentence a line, at most {cut.max_length} tokens")
    if o.calib_samples is not None:
        inputs = next(batches(inputs, o.calib_samples))
    file = o.calib if o.calib is not None else o.calib_text
    return CalibrationData(Samples(to_device(inputs, dev), f"{num_samples(inputs)} samples of {Path(file).name}"),
                       str(file), text)


def choose_data(model: nn.Module, calibration: CalibrationData | None, evaluation: Samples | None,
                inputs_path: Path | None, dev: torch.device) -> RunData:
    """The run's data (module docstring); `evaluation` is described by its file's name."""
    if evaluation is not None:
        data, name = evaluation.inputs, evaluation.description
    elif calibration is not None:
        data, name = calibration.samples.inputs, f"{Path(calibration.file).name} (the calibration data)"
    else:
        data, name = None, ""
    probe, realistic = _probe(model, inputs_path, data, name)
    probe = Samples(to_device(probe.inputs, dev), probe.description)
    smoothing = calibration.samples if calibration is not None else probe if realistic else None
    measurement = probe if data is None else Samples(data, f"{num_samples(data)} samples of {name}")
    return RunData(calibration, probe, inputs_path is not None, smoothing, measurement)


def _probe(model: nn.Module, inputs_path: Path | None, data: Inputs | None, data_name: str) -> tuple[Samples, bool]:
    """A probe batch and whether it is realistic enough to calibrate SmoothQuant on: the first
    samples of `inputs_path`, else of `data` (named `data_name`), else 32 seeded random token-id
    sequences for a transformers text model, or a seeded random normal batch of 8 rows sized for
    the first Linear layer (not realistic)."""
    if inputs_path is not None or data is not None:
        inputs = model_inputs(model, load_tensors(inputs_path, "inputs")) if inputs_path is not None else data
        n = min(PROBE_SAMPLES, num_samples(inputs))
        probe = next(batches(inputs, n))
        if inputs_path is not None:
            check_finite_inputs(probe, f"inputs {inputs_path}")
        return Samples(probe, f"{n} samples of {inputs_path.name if inputs_path else data_name}"), True
    tokens = hf_probe_inputs(model, samples=32)  # a transformers text model takes token ids
    if tokens is not None:
        ids = tokens["input_ids"]
        return Samples(tokens, f"random token ids {tuple(ids.shape)} with an all-ones attention mask"), True
    in_features = layer_shape(find_linears(model)[0][1])[0]
    gen = torch.Generator().manual_seed(0)
    return Samples(torch.randn(8, in_features, generator=gen), f"a random normal batch (8, {in_features})"), False
