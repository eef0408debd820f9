"""The three jobs of the command line as Python functions that return typed reports:
`quantize_checkpoint` (taking one `QuantizeOptions`), `inspect_path`, `evaluate_checkpoint`.
The CLI only checks its flags, calls one of them and renders the report.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from .budget import limit
from .calibrate import DEFAULT_SMOOTH, fold_smoothing
from .config import QuantConfig
from .data import Progress, batches, check_finite_inputs, first_tensor, num_samples, run_model, time_models
from .errors import ConfigError, InputError
from .export import CT_FORMAT, FORMATS, check_exportable, save_compressed_tensors
from .fallback import quantize_to_target
from .files import check_distinct, check_file, check_output, check_output_dir, size_bytes
from .hf import HF_KIND, hf_probe_inputs, load_tokenizer
from .kernels import select_kernel
from .plan import find_linears, layer_shape, make_plan
from .qfile import load_quantized, read_qfile, save_quantized, save_streamed
from .qlinear import QuantizedLinear, compile_model
from .quantize import check_streamable, quantize_model, stream_layers
from .scheme import PerGroup
from .report import (
    EvalReport, FloatInspectReport, InspectReport, QuantizeReport, TextEvalReport, compare_outputs, write_report,
)
from .sources import QLIN_FILE, SourceKind, load_source, load_source_lazily, load_tensors, read_checkpoint, what_is
from .text import embedding_scores, lm_scores, read_text, text_inputs

__all__ = [
    "QuantizeOptions", "quantize_checkpoint", "inspect_path", "evaluate_checkpoint", "evaluate_text", "default_output",
    "check_device",
]

PROBE_SAMPLES = 64
_log = logging.getLogger("qlin")


@dataclass(frozen=True)
class QuantizeOptions:
    """How `quantize_checkpoint` runs, besides the source and the config (what to compute).

    output: the qlin file (or compressed-tensors folder) to write; default beside the source.
    format: "qlin" or "compressed-tensors".
    force: replace existing outputs.
    report: also write the report as JSON here and as Markdown beside it (`.md`); a `.html` path
        gets one self-contained HTML page instead (the table and a chart of the SQNRs by depth).
    model: the architecture of a state dict, `package.module:factory` or `file.py:factory`.
    trust_pickle: unpickle a module with classes of its own (runs code from the file).
    inputs: the probe batch for the model-level error (default: random inputs that fit).
    calib: calibration data (static mode needs it); its first `calib_samples`.
    calib_text: instead of `calib`, a UTF-8 text tokenized with the model folder's tokenizer
        (text.text_inputs: windows of `max_length` tokens `stride` apart for a causal LM, a
        sentence per line for an encoder); `calib_samples` counts windows or lines.
    default_smooth: in dynamic mode, apply SmoothQuant (alpha `calibrate.DEFAULT_SMOOTH`) to the
        layers that do not set `smooth`, with factors from realistic data: `calib` (or `calib_text`), else `inputs`,
        else the token ids of a text model's probe (never from a random normal probe).
    batch_size: samples per calibration forward pass.
    min_sqnr: keep the most sensitive layers float until the output SQNR (dB) on `eval_inputs`
        (default: the calibration data) reaches it.
    sensitivity: also measure each quantized layer's sensitivity (the model's output SQNR with
        only that layer in int8) on the same data (without any: on the probe batch).
    device: where to pack and run ("cpu" or "cuda").
    stream: never hold the whole float model: build it without weights, then read, quantize,
        write and drop one layer at a time (`STREAM_SUPPORTS` says for what).
    config_file: the recipe the config was read from (no output may replace it).
    strict: make a skip pattern or recipe rule that matches no layer an error (else a warning).
    max_memory: the most bytes of tensors a file may describe (default: `budget.default_max_memory`).
    """

    output: str | Path | None = None
    format: str = "qlin"
    force: bool = False
    report: str | Path | None = None
    model: str | None = None
    trust_pickle: bool = False
    inputs: str | Path | None = None
    calib: str | Path | None = None
    calib_text: str | Path | None = None
    max_length: int | None = None
    stride: int | None = None
    calib_samples: int | None = None
    default_smooth: bool = True
    batch_size: int = 32
    min_sqnr: float | None = None
    eval_inputs: str | Path | None = None
    sensitivity: bool = False
    device: str = "cpu"
    stream: bool = False
    config_file: str | Path | None = None
    strict: bool = False
    max_memory: int | None = None


# what `stream` supports, as its refusals say it
STREAM_SUPPORTS = ("a Hugging Face folder with safetensors weights or a safetensors state dict with `model`, "
                   "weight-only or dynamic mode, the qlin format")


def default_output(source: Path, format: str = "qlin") -> Path:
    """`<stem>.int8.safetensors` beside the source (a folder's whole name is its stem); for
    `format="compressed-tensors"` the folder `<stem>-int8-compressed-tensors`."""
    stem = source.name if source.is_dir() else source.stem
    if format == CT_FORMAT:
        return source.with_name(f"{stem}-int8-compressed-tensors")
    return source.with_name(f"{stem}.int8.safetensors")


def check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`device` cuda: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"`device` {device}: use cpu or cuda")
    return dev


class _Probe(NamedTuple):
    """The probe batch, what it is, and whether it is realistic enough to calibrate SmoothQuant
    on (the user's inputs or data, or token ids for a text model; not a random normal batch)."""

    inputs: Any
    description: str
    realistic: bool


def _probe_inputs(model: nn.Module, inputs_path: Path | None, data: Any = None, data_name: str = "") -> _Probe:
    """A probe batch: the first samples of `inputs_path`, else of `data` (the eval or calibration
    data, named `data_name`), else 32 seeded random token-id sequences for a transformers text
    model, or a seeded random normal batch of 8 rows sized for the first Linear layer."""
    if inputs_path is not None or data is not None:
        inputs = load_tensors(inputs_path, "inputs") if inputs_path is not None else data
        n = min(PROBE_SAMPLES, num_samples(inputs))
        probe = next(batches(inputs, n))
        if inputs_path is not None:
            check_finite_inputs(probe, f"inputs {inputs_path}")
        return _Probe(probe, f"{n} samples of {inputs_path.name if inputs_path else data_name}", True)
    tokens = hf_probe_inputs(model, samples=32)  # a transformers text model takes token ids
    if tokens is not None:
        ids = tokens["input_ids"]
        return _Probe(tokens, f"random token ids {tuple(ids.shape)} with an all-ones attention mask", True)
    in_features = layer_shape(find_linears(model)[0][1])[0]
    gen = torch.Generator().manual_seed(0)
    return _Probe(torch.randn(8, in_features, generator=gen), f"a random normal batch (8, {in_features})", False)


class _Checked(NamedTuple):
    """What `_check_options` found: the source, paths and device the job then uses."""

    source: SourceKind
    output: Path
    report: Path | None
    device: torch.device
    inputs: Path | None


def _read_files(source: Path, o: QuantizeOptions) -> list[tuple[str, Path | None]]:
    """Every file the job reads, as (what, path): no output may be one of them."""
    factory = o.model.partition(":")[0] if o.model else ""
    return [
        ("source", source), ("`inputs`", o.inputs), ("`calib`", o.calib), ("`calib_text`", o.calib_text),
        ("`eval_inputs`", o.eval_inputs),
        ("`config`", o.config_file), ("`model`", Path(factory) if factory.endswith(".py") else None),
    ]


def _check_options(source_path: Path, config: QuantConfig, o: QuantizeOptions) -> _Checked:
    """Everything that can be checked before a model is loaded, each once."""
    report = None if o.report is None else Path(o.report)
    if o.format not in FORMATS:
        raise ConfigError(f"`format` {o.format!r}: use one of {', '.join(FORMATS)}")
    if o.min_sqnr is not None and not (isinstance(o.min_sqnr, (int, float)) and math.isfinite(o.min_sqnr)):
        raise ConfigError(f"`min_sqnr` {o.min_sqnr!r}: give a finite number of dB, e.g. 30")
    source = what_is(source_path)
    source_path = source.path
    output = Path(o.output) if o.output is not None else default_output(source_path, o.format)
    read = _read_files(source_path, o)
    writes = [("`output`", output)]
    if report is not None:
        if report.suffix == ".md":
            raise ConfigError(
                f"`report` {report}: give the JSON path (e.g. report.json); the Markdown twin is written beside it as .md"
            )
        writes.append(("`report`", report))
        if report.suffix != ".html":  # an HTML report has no Markdown twin
            writes.append(("the Markdown report", report.with_suffix(".md")))
    check_distinct(writes)
    for _, p in writes[1:]:
        check_output(p, force=o.force, inputs=read)
    if o.format == CT_FORMAT:
        if config.embeddings:
            raise ConfigError("`format` compressed-tensors describes Linear layers only: drop `embeddings`")
        check_output_dir(output, force=o.force, inputs=tuple(p for _, p in read))
    else:
        check_output(output, force=o.force, inputs=read)
    device = check_device(o.device)
    if o.batch_size < 1 or (o.calib_samples is not None and o.calib_samples < 1):
        raise ConfigError("`batch_size` and `calib_samples` must be at least 1")
    if o.calib is not None and o.calib_text is not None:
        raise ConfigError("pass `calib` or `calib_text`, not both")
    if o.calib_text is not None and not source.folder:
        raise ConfigError(f"`calib_text` is tokenized with a model folder's tokenizer; {source_path} is not a Hugging "
                          "Face folder: pass `calib` FILE")
    if (o.max_length is not None or o.stride is not None) and o.calib_text is None:
        raise ConfigError("`max_length` and `stride` cut `calib_text` into windows: pass `calib_text` FILE")
    calib = o.calib if o.calib is not None else o.calib_text
    # static mode needs calibration data; SmoothQuant can also take `inputs`, or a text model's
    # token ids (checked on the plan once the model is loaded)
    if config.calibration_need() == "static mode" and calib is None:
        raise ConfigError("static mode needs calibration data: pass `calib` FILE (inputs the model takes) or `calib_text` FILE")
    if not o.default_smooth and config.scheme.smooth is not None:
        raise ConfigError(f"`smooth` {config.scheme.smooth:g} and `no_smooth` contradict each other: drop one")
    inputs = None if o.inputs is None else check_file(o.inputs, "inputs")
    if o.calib_samples is not None and calib is None:
        raise ConfigError("`calib_samples` needs `calib` FILE or `calib_text` FILE")
    if o.min_sqnr is not None and o.eval_inputs is None and calib is None:
        raise ConfigError("`min_sqnr` measures the model on data: pass `eval_inputs` FILE or `calib` FILE")
    if o.stream:
        _check_stream(source, config, o)
    else:
        _warn_if_too_big(source)
    return _Checked(source, output, report, device, inputs)


def _check_stream(source: SourceKind, config: QuantConfig, o: QuantizeOptions) -> None:
    """`stream` reads one layer at a time and never runs the model: refuse what needs more."""
    why = source.stream_problem()
    if why is not None:
        raise ConfigError(f"`stream`: {why} and cannot be read a layer at a time; convert it to safetensors")
    if o.format != "qlin":
        raise ConfigError(f"`stream` writes the qlin format only, not {o.format}")
    if config.embeddings:
        raise ConfigError("`stream` quantizes the Linear layers one at a time, not embedding tables: drop `embeddings`")
    needs_model = {"calib": o.calib, "calib_text": o.calib_text, "inputs": o.inputs, "min_sqnr": o.min_sqnr,
                   "eval_inputs": o.eval_inputs, "sensitivity": o.sensitivity or None}
    given = [k for k, v in needs_model.items() if v is not None]
    if given or config.calibration_need() is not None:
        what = f"`{given[0]}`" if given else config.calibration_need()
        raise ConfigError(
            f"`stream` never holds the whole float model, so it cannot run it: {what} needs the model's forward "
            f"(stream supports {STREAM_SUPPORTS})"
        )


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _warn_if_too_big(source: SourceKind) -> None:
    """Warn (before loading) when the float weights alone exceed the available memory: say
    `stream` for safetensors, and that a pickle cannot be streamed."""
    try:
        files = source.weight_files().files if source.folder else (source.path,)
        size = sum(f.stat().st_size for f in files)
    except (InputError, OSError):
        return
    available = _available_memory()
    if available is None or size <= available:
        return
    gb = f"{size / 1e9:.1f} GB of float weights, more than the {available / 1e9:.1f} GB of memory available"
    why = source.stream_problem()
    if why is None:
        _log.warning(f"{source.path}: {gb}: pass `stream` to read, quantize and write one layer at a time", extra={"kind": "warning"})
    else:
        _log.warning(f"{source.path}: {gb}; {why}, so it cannot be streamed: convert it to safetensors and pass `stream`",
                     extra={"kind": "warning"})


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
        return _quantize(Path(source_path), config, o, progress, calib_progress)


def _quantize(source_path: Path, config: QuantConfig, o: QuantizeOptions, progress: Progress | None,
              calib_progress: Progress | None) -> QuantizeReport:
    kind, output, report_path, dev, inputs = _check_options(source_path, config, o)
    source_path = kind.path
    if o.stream:
        return _quantize_streamed(kind, config, o, output, report_path, dev, progress)
    calib_data, calib_note, eval_data = None, None, None
    if o.calib is not None:
        calib_data = load_tensors(o.calib, "calibration data")
    elif o.calib_text is not None:
        tokenizer, raw = load_tokenizer(source_path), read_text(o.calib_text, "calibration text")
    if progress is not None:
        progress(0, 0, "loading model")
    source = load_source(kind, model=o.model, trust_pickle=o.trust_pickle)
    if o.calib_text is not None:
        text = text_inputs(source.model, tokenizer, raw, o.calib_text, max_length=o.max_length, stride=o.stride,
                           what="calibration text")
        calib_data = text.inputs
        calib_note = f"{text.kind} text: {text.tokens:,} tokens, " + (
            f"windows of {text.max_length} tokens, stride {text.stride}" if text.kind == "causal-lm"
            else f"one sentence a line, at most {text.max_length} tokens")
    if calib_data is not None:
        if o.calib_samples is not None:
            calib_data = next(batches(calib_data, o.calib_samples))
        calib_data = _to_device(calib_data, dev)
    if o.eval_inputs is not None:
        eval_data = load_tensors(o.eval_inputs, "eval inputs")
        check_finite_inputs(eval_data, f"eval inputs {o.eval_inputs}")
        eval_data = _to_device(eval_data, dev)
    # the data the model-level error, the fallback and the sensitivity are measured on
    calib_name = Path(o.calib or o.calib_text or "").name
    data, data_name = (eval_data, Path(o.eval_inputs).name) if eval_data is not None else (
        (calib_data, f"{calib_name} (the calibration data)") if calib_data is not None else (None, ""))
    float_model = source.model.to(dev)
    if not find_linears(float_model):
        raise InputError(f"{source_path}: the model has no nn.Linear layer to quantize")
    plan = make_plan(float_model, config)
    notes = tuple(f"{what} matches no layer" for what in config.unmatched([p for e in plan.entries for p in e.paths]))
    if notes and o.strict:
        raise ConfigError(f"{notes[0]} (`strict`); fix the pattern or drop it")
    if o.format == CT_FORMAT:  # before any work; SmoothQuant is folded or left out below
        check_exportable(plan.without_smoothing({}))
    probe, description, realistic = _probe_inputs(float_model, inputs, data, data_name)
    probe = _to_device(probe, dev)
    # SmoothQuant's data: the calibration data, else the probe where it is realistic
    smooth_data, smooth_from = (calib_data, f"{num_samples(calib_data)} samples of {Path(o.calib or o.calib_text).name}") \
        if calib_data is not None else (probe, description) if realistic else (None, None)
    default_smoothed = 0
    if o.default_smooth and smooth_data is not None:
        plan, default_smoothed = plan.with_smoothing(DEFAULT_SMOOTH)
    need = plan.calibration_need()
    if need is not None and smooth_data is None:
        raise ConfigError(f"{need} needs calibration data: pass `calib` FILE (inputs the model takes) or `calib_text` FILE, or `inputs` FILE")
    calib_run = calib_data if calib_data is not None else (probe if need is not None else None)
    smoothed = [e for e in plan.quantized if e.scheme.smooth is not None]
    smoothing = None if not smoothed else {
        "alpha": sorted({e.scheme.smooth for e in smoothed}), "layers": len(smoothed), "default": default_smoothed,
        "data": smooth_from, "folded": None,
    }
    try:
        reference, compared = first_tensor(run_model(float_model, probe))
        reference = reference.clone()
        probe_note = ""
    except InputError as exc:
        if inputs is not None:
            raise
        reference, compared, probe_note = None, None, f"{exc}; pass --inputs FILE to measure it"
    if o.format == CT_FORMAT and smoothed:
        # compressed-tensors cannot divide inside the kernel: fold into the norms, else drop it
        notes = fold_smoothing(float_model, smoothed, smooth_data, batch_size=o.batch_size)
        plan = plan.without_smoothing(notes)
        smoothing["folded"] = sum(note.startswith("SmoothQuant") for note in notes.values())
        calib_run = calib_data
    run = dict(calib=calib_run, batch_size=o.batch_size, device=dev, progress=progress,
               calib_progress=calib_progress, plan=plan)
    if o.min_sqnr is None and not o.sensitivity:
        result = quantize_model(float_model, config, **run)
    else:
        measured_on = data if data is not None else probe
        result = quantize_to_target(float_model, config, min_sqnr_db=o.min_sqnr, eval_inputs=measured_on,
                                    sensitivity=o.sensitivity, **run)
    probe_report: dict[str, Any] = {"description": description, "compared": compared, "note": probe_note}
    if reference is not None:
        out, _ = first_tensor(run_model(result.model, probe, "int8 model"))
        probe_report.update(compare_outputs(reference, out))
    if o.format == CT_FORMAT:
        hf_folder = source_path if source.kind.startswith(HF_KIND) else None
        save_compressed_tensors(result, output, force=o.force, source_dir=hf_folder,
                                source_name=source_path.name, source_sha256=source.sha256)
    else:
        save_quantized(result, output, force=o.force, source_name=source_path.name, source_sha256=source.sha256)
    size_out = size_bytes(output)
    report = QuantizeReport(
        source=str(source_path), source_kind=source.kind, output=str(output), format=o.format,
        config=result.config, device=str(dev),
        calibration=None if calib_run is None else {
            "file": str(o.calib if o.calib is not None else o.calib_text) if calib_data is not None else None,
            "samples": num_samples(calib_run), "batch_size": o.batch_size,
            **({} if calib_note is None else {"text": calib_note}),
            # without static layers or SmoothQuant, the data only measures each layer's output SQNR
            "used_for": ("calibration" if calib_data is not None else f"SmoothQuant factors from the probe ({description})")
            if plan.calibration_need() else "measuring the first batch",
        },
        layers=result.layers, probe=probe_report, fallback=result.fallback, smoothing=smoothing,
        embeddings=result.embeddings,
        sensitivity=None if result.sensitivity is None else {
            "data": f"{num_samples(data)} samples of {data_name}" if data is not None else description,
            **result.sensitivity},
        size_float_bytes=source.size_bytes, size_int8_bytes=size_out, notes=notes,
    )
    if report_path is not None:
        write_report(report, report_path, force=o.force)
    return report


def _quantize_streamed(kind: SourceKind, config: QuantConfig, o: QuantizeOptions, output: Path,
                       report_path: Path | None, dev: torch.device, progress: Progress | None) -> QuantizeReport:
    """`quantize_checkpoint` with `stream`: the model built without weights (meta device), each
    layer read, quantized, written and dropped in turn (quantize.stream_layers, qfile.save_streamed);
    the file is the one the whole model gives. Measured: each layer's weight SQNR; not the
    model-level error (it needs the model's forward)."""
    source_path = kind.path
    source = load_source_lazily(kind, model=o.model)
    check_streamable(source.model)
    plan = make_plan(source.model, config)
    floats = {e.name: source.model.get_submodule(e.name) for e in plan.entries}
    layers = stream_layers(floats, plan, source.loaded, dev, progress)
    result = save_streamed(source.model, config, plan, layers, source.tensor, output, force=o.force,
                           source_name=source_path.name, source_sha256=source.sha256)
    probe = {"description": "none", "compared": None,
             "note": "not measured with --stream (the whole float model is never in memory to run); "
                     "`qlin eval` measures it where the model fits"}
    report = QuantizeReport(
        source=str(source_path), source_kind=f"{source.kind}, streamed one layer at a time", output=str(output),
        format=o.format, config=result.config, device=str(dev), calibration=None, layers=result.layers,
        probe=probe, fallback=None, size_float_bytes=source.size_bytes, size_int8_bytes=output.stat().st_size,
    )
    if report_path is not None:
        write_report(report, report_path, force=o.force)
    return report


def _to_device(inputs: Any, dev: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(dev) for k, v in inputs.items()}
    return inputs.to(dev)


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
    with limit(max_memory):
        return _inspect(Path(path), model, trust_pickle, device, verify, group_size)


def _inspect(path: Path, model: str | None, trust_pickle: bool, device: str, verify: bool, group_size: int | None
             ) -> InspectReport | FloatInspectReport:
    dev = check_device(device)
    try:
        kind = what_is(path, "file")
    except InputError:  # not a model path at all: `verify` says so first
        kind = None
    if kind is None or not kind.quantized:
        if verify:
            raise ConfigError(f"`verify` checks qlin files; {path} is not one")
        return _inspect_float(kind or what_is(path, "file"), model, trust_pickle, group_size)
    qf = read_qfile(path, verify=verify)
    layers, choices = [], {}
    for e in qf.plan.entries:
        row: dict[str, Any] = {
            "name": e.name, "status": e.status, "reason": e.reason,
            "weight_shape": [e.out_features, e.in_features], "aliases": list(e.aliases),
        }
        if e.scheme is not None:
            scale, zp = qf.tensors[f"{e.name}.weight_scale"], qf.tensors[f"{e.name}.weight_zero_point"]
            choice = choices[e.name] = select_kernel(e.scheme, device=dev, dtype=e.torch_dtype,
                                                     in_features=e.in_features, out_features=e.out_features)
            bits = e.scheme.bits
            row.update(
                weight_dtype="int8" if bits == 8 else f"int{bits} (packed in uint8)",
                scale_shape=list(scale.shape), zero_point_shape=list(zp.shape), **e.scheme.to_dict(),
                scale_min=float(scale.min()), scale_max=float(scale.max()),
                kernel=choice.name, kernel_reason=choice.reason, batch_invariant=choice.batch_invariant,
            )
            if e.scheme.static:
                row.update(
                    input_scale=float(qf.tensors[f"{e.name}.input_scale"]),
                    input_zero_point=int(qf.tensors[f"{e.name}.input_zero_point"]),
                )
        layers.append(row)
    for e in qf.plan.embeddings:
        row = {"name": e.name, "status": e.status, "reason": e.reason, "kind": "embedding",
               "weight_shape": [e.num_embeddings, e.embedding_dim], "aliases": []}
        if e.quantized:
            scale = qf.tensors[f"{e.name}.weight_scale"]
            row.update(weight_dtype="int8", scale_shape=list(scale.shape), zero_point_shape=None,
                       granularity="channel", symmetric=True, scale_min=float(scale.min()),
                       scale_max=float(scale.max()), kernel="gather", kernel_reason="int8 rows dequantized on lookup",
                       batch_invariant=True, mode="weight-only", smooth=None)
        layers.append(row)
    meta = {k: v for k, v in sorted(qf.metadata.items()) if k not in ("config", "plan", "embeddings")}  # safetensors returns it unordered
    container = "qlin" if kind.kind == QLIN_FILE else "compressed-tensors"
    return InspectReport(str(path), meta, qf.config, layers, len(qf.tensors), size_bytes(path), verify, container,
                         choices)


def _inspect_float(what: SourceKind, model: str | None, trust_pickle: bool, group_size: int | None) -> FloatInspectReport:
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


class _Pair(NamedTuple):
    """The float model of a source and the int8 model of a qlin file (or compressed-tensors
    folder qlin wrote) made from it."""

    source: Any  # sources.Source
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
    qf = read_qfile(qpath)
    int8_model = load_quantized(copy.deepcopy(float_model), qf, device=dev)
    kernels = Counter(m.kernel.name for m in int8_model.modules() if isinstance(m, QuantizedLinear))
    return _Pair(source, float_model, int8_model, qpath, dict(sorted(kernels.items())), size_bytes(qpath),
                 qf.metadata.get("source_sha256") == source.sha256)


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
        return _evaluate(source_path, quantized_path, inputs_path, labels_path, model=model,
                         trust_pickle=trust_pickle, batch_size=batch_size, repeats=repeats, device=device,
                         compile=compile, progress=progress)


def _evaluate(source_path, quantized_path, inputs_path, labels_path, *, model, trust_pickle, batch_size, repeats,
              device, compile, progress) -> EvalReport:
    if batch_size < 1 or repeats < 1:
        raise ConfigError("`batch_size` and `repeats` must be at least 1")
    dev = check_device(device)
    if progress is not None:
        progress(0, 0, "loading models")
    source, float_model, int8_model, qpath, kernels, size_int8, source_matches = _load_pair(
        source_path, quantized_path, model=model, trust_pickle=trust_pickle, dev=dev)
    runs = {"float model": float_model, "int8 model": int8_model}
    first_call_s: dict[str, float] = {}
    if compile:
        runs = {"float model": torch.compile(float_model), "int8 model": compile_model(int8_model)}
    inputs = load_tensors(inputs_path, "inputs")
    check_finite_inputs(inputs, f"inputs {inputs_path}")
    n = num_samples(inputs)
    labels = None
    if labels_path is not None:
        labels = load_tensors(labels_path, "labels")
        if isinstance(labels, dict) or labels.dim() != 1:
            raise InputError(f"labels {labels_path} must be one 1-D tensor of class indices")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise InputError(f"labels {labels_path} are {str(labels.dtype).removeprefix('torch.')}; "
                             "give integer class indices (int64)")
        if labels.shape[0] != n:
            raise InputError(f"labels {labels_path} has {labels.shape[0]} entries but the inputs have {n} samples")
    ref_parts, out_parts, compared = [], [], None
    chunks = -(-n // batch_size)
    for i, chunk in enumerate(batches(inputs, batch_size)):
        chunk = _to_device(chunk, dev)
        outputs = []
        for what, m in runs.items():
            t0 = time.perf_counter()
            outputs.append(first_tensor(run_model(m, chunk, what)))
            first_call_s.setdefault(what, time.perf_counter() - t0)
        (ref, compared), (out, _) = outputs
        ref_parts.append(ref.float().cpu())
        out_parts.append(out.float().cpu())
        if progress is not None:
            progress(i + 1, chunks, "comparing")
    reference, output = torch.cat(ref_parts), torch.cat(out_parts)
    check_finite_inputs(reference, f"the float model's {compared} on inputs {inputs_path}")
    accuracy_float = accuracy_int8 = None
    if labels is not None:
        if reference.dim() != 2:
            raise InputError(f"`labels` needs (samples, classes) outputs; {compared} has shape {tuple(reference.shape)}")
        classes = reference.shape[1]
        outside = (labels < 0) | (labels >= classes)
        if bool(outside.any()):
            first = int(outside.to(torch.uint8).argmax())
            raise InputError(
                f"labels {labels_path}: {int(outside.sum())} label(s) outside [0, {classes}) for the model's "
                f"{classes} classes, the first {int(labels[first])} at sample {first}"
            )
        accuracy_float = float((reference.argmax(1) == labels).double().mean())
        accuracy_int8 = float((output.argmax(1) == labels).double().mean())
    timing = time_models(list(runs.values()), _to_device(inputs, dev), batch_size, repeats, progress)
    return EvalReport(
        source=str(source_path), quantized=str(quantized_path), compared=compared, samples=n,
        output_shape=list(output.shape), metrics=compare_outputs(reference, output),
        accuracy_float=accuracy_float, accuracy_int8=accuracy_int8, timing=timing,
        threads=torch.get_num_threads(), size_float_bytes=source.size_bytes,
        size_int8_bytes=size_int8, kernels=kernels, device=str(dev), source_matches=source_matches,
        compile_s={"float": first_call_s["float model"], "int8": first_call_s["int8 model"]} if compile else None,
    )


TEXT_BATCH_SIZE = 8  # windows per forward pass: a window's logits are (max_length, vocabulary)


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
) -> TextEvalReport:
    """Run the float model of a Hugging Face folder and the int8 model of a qlin file made from
    it on a UTF-8 text, tokenized with the folder's tokenizer (text.text_inputs). A causal LM
    gets the perplexity of each on the same windows and their top-1 next-token agreement; an
    encoder the cosine of each line's mean-pooled embedding and the nearest-neighbour agreement.
    `max_memory`: the most bytes of tensors any one file may describe (budget.py)."""
    with limit(max_memory):
        return _evaluate_text(source_path, quantized_path, text_path, max_length=max_length, stride=stride,
                              batch_size=batch_size, device=device)


def _evaluate_text(source_path, quantized_path, text_path, *, max_length, stride, batch_size, device) -> TextEvalReport:
    if batch_size < 1:
        raise ConfigError("`batch_size` must be at least 1")
    dev = check_device(device)
    source = what_is(source_path)
    source_path = source.path
    if not source.folder:
        raise ConfigError(f"`text` is tokenized with a model folder's tokenizer; {source_path} is not a Hugging Face "
                          "folder: pass `inputs` FILE")
    tokenizer = load_tokenizer(source_path)
    raw = read_text(text_path, "text")
    pair = _load_pair(source, quantized_path, model=None, trust_pickle=False, dev=dev)
    text = text_inputs(pair.float_model, tokenizer, raw, text_path, max_length=max_length, stride=stride)
    models = {"float": pair.float_model, "int8": pair.int8_model}
    scores = (lm_scores if text.kind == "causal-lm" else embedding_scores)(models, text, batch_size, dev)
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
