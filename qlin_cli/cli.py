"""The `qlin` command line: parse, call the API (api.py), render. The only module that imports
typer or rich. Results go to stdout (one JSON object with --json), everything else to stderr.

Exit codes: 0 ok, 1 a user error (one line on stderr, no traceback unless --debug), 2 usage.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import __version__, entry
from .api import QuantizeOptions, evaluate_checkpoint, evaluate_text, inspect_path, quantize_checkpoint
from .config import QuantConfig, load_recipe, recipe_names
from .budget import parse_size
from .errors import ConfigError, Terminated
from .jobs.evaluate import TEXT_BATCH_SIZE
from .kernels.registry import request_names
from .report import LINE_CHARS, report_json, shown
from .scheme import ACT_GRANULARITIES, MODES, OBSERVER_NAMES, ROUNDINGS, WEIGHT_GRANULARITIES

WEIGHT_GRANULARITY_NAMES = tuple(g.name for g in WEIGHT_GRANULARITIES)
ACT_GRANULARITY_NAMES = tuple(g.name for g in ACT_GRANULARITIES)

app = typer.Typer(
    name="qlin",
    help="Post-training int8 quantization of the nn.Linear layers of a PyTorch model.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# Wide tables when piped (rich would assume 80 columns); the terminal's width otherwise.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)

# Exit code of each error kind, by class name anywhere in the error's MRO (typer may vendor its
# own copy of click, so click's classes are matched by name). One table; anything else is a
# bug in qlin: also exit 1, one line, traceback with --debug.
EXIT_CODES = {"QlinError": 1, "UsageError": 2, "Abort": 130, "KeyboardInterrupt": 130}


ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", metavar="MOD:FN", help="Architecture for a state dict: package.module:factory or file.py:factory."),
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Unpickle a module with classes of its own (runs code from the file).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DeviceOpt = Annotated[Literal["cpu", "cuda"], typer.Option("--device", help="Device to pack and run on.")]
def _finite(value: float | None) -> float | None:
    """A number option's value, if it is a number (NaN and infinities are usage errors)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _size(value: str | None) -> int | None:
    """--max-memory's value in bytes ('8GB', '512MiB', '1000000')."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc).split(": ", 1)[-1]) from None


MaxMemoryOpt = Annotated[
    Optional[str],
    typer.Option("--max-memory", callback=lambda v: _size(v), help="The most tensor bytes one input file may describe, e.g. 8GB "
                 "[default: half the physical memory]."),
]
InputsOpt = Annotated[
    Optional[Path],
    typer.Option("--inputs", metavar="FILE", help="Model inputs (.safetensors or .pt): a tensor, or a dict of tensors as keyword arguments."),
]

MaxLengthOpt = Annotated[
    Optional[int],
    typer.Option("--max-length", metavar="N", help="Text: tokens per window (causal LM) or per line (encoder) [default: the model's position limit, at most 1024]."),
]
StrideOpt = Annotated[
    Optional[int], typer.Option("--stride", metavar="N", help="Text, causal LM: tokens between window starts [default: half of --max-length]."),
]


class _Count(MofNCompleteColumn):
    """done/total, and nothing while a step has no count (loading the model)."""

    def render(self, task) -> Text:
        return Text("") if task.total is None else super().render(task)


def _progress_bar(label: str) -> tuple[Progress, Callable[[int, int, str], None]]:
    """A transient bar on stderr (off when stderr is not a terminal) and the `progress(done,
    total, what)` callback that drives it; total 0 is a step without a count."""
    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), _Count(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)
    task = bar.add_task("starting", total=None)

    def progress(done: int, total: int, what: str) -> None:
        bar.update(task, completed=done, total=total or None, description=what)

    return bar, progress


class Output:
    """Renders a report for a person (rich tables on stdout, warnings on stderr) or as one JSON
    object on stdout: the one place that knows the difference."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def show(self, report, *done: str) -> None:
        """Print `report`, then the lines of `done` (what was written), in human mode; warnings
        go to stderr in both modes."""
        if self.as_json:
            sys.stdout.write(report_json(report))
        else:
            self._human(report, done)
        for line in report.warnings():
            err.print(as_flags(shown(line, LINE_CHARS)), markup=False, soft_wrap=True)  # one line each

    def _human(self, report, done: tuple[str, ...]) -> None:
        for line in report.facts():
            out.print(shown(line, LINE_CHARS), markup=False)
        for t in report.tables():
            t = t.shown()
            if len(t.rows) > PLAIN_TABLE_ROWS:
                _plain_table(t)
                continue
            table = Table(title=t.title, title_justify="left")
            for col in t.columns:
                table.add_column(col, justify="right" if col in t.numeric else "left")
            for row in t.rows:
                table.add_row(*row)
            out.print(table)
        for line in (*report.summary(), *done):
            out.print(shown(line, LINE_CHARS), markup=False)


ERROR_CHARS = 2000  # an error line's message is cut after this many characters (a name in it may be megabytes)
PLAIN_TABLE_ROWS = 1000  # rich lays a table out at ~1.4 ms a row: 600k plan rows took 14 minutes


def _plain_table(t) -> None:
    """A long table as plain aligned columns: every row, in time linear in its size."""
    rows = [tuple(t.columns), *t.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(t.columns))]
    lines = [t.title] + [
        "  ".join(cell.rjust(w) if col in t.numeric else cell.ljust(w) for cell, w, col in zip(r, widths, t.columns)).rstrip()
        for r in rows
    ]
    out.file.write("\n".join(lines) + "\n")


class _Command(typer.core.TyperCommand):
    """A command whose usage line reads as people write it, `qlin eval [OPTIONS] SOURCE QUANTIZED`
    (typer would write `{SOURCE} {QUANTIZED}`)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [p[1:-1] if p[:1] == "{" and p[-1:] == "}" else p for p in super().collect_usage_pieces(ctx)]


DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]


def _print_version(value: bool) -> None:
    if value:
        out.print(f"qlin {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print qlin's version and exit.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Post-training int8 quantization of the nn.Linear layers of a PyTorch model."""
    # --debug is taken out of the arguments by `main` (before any command parses them), wherever
    # it stands; it is declared here and on each command so that --help lists it.


@app.command(cls=_Command)
def quantize(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="Float checkpoint: .pt/.pth/.bin or .safetensors, or a Hugging Face model folder.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="PATH", help="Output file, or folder for --format compressed-tensors [default: <stem>.int8.safetensors or <stem>-int8-compressed-tensors].")] = None,
    out_format: Annotated[Literal["qlin", "compressed-tensors"], typer.Option("--format", help="qlin (a qlin safetensors file, the default) or compressed-tensors (a model folder for transformers/vLLM).")] = "qlin",
    mode: Annotated[Optional[Literal[MODES]], typer.Option(help="dynamic (default), weight-only, or static (needs --calib).")] = None,
    granularity: Annotated[Optional[Literal[WEIGHT_GRANULARITY_NAMES]], typer.Option(help="Weight scales: channel (default) or tensor.")] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", metavar="B", help="Weight width, 2 to 8 [default: 8]; fewer bits are stored packed.")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", metavar="G", help="One weight scale per G input channels, scale shape (out, ceil(in/G)); weight-only when --mode is not given; with --mode dynamic, per-token int8 activations (W4A8 at --bits 4).")] = None,
    symmetric: Annotated[Optional[bool], typer.Option("--symmetric/--asymmetric", help="Weight zero point 0 (default) or fitted.")] = None,
    act_granularity: Annotated[Optional[Literal[ACT_GRANULARITY_NAMES]], typer.Option(help="Dynamic activations: token (default, batch-invariant) or tensor (batch-dependent).")] = None,
    kernel: Annotated[Optional[Literal[request_names()]], typer.Option(help="Kernel request; auto picks per layer.")] = None,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="Also quantize nn.Embedding tables, int8 per row (weight-only).")] = False,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", metavar="REGEX", help="Regex on module paths to keep in float (repeatable; adds to the recipe's).")] = None,
    config: Annotated[Optional[str], typer.Option("--config", metavar="RECIPE", help=f"A shipped recipe by name ({', '.join(recipe_names())}) or a TOML file; flags override it.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", metavar="FILE", help="Write the report as JSON here, and as Markdown beside it (.md); FILE.html: one self-contained HTML page with a chart of the SQNRs by depth.")] = None,
    inputs: InputsOpt = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", metavar="FILE", help="Calibration inputs (same formats as --inputs); static mode and --smooth need them.")] = None,
    calib_text: Annotated[Optional[Path], typer.Option("--calib-text", metavar="FILE", help="Calibration text instead of --calib: a UTF-8 file, tokenized with the model folder's tokenizer (windows for a causal LM, a sentence per line for an encoder).")] = None,
    max_length: MaxLengthOpt = None,
    stride: StrideOpt = None,
    calib_samples: Annotated[Optional[int], typer.Option("--calib-samples", metavar="N", help="Use the first N calibration samples.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Samples per calibration forward pass.")] = 32,
    observer: Annotated[Optional[Literal[OBSERVER_NAMES]], typer.Option("--observer", help="Static activation range: minmax (default), absmax, moving-average, percentile, mse.")] = None,
    weight_observer: Annotated[Optional[Literal[OBSERVER_NAMES]], typer.Option("--weight-observer", help="Weight range: minmax (default), absmax, percentile, mse.")] = None,
    percentile: Annotated[Optional[float], typer.Option("--percentile", metavar="P", callback=_finite, help="Percentile of the percentile observers [default: 99.99].")] = None,
    rounding: Annotated[Optional[Literal[ROUNDINGS]], typer.Option("--rounding", help="How weights are rounded: rtn (to nearest, default), gptq (error compensation from the inputs' Hessian), awq (activation-aware scaling; weight-only) or awq+gptq; calibrated on --calib/--calib-text, else a text model's token ids. GPTQ's damping, block size and act-order: recipe keys.")] = None,
    smooth: Annotated[Optional[float], typer.Option("--smooth", metavar="ALPHA", callback=_finite, help="SmoothQuant alpha in (0, 1] for every layer (factors from --calib, else --inputs, else a text model's token ids).")] = None,
    no_smooth: Annotated[bool, typer.Option("--no-smooth", help="Turn off the default SmoothQuant (alpha 0.5) of dynamic layers when realistic data is at hand.")] = False,
    min_sqnr: Annotated[Optional[float], typer.Option("--min-sqnr", metavar="DB", callback=_finite, help="Keep the most sensitive layers float until the output SQNR (dB) reaches this.")] = None,
    eval_inputs: Annotated[Optional[Path], typer.Option("--eval-inputs", metavar="FILE", help="Data for --min-sqnr, --sensitivity and the model-level error [default: the --calib data].")] = None,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Also show each layer's sensitivity: the model's output SQNR with only that layer quantized.")] = False,
    model: ModelOpt = None,
    trust_pickle: TrustOpt = False,
    device: DeviceOpt = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Never hold the whole float model: read, quantize and write one layer at a time, or one block at a time where the model runs (calibration, SmoothQuant, static, GPTQ, AWQ, --min-sqnr, --sensitivity) (safetensors sources).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="A --skip pattern or recipe rule that matches no layer is an error, not a warning.")] = False,
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Quantize every nn.Linear of SOURCE to int8 and write a qlin safetensors file (or a
    compressed-tensors model folder)."""
    recipe = load_recipe(config) if config is not None else {}
    base = QuantConfig.from_dict(recipe, origin=str(config) if config else "options")
    cfg = base.with_changes(
        mode=mode, granularity=granularity, bits=bits, group_size=group_size, symmetric=symmetric,
        act_granularity=act_granularity, kernel=kernel,
        observer=observer, weight_observer=weight_observer, percentile=percentile, smooth=smooth,
        rounding=rounding, skip=[*base.skip, *skip] if skip else None, embeddings=True if embeddings else None,
    )
    options = QuantizeOptions(
        output=output, format=out_format, force=force, report=report, model=model, trust_pickle=trust_pickle,
        inputs=inputs, calib=calib, calib_text=calib_text, max_length=max_length, stride=stride,
        calib_samples=calib_samples, default_smooth=not no_smooth, batch_size=batch_size, min_sqnr=min_sqnr,
        eval_inputs=eval_inputs, sensitivity=sensitivity, device=device, stream=stream, config_file=config,
        strict=strict, max_memory=max_memory,
    )
    bar, progress = _progress_bar("quantizing")
    with bar:
        result = quantize_checkpoint(source, cfg, options, progress=progress, calib_progress=progress)
    if group_size is not None and mode is None and "mode" not in recipe:  # said once it worked
        logging.getLogger("qlin").info(
            "--group-size selected weight-only mode (--mode dynamic gives grouped weights per-token int8 activations)")
    if report is None or report.suffix == ".html":
        wrote = f"wrote {result.output}" + (f" and {report}" if report else "")
    else:
        wrote = f"wrote {result.output}, {report} and {report.with_suffix('.md')}"
    Output(as_json).show(result, wrote)


@app.command(cls=_Command)
def inspect(
    file: Annotated[Path, typer.Argument(metavar="PATH", help="A qlin file or a compressed-tensors folder qlin wrote, or a float checkpoint or Hugging Face model folder.", show_default=False)],
    model: ModelOpt = None,
    trust_pickle: TrustOpt = False,
    device: DeviceOpt = "cpu",
    verify: Annotated[bool, typer.Option("--verify", help="Recompute the payload sha256 of a qlin file.")] = False,
    group_size: Annotated[Optional[int], typer.Option("--group-size", metavar="G", help="Float checkpoints: also list the scale shape per group of G input channels.")] = None,
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show a quantized model's metadata and layers, or the Linear layers of a float model."""
    Output(as_json).show(inspect_path(file, model=model, trust_pickle=trust_pickle, device=device, verify=verify,
                                      group_size=group_size, max_memory=max_memory))


@app.command("eval", cls=_Command)
def evaluate(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="The float checkpoint or Hugging Face model folder.", show_default=False)],
    quantized: Annotated[Path, typer.Argument(metavar="QUANTIZED", help="The qlin file, or compressed-tensors folder, qlin made from it.", show_default=False)],
    inputs: Annotated[Optional[Path], typer.Option("--inputs", metavar="FILE", help="Inputs: a tensor (samples first) or a dict of tensors as keyword arguments.")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", metavar="FILE", help="Instead of --inputs, a UTF-8 text tokenized with the model folder's tokenizer: perplexity (causal LM) or sentence embeddings, one a line (encoder).")] = None,
    max_length: MaxLengthOpt = None,
    stride: StrideOpt = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", metavar="FILE", help="Class index per sample, for accuracy.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", metavar="N", min=1, help=f"Samples per forward pass [default: 64; {TEXT_BATCH_SIZE} windows or lines with --text].")] = None,
    repeats: Annotated[int, typer.Option("--repeats", metavar="N", min=1, help="Timed passes over the inputs.")] = 5,
    model: ModelOpt = None,
    trust_pickle: TrustOpt = False,
    device: DeviceOpt = "cpu",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile both models first (the int8 one around its kernels); compile time is reported apart.")] = False,
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run the float and the int8 model on the same inputs (or text) and compare them."""
    if (inputs is None) == (text is None):  # a usage error (exit 2), as a missing option is
        raise typer.BadParameter("give one of them, not both" if inputs else "give one of them",
                                 param_hint="'--inputs' / '--text'")
    if text is None:
        if max_length is not None or stride is not None:
            raise ConfigError("`max_length` and `stride` cut `text` into windows: pass `text` FILE")
        bar, progress = _progress_bar("evaluating")
        with bar:
            report = evaluate_checkpoint(
                source, quantized, inputs, labels, model=model, trust_pickle=trust_pickle,
                batch_size=64 if batch_size is None else batch_size, repeats=repeats, device=device,
                compile=compile, max_memory=max_memory, progress=progress,
            )
        Output(as_json).show(report)
        return
    taken = [flag for flag, given in (("labels", labels), ("model", model), ("trust_pickle", trust_pickle),
                                      ("compile", compile)) if given]
    if taken:
        raise ConfigError(f"`{taken[0]}` applies to `inputs`, not to `text` (a Hugging Face folder's own tokenizer and model)")
    bar, progress = _progress_bar("evaluating")
    with bar:
        report = evaluate_text(
            source, quantized, text, max_length=max_length, stride=stride,
            batch_size=TEXT_BATCH_SIZE if batch_size is None else batch_size, device=device, max_memory=max_memory,
            progress=progress,
        )
    Output(as_json).show(report)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    previous: dict[int, Any] = {}
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints as \udcff, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C -> KeyboardInterrupt below
        for signum in TERMINATING:  # kill, systemd, a closed terminal -> Terminated below
            previous[signum] = signal.signal(signum, _terminate)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        _notes_to_stderr()
        code = app(args=args, prog_name="qlin", standalone_mode=False)
        if code == 130 and entry.claim_report():  # typer turns Ctrl-C into a silent exit code 130
            err.print("interrupted", markup=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except Terminated as exc:  # like Ctrl-C: every `finally` on the way removed its temporaries
        if entry.claim_report():
            err.print(entry.interrupted_line(exc.signum), markup=False)
        code = 128 + exc.signum
    except (Exception, KeyboardInterrupt) as exc:
        if debug:
            raise
        kinds = [c.__name__ for c in type(exc).__mro__]
        kind = next((k for k in kinds if k in EXIT_CODES), None)
        if kind == "UsageError" and "NoArgsIsHelpError" in kinds:
            message = exc.format_message().rstrip()  # the help text
        elif kind == "UsageError":
            ctx = getattr(exc, "ctx", None)
            hint = f" (see 'qlin {ctx.command.name} --help')" if ctx and ctx.command.name != "qlin" else ""
            message = f"error: {exc.format_message()}{hint}"
        elif kind in ("Abort", "KeyboardInterrupt"):
            message = "interrupted"
        elif kind == "QlinError":  # a name from a file may be megabytes long
            message = f"error: {as_flags(shown(str(exc), ERROR_CHARS))}"
        else:
            message = f"error: internal error {type(exc).__name__}: {shown(str(exc), ERROR_CHARS)} (run with --debug for the traceback)"
        if entry.claim_report():
            err.print(message, markup=False, soft_wrap=True)
        code = EXIT_CODES.get(kind, 1)

    # The work is done (outputs complete, or cleaned up): a Ctrl-C during the interpreter's
    # teardown (~0.5 s with torch loaded, after Python has reset SIGINT to its default) would
    # kill the process silently with -SIGINT instead of this exit code.
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    _ignore_sigint_at_exit()
    entry.exit_code = code or 0  # a signal from here on: the watchdog ends the teardown with this code
    sys.exit(code or 0)


class _Note(logging.Handler):
    """The library's `qlin` log (e.g. building the fused kernels once, or running without them)
    as one line each on stderr, `note:` or what the record's `kind` says (`warning:` for a model
    larger than memory)."""

    def emit(self, record: logging.LogRecord) -> None:
        kind = getattr(record, "kind", "note")
        err.print(f"{kind}: {as_flags(record.getMessage())}", markup=False, soft_wrap=True)


@functools.cache
def _notes_to_stderr() -> None:
    log = logging.getLogger("qlin")
    log.addHandler(_Note())
    log.setLevel(logging.INFO)
    log.propagate = False


@functools.cache
def _flags() -> dict[str, str]:
    """Each option's keyword -> its flag, from the commands themselves: calib_samples ->
    --calib-samples, output -> --output."""
    group = typer.main.get_command(app)
    return {
        opt[2:].replace("-", "_"): opt
        for command in group.commands.values() for param in command.params
        for opt in param.opts if opt.startswith("--")
    }


def as_flags(message: str) -> str:
    """The library names an option by its keyword in backticks (`calib_samples`); the command
    line names the flag that sets it (--calib-samples). Other backticked words stay as they are."""
    flags = _flags()
    return re.sub(r"`([a-z][a-z_]*)`", lambda m: flags.get(m.group(1), m.group(0)), message)


TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


@functools.cache
def _ignore_sigint_at_exit() -> None:
    for signum in (signal.SIGINT, *TERMINATING):
        atexit.register(signal.signal, signum, signal.SIG_IGN)


if __name__ == "__main__":
    main()
