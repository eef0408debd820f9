"""The quantize job (`quantize_checkpoint`) as named stages, each reading what the ones before
gave: check the options (options.py), load, plan, choose the data (run_data.py), smooth,
calibrate, quantize or fall back, measure, save, report. With `stream`, `_quantize_streamed`
instead: block by block where the plan runs the model (sequential.py), else one layer at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..budget import limit
from ..calibrate import DEFAULT_SMOOTH, fold_smoothing
from ..config import QuantConfig
from ..data import Inputs, Progress, first_tensor, num_samples, run_model
from ..errors import ConfigError, InputError
from ..export import CT_FORMAT, check_exportable, save_compressed_tensors
from ..fallback import quantize_to_target
from ..files import size_bytes
from ..hf import HF_KIND
from ..plan import Plan, find_linears, make_plan
from ..qfile import save_quantized, save_streamed
from ..quantize import QuantizeResult, check_streamable, quantize_model, stream_layers
from ..report import Calibration, Probe, QuantizeReport, Smoothing, compare_outputs, write_report
from ..report_html import write_html
from ..sequential import PROPAGATION_NOTES, block_problem, find_blocks, quantize_sequential
from ..sources import LazySource, Source, load_source, load_source_lazily
from .options import Checked, QuantizeOptions, check_options
from .run_data import CalibrationData, RunData, Samples, choose_data, load_data, read_calibration

__all__ = ["quantize_checkpoint"]

_log = logging.getLogger("qlin")


@torch.no_grad()
def quantize_checkpoint(
    source_path: str | Path,
    config: QuantConfig | None = None,
    options: QuantizeOptions | None = None,
    *,
    progress: Progress | None = None,
    calib_progress: Progress | None = None,
) -> QuantizeReport:
    """Load a float checkpoint (or a Hugging Face model folder), quantize it under `config`,
    write the qlin file (or a compressed-tensors model folder) and, if asked, the report files;
    return the report. Everything that can be checked is checked before the model is loaded,
    and whatever depends on the layers' schemes is checked on the plan before calibration."""
    config, o = config or QuantConfig(), options or QuantizeOptions()
    if not isinstance(config, QuantConfig) or not isinstance(o, QuantizeOptions):
        raise TypeError("quantize_checkpoint(source, config: QuantConfig, options: QuantizeOptions): the output "
                        "path and other options go in QuantizeOptions(output=...)")
    with limit(o.max_memory):
        job = _Job(check_options(Path(source_path), config, o), config, o, progress, calib_progress)
        return _write(job, _quantize_streamed(job) if job.checked.stream else _quantize(job))


@dataclass(frozen=True)
class _Job:
    """What every stage reads: the checked paths and device, the config, the options, and the
    progress callbacks (layers; calibration batches)."""

    checked: Checked
    config: QuantConfig
    options: QuantizeOptions
    progress: Progress | None
    calib_progress: Progress | None


def _quantize(job: _Job) -> QuantizeReport:
    """The stages, in order (the module docstring)."""
    c, o = job.checked, job.options
    source, model, given = _load(job)
    plan, notes = _plan(job, model)
    data = choose_data(model, *given, c.inputs, c.device)
    plan, smoothing = _smooth(job, plan, data)
    reference = _reference(model, data)
    plan, smoothing, calib = _calibrate(job, model, plan, smoothing, data)
    result = _quantize_or_fall_back(job, model, plan, calib, data)
    probe = _measure(result, data, reference)
    size = _save(job, result, source)
    return QuantizeReport(
        source=str(c.source), source_kind=source.kind, output=str(c.output), format=o.format,
        config=result.config, device=str(c.device), calibration=_calibration(o, plan, calib, data),
        layers=result.layers, probe=probe, fallback=result.fallback, smoothing=smoothing,
        embeddings=result.embeddings, sensitivity=result.sensitivity, size_float_bytes=source.size_bytes,
        size_int8_bytes=size, notes=notes,
    )


def _load(job: _Job) -> tuple[Source, nn.Module, tuple[CalibrationData | None, Samples | None]]:
    """The source, its float model on the device, and the user's data for it: the calibration
    file is read before the model (a bad file fails fast), a calibration text is cut after it
    (with the model's tokenizer and position limit)."""
    c, o = job.checked, job.options
    read = read_calibration(o, c.source)
    if job.progress is not None:
        job.progress(0, 0, "loading model")
    source = load_source(c.kind, model=o.model, trust_pickle=o.trust_pickle)
    data = load_data(read, o, source.model, c.device, job.progress)
    model = source.model.to(c.device)
    if not find_linears(model):
        raise InputError(f"{c.source}: the model has no nn.Linear layer to quantize")
    return source, model, data


def _plan(job: _Job, model: nn.Module) -> tuple[Plan, tuple[str, ...]]:
    """The plan, and a note for each skip pattern or rule that matches no layer (an error with
    `strict`); a compressed-tensors export is checked on it before any work."""
    plan = make_plan(model, job.config)
    notes = tuple(f"{what} matches no layer" for what in job.config.unmatched([p for e in plan.entries for p in e.paths]))
    if notes and job.options.strict:
        raise ConfigError(f"{notes[0]} (`strict`); fix the pattern or drop it")
    if job.options.format == CT_FORMAT:  # SmoothQuant is folded or left out later
        check_exportable(plan.without_smoothing({}))
    return plan, notes


def _smooth(job: _Job, plan: Plan, data: RunData) -> tuple[Plan, Smoothing | None]:
    """The plan with qlin's default SmoothQuant where realistic data is at hand (not `no_smooth`),
    checked to have the data its calibration needs; what SmoothQuant it has."""
    default_smoothed = 0
    if job.options.default_smooth and data.smoothing is not None:
        plan, default_smoothed = plan.with_smoothing(DEFAULT_SMOOTH)
    need = plan.calibration_need()
    if need is not None and data.smoothing is None:
        raise ConfigError(f"{need} needs calibration data: pass `calib` FILE (inputs the model takes) or `calib_text` FILE, or `inputs` FILE")
    smoothed = [e for e in plan.quantized if e.scheme.smooth is not None]
    if not smoothed:
        return plan, None
    alpha = tuple(sorted({e.scheme.smooth for e in smoothed}))
    return plan, Smoothing(alpha, len(smoothed), default_smoothed, data.smoothing.description)


def _reference(model: nn.Module, data: RunData) -> tuple[torch.Tensor | None, str | None, str]:
    """The float model's output on the probe, where in the output it was found, and (when the
    model cannot run a probe the user did not give) why it is not measured."""
    try:
        reference, compared = first_tensor(run_model(model, data.probe.inputs))
    except InputError as exc:
        if data.probe_given:
            raise
        return None, None, f"{exc}; pass --inputs FILE to measure it"
    return reference.clone(), compared, ""


def _calibrate(job: _Job, model: nn.Module, plan: Plan, smoothing: Smoothing | None, data: RunData
               ) -> tuple[Plan, Smoothing | None, Inputs | None]:
    """The plan and the data calibration runs on. compressed-tensors cannot divide inside the
    kernel: SmoothQuant is folded into the norms before it (else dropped; each layer's note
    says which) and calibration then runs on the calibration data only."""
    calib = data.calibration_run(plan.calibration_need() is not None)
    if job.options.format != CT_FORMAT or smoothing is None:
        return plan, smoothing, calib
    smoothed = [e for e in plan.quantized if e.scheme.smooth is not None]
    notes = fold_smoothing(model, smoothed, data.smoothing.inputs, batch_size=job.options.batch_size)
    folded = sum(note.startswith("SmoothQuant") for note in notes.values())
    calib = None if data.calibration is None else data.calibration.samples.inputs
    return plan.without_smoothing(notes), replace(smoothing, folded=folded), calib


def _quantize_or_fall_back(job: _Job, model: nn.Module, plan: Plan, calib: Inputs | None, data: RunData
                           ) -> QuantizeResult:
    """Quantize the model in place; with `min_sqnr` or `sensitivity`, measured on the
    measurement data, falling back to the target."""
    o = job.options
    run: dict[str, Any] = dict(calib=calib, batch_size=o.batch_size, device=job.checked.device, progress=job.progress,
                               calib_progress=job.calib_progress, plan=plan,
                               awq_per_layer=o.format != CT_FORMAT)  # compressed-tensors has no per-layer factors
    if o.min_sqnr is None and not o.sensitivity:
        return quantize_model(model, job.config, **run)
    result = quantize_to_target(model, job.config, min_sqnr_db=o.min_sqnr, eval_inputs=data.measurement.inputs,
                                sensitivity=o.sensitivity, **run)
    return replace(result, sensitivity=replace(result.sensitivity, data=data.measurement.description))


def _measure(result: QuantizeResult, data: RunData, reference: tuple[torch.Tensor | None, str | None, str]) -> Probe:
    """The model-level error: the int8 model against the float one's `reference` on the probe."""
    ref, compared, note = reference
    if ref is None:
        return Probe(data.probe.description, compared, note)
    out, _ = first_tensor(run_model(result.model, data.probe.inputs, "int8 model"))
    return Probe(data.probe.description, compared, note, compare_outputs(ref, out))


def _save(job: _Job, result: QuantizeResult, source: Source) -> int:
    """Write the qlin file or the compressed-tensors folder; its size in bytes."""
    c, o = job.checked, job.options
    if o.format == CT_FORMAT:
        hf_folder = c.source if source.kind.startswith(HF_KIND) else None
        save_compressed_tensors(result, c.output, force=o.force, source_dir=hf_folder,
                                source_name=c.source.name, source_sha256=source.sha256)
    else:
        save_quantized(result, c.output, force=o.force, source_name=c.source.name, source_sha256=source.sha256)
    return size_bytes(c.output)


def _calibration(o: QuantizeOptions, plan: Plan, calib: Inputs | None, data: RunData) -> Calibration | None:
    """The report's calibration record: what calibration ran on and what for (without static
    layers or SmoothQuant, the data only measures each layer's output SQNR)."""
    if calib is None:
        return None
    cal = data.calibration
    need = plan.calibration_need()
    if not need:
        used_for = "measuring the first batch"
    elif cal is not None:
        used_for = "calibration"
    else:
        what = "SmoothQuant factors" if need.startswith("SmoothQuant") else f"calibration ({need.split(' (')[0]})"
        used_for = f"{what} from the probe ({data.probe.description})"
    return Calibration(None if cal is None else cal.file, num_samples(calib), o.batch_size, used_for,
                       None if cal is None else cal.text)


def _quantize_streamed(job: _Job) -> QuantizeReport:
    """`quantize_checkpoint` with `stream`: the model built without weights (meta device). Where
    the plan runs the model (calibration data, SmoothQuant, including the default one from a text
    model's token ids, static mode, GPTQ, AWQ), block by block (`_sequential`); else each layer
    read, quantized, written and dropped in turn (quantize.stream_layers, qfile.save_streamed),
    measuring each layer's weight SQNR, not the model's error (no forward). The file is the one
    the whole-model path writes for the same options (but GPTQ's, sequential.py says why)."""
    c, o = job.checked, job.options
    source = load_source_lazily(c.kind, model=o.model)
    check_streamable(source.model)
    plan, notes = _plan(job, source.model)
    read = read_calibration(o, c.source)
    data = choose_data(source.model, *load_data(read, o, source.model, c.device, job.progress), c.inputs, c.device)
    plan, smoothing = _smooth(job, plan, data)
    calib = data.calibration_run(plan.calibration_need() is not None)
    if calib is not None or o.min_sqnr is not None or o.sensitivity:  # the model runs
        return _sequential(job, source, plan, data, calib, smoothing, notes)
    floats = {e.name: source.model.get_submodule(e.name) for e in plan.entries}
    layers = stream_layers(floats, plan, source.loaded, c.device, job.progress)
    result = save_streamed(source.model, job.config, plan, layers, source.tensor, c.output, force=o.force, source_name=c.source.name,
                           source_sha256=source.sha256)
    probe = Probe("none", None, "not measured with --stream without calibration data (the whole float model is never in "
                                "memory to run); `qlin eval` measures it where the model fits")
    return QuantizeReport(
        source=str(c.source), source_kind=f"{source.kind}, streamed one layer at a time", output=str(c.output),
        format=o.format, config=result.config, device=str(c.device), calibration=None, layers=result.layers,
        probe=probe, fallback=None, size_float_bytes=source.size_bytes, size_int8_bytes=c.output.stat().st_size,
        notes=notes,
    )


def _sequential(job: _Job, source: LazySource, plan: Plan, data: RunData, calib: Inputs | None, smoothing: Smoothing | None,
                notes: tuple[str, ...]) -> QuantizeReport:
    """The streamed run with a forward: block by block (sequential.py), or, for a model without
    a list of blocks, the whole-model path, with a note."""
    c, o = job.checked, job.options
    blocks = find_blocks(source.model)
    why = block_problem(source.model, blocks, plan)
    if why is not None or c.device.type != "cpu":
        why = why or "block by block runs on the CPU"
        note = (f"`stream` with a forward (calibration, SmoothQuant, static mode, GPTQ, AWQ, `min_sqnr`, `sensitivity`): "
                f"{why}, so the whole model was loaded")
        _log.warning(note, extra={"kind": "warning"})
        report = _quantize(job)
        return replace(report, notes=(*report.notes, note))
    run = quantize_sequential(source, job.config, plan, blocks, c.output, calib=calib, probe=data.probe.inputs,
                              batch_size=o.batch_size, force=o.force, source_name=c.source.name,
                              source_sha256=source.sha256, progress=job.progress, min_sqnr_db=o.min_sqnr,
                              sensitivity=o.sensitivity, eval_inputs=data.measurement.inputs)
    measured = run.result.sensitivity
    if measured is not None:
        measured = replace(measured, data=data.measurement.description)
    if run.probe_metrics is None:
        probe = Probe(data.probe.description, None, run.probe_note)
    else:
        probe = Probe(data.probe.description, run.compared, "", run.probe_metrics)
    how = f"streamed block by block ({len(blocks.modules)} blocks of {blocks.path}, each calibrated on the {run.propagation} outputs of the ones before)"
    return QuantizeReport(
        source=str(c.source), source_kind=f"{source.kind}, {how}", output=str(c.output),
        format=o.format, config=run.result.config, device=str(c.device), calibration=_calibration(o, plan, calib, data),
        layers=run.result.layers, probe=probe, fallback=run.result.fallback, smoothing=smoothing,
        sensitivity=measured, size_float_bytes=source.size_bytes, size_int8_bytes=c.output.stat().st_size,
        notes=notes, statistics_from=PROPAGATION_NOTES[run.propagation],
    )


def _write(job: _Job, report: QuantizeReport) -> QuantizeReport:
    """Write the report files, if asked: JSON and its Markdown twin, or one HTML page."""
    path = job.checked.report
    if path is not None:
        (write_html if path.suffix == ".html" else write_report)(report, path, force=job.options.force)
    return report
