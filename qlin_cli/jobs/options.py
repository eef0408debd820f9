"""How a quantize job runs (`QuantizeOptions`, the one options object that crosses from the CLI
into the library) and everything checked before any loading: formats, outputs that would replace
an input, contradicting options, what `stream` cannot do, and whether the float weights fit in
the memory available (/proc/meminfo)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import QuantConfig
from ..errors import ConfigError, InputError
from ..export import CT_FORMAT, FORMATS
from ..files import check_distinct, check_file, check_output, check_output_dir
from ..sources import SourceKind, what_is

__all__ = ["QuantizeOptions", "Checked", "check_options", "check_device", "default_output"]

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
        write and drop one layer at a time, or, where the plan runs the model (calibration,
        SmoothQuant, static mode, GPTQ, AWQ, `min_sqnr`, `sensitivity`), one block at a time
        (sequential.py): safetensors sources, the qlin format, no `embeddings`.
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


@dataclass(frozen=True)
class Checked:
    """What `check_options` found: what the source is (decided once, `sources.what_is`), the paths
    and device the job then uses."""

    kind: SourceKind
    output: Path
    report: Path | None
    device: torch.device
    inputs: Path | None  # the probe batch's file (`inputs`), checked to exist
    stream: bool = False  # `stream`, or chosen because the float weights would not fit in memory

    @property
    def source(self) -> Path:
        return self.kind.path


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


def check_options(source_path: Path, config: QuantConfig, o: QuantizeOptions) -> Checked:
    """Everything that can be checked before a model is loaded, each once."""
    if o.format not in FORMATS:
        raise ConfigError(f"`format` {o.format!r}: use one of {', '.join(FORMATS)}")
    if o.min_sqnr is not None and not (isinstance(o.min_sqnr, (int, float)) and math.isfinite(o.min_sqnr)):
        raise ConfigError(f"`min_sqnr` {o.min_sqnr!r}: give a finite number of dB, e.g. 30")
    kind = what_is(source_path)
    output, report = _check_outputs(kind.path, config, o)
    device = check_device(o.device)
    _check_data(kind, config, o)
    inputs = None if o.inputs is None else check_file(o.inputs, "inputs")
    _check_data_needs(o)
    if o.stream:
        _check_stream(kind, config, o)
    stream = o.stream or _stream_if_too_big(kind, config, o)
    return Checked(kind, output, report, device, inputs, stream)


def _read_files(source: Path, o: QuantizeOptions) -> list[tuple[str, Path | None]]:
    """Every file the job reads, as (what, path): no output may be one of them."""
    factory = o.model.partition(":")[0] if o.model else ""
    return [
        ("source", source), ("`inputs`", o.inputs), ("`calib`", o.calib), ("`calib_text`", o.calib_text),
        ("`eval_inputs`", o.eval_inputs),
        ("`config`", o.config_file), ("`model`", Path(factory) if factory.endswith(".py") else None),
    ]


def _check_outputs(source: Path, config: QuantConfig, o: QuantizeOptions) -> tuple[Path, Path | None]:
    """The output and the report paths: distinct, replacing no input, and not existing unless
    `force`; the Markdown twin of a JSON report too."""
    report = None if o.report is None else Path(o.report)
    output = Path(o.output) if o.output is not None else default_output(source, o.format)
    read = _read_files(source, o)
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
    return output, report


def _check_data(source: SourceKind, config: QuantConfig, o: QuantizeOptions) -> None:
    """The calibration options agree with each other, the source and the config's mode."""
    if o.batch_size < 1 or (o.calib_samples is not None and o.calib_samples < 1):
        raise ConfigError("`batch_size` and `calib_samples` must be at least 1")
    if o.calib is not None and o.calib_text is not None:
        raise ConfigError("pass `calib` or `calib_text`, not both")
    if o.calib_text is not None and not source.folder:
        raise ConfigError(f"`calib_text` is tokenized with a model folder's tokenizer; {source.path} is not a Hugging "
                          "Face folder: pass `calib` FILE")
    if (o.max_length is not None or o.stride is not None) and o.calib_text is None:
        raise ConfigError("`max_length` and `stride` cut `calib_text` into windows: pass `calib_text` FILE")
    # static mode needs calibration data; SmoothQuant can also take `inputs`, or a text model's
    # token ids (checked on the plan once the model is loaded)
    if config.calibration_need() == "static mode" and o.calib is None and o.calib_text is None:
        raise ConfigError("static mode needs calibration data: pass `calib` FILE (inputs the model takes) or `calib_text` FILE")
    if not o.default_smooth and config.scheme.smooth is not None:
        raise ConfigError(f"`smooth` {config.scheme.smooth:g} and `no_smooth` contradict each other: drop one")


def _check_data_needs(o: QuantizeOptions) -> None:
    """Options that count or measure on data have data to do it on."""
    calib = o.calib if o.calib is not None else o.calib_text
    if o.calib_samples is not None and calib is None:
        raise ConfigError("`calib_samples` needs `calib` FILE or `calib_text` FILE")
    if o.min_sqnr is not None and o.eval_inputs is None and calib is None:
        raise ConfigError("`min_sqnr` measures the model on data: pass `eval_inputs` FILE or `calib` FILE")


def _check_stream(source: SourceKind, config: QuantConfig, o: QuantizeOptions) -> None:
    """`stream` reads the model a layer (or, with calibration, a block) at a time: refuse what
    needs the whole model at once."""
    why = source.stream_problem()
    if why is not None:
        raise ConfigError(f"`stream`: {why} and cannot be read a layer at a time; convert it to safetensors")
    if o.format != "qlin":
        raise ConfigError(f"`stream` writes the qlin format only, not {o.format}")
    if config.embeddings:
        raise ConfigError("`stream` quantizes the Linear layers one at a time, not embedding tables: drop `embeddings`")
    measured = [k for k, v in (("min_sqnr", o.min_sqnr is not None), ("sensitivity", o.sensitivity)) if v]
    if measured and any(s.awq for s in config.schemes()):
        # the fallback measures float layers: AWQ's folds change them, and the float model stays on disk
        raise ConfigError(f"`stream` cannot measure `{measured[0]}` with AWQ (its folds change the float model, which "
                          "stays on disk)")


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _stream_if_too_big(source: SourceKind, config: QuantConfig, o: QuantizeOptions) -> bool:
    """Whether to stream a source whose float weights alone exceed the available memory (checked
    before loading): yes where it can be streamed with these options (a note says so); else a
    warning says why it cannot (a pickle; an option that needs the whole model)."""
    try:
        files = source.weight_files().files if source.folder else (source.path,)
        size = sum(f.stat().st_size for f in files)
    except (InputError, OSError):
        return False
    available = _available_memory()
    if available is None or size <= available:
        return False
    gb = f"{size / 1e9:.1f} GB of float weights, more than the {available / 1e9:.1f} GB of memory available"
    why = source.stream_problem()
    if why is not None:
        _log.warning(f"{source.path}: {gb}; {why}, so it cannot be streamed: convert it to safetensors and pass `stream`",
                     extra={"kind": "warning"})
        return False
    try:
        _check_stream(source, config, o)
    except ConfigError as exc:
        _log.warning(f"{source.path}: {gb}, and it cannot be streamed: {exc}", extra={"kind": "warning"})
        return False
    _log.warning(f"{source.path}: {gb}: streamed (`stream`), a layer or a block at a time", extra={"kind": "note"})
    return True
