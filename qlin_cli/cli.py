"""The `qlin` command line: parse, call the API (api.py), render. The only module that imports
typer or rich. Results go to stdout (one JSON object with --json), everything else to stderr.

Exit codes: 0 ok, 1 a user error (one line on stderr, no traceback unless --debug), 2 usage.
"""

from __future__ import annotations

import atexit
import functools
import json
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import ACT_GRANULARITIES, KERNELS, MODES, OBSERVER_NAMES, QuantConfig, load_recipe
from .errors import ConfigError
from .qfile import write_atomic, check_output
from .report import json_safe, summary_lines, to_markdown

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
    typer.Option("--model", help="Architecture for a state dict: package.module:factory or file.py:factory."),
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Unpickle a module with classes of its own (runs code from the file).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DeviceOpt = Annotated[Literal["cpu", "cuda"], typer.Option("--device", help="Device to pack and run on.")]
InputsOpt = Annotated[
    Optional[Path],
    typer.Option("--inputs", help="Model inputs (.safetensors or .pt): a tensor, or a dict of tensors as keyword arguments."),
]


def _print_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(json_safe(obj), indent=2) + "\n")


def _shape(value: Any) -> str:
    if value is None:
        return "-"
    return "(" + ", ".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@app.command()
def quantize(
    source: Annotated[Path, typer.Argument(help="Float checkpoint: .pt/.pth/.bin or .safetensors, or a Hugging Face model folder.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output file, or folder for --format compressed-tensors [default: <stem>.int8.safetensors or <stem>-int8-compressed-tensors].")] = None,
    out_format: Annotated[Literal["qlin", "compressed-tensors"], typer.Option("--format", help="qlin (a qlin safetensors file, the default) or compressed-tensors (a model folder for transformers/vLLM).")] = "qlin",
    mode: Annotated[Optional[Literal[MODES]], typer.Option(help="dynamic (default), weight-only, or static (needs --calib).")] = None,
    granularity: Annotated[Optional[Literal["tensor", "channel"]], typer.Option(help="Weight scales: channel (default) or tensor.")] = None,
    symmetric: Annotated[Optional[bool], typer.Option("--symmetric/--asymmetric", help="Weight zero point 0 (default) or fitted.")] = None,
    act_granularity: Annotated[Optional[Literal[ACT_GRANULARITIES]], typer.Option(help="Dynamic activations: token (default, batch-invariant) or tensor (batch-dependent).")] = None,
    kernel: Annotated[Optional[Literal[KERNELS]], typer.Option(help="Kernel request; auto picks per layer.")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Regex on module paths to keep in float (repeatable; adds to the recipe's).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML recipe (see configs/); flags override it.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the report as JSON here, and as Markdown beside it (.md).")] = None,
    inputs: InputsOpt = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration inputs (same formats as --inputs); static mode and --smooth need them.")] = None,
    calib_samples: Annotated[Optional[int], typer.Option("--calib-samples", help="Use the first N calibration samples.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per calibration forward pass.")] = 32,
    observer: Annotated[Optional[Literal[OBSERVER_NAMES]], typer.Option("--observer", help="Static activation range: minmax (default), absmax, moving-average, percentile, mse.")] = None,
    weight_observer: Annotated[Optional[Literal[OBSERVER_NAMES]], typer.Option("--weight-observer", help="Weight range: minmax (default), absmax, percentile, mse.")] = None,
    percentile: Annotated[Optional[float], typer.Option("--percentile", help="Percentile of the percentile observers [default: 99.99].")] = None,
    smooth: Annotated[Optional[float], typer.Option("--smooth", help="SmoothQuant alpha in (0, 1], e.g. 0.5 (needs --calib).")] = None,
    min_sqnr: Annotated[Optional[float], typer.Option("--min-sqnr", help="Keep the most sensitive layers float until the output SQNR (dB) reaches this.")] = None,
    eval_inputs: Annotated[Optional[Path], typer.Option("--eval-inputs", help="Data for --min-sqnr [default: the --calib data].")] = None,
    model: ModelOpt = None,
    trust_pickle: TrustOpt = False,
    device: DeviceOpt = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize every nn.Linear of SOURCE to int8 and write a qlin safetensors file (or a
    compressed-tensors model folder)."""
    from .api import quantize_checkpoint

    recipe = load_recipe(config) if config is not None else {}
    flags = dict(
        mode=mode, granularity=granularity, symmetric=symmetric, act_granularity=act_granularity, kernel=kernel,
        observer=observer, weight_observer=weight_observer, percentile=percentile, smooth=smooth,
    )
    base = QuantConfig.from_dict(recipe, origin=str(config) if config else "options")
    cfg = base.with_changes(**flags, skip=[*base.skip, *skip] if skip else None)
    if report is not None:
        if report.suffix == ".md":
            raise ConfigError(
                f"--report {report}: give the JSON path (e.g. report.json); the Markdown twin is written beside it as .md"
            )
        for p in (report, report.with_suffix(".md")):
            check_output(p, force=force, inputs=(source,))

    with Progress(
        TextColumn("[bold]quantizing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        result = quantize_checkpoint(
            source, output, cfg, model=model, trust_pickle=trust_pickle, inputs=inputs, calib=calib,
            calib_samples=calib_samples, batch_size=batch_size, min_sqnr=min_sqnr, eval_inputs=eval_inputs,
            device=device, force=force, format=out_format,
            progress=progress, calib_progress=progress,
        )
    if report is not None:
        write_atomic(report, (json.dumps(json_safe(result), indent=2) + "\n").encode(), force=force)
        write_atomic(report.with_suffix(".md"), to_markdown(result).encode(), force=force)
    if as_json:
        _print_json(result)
        return
    table = Table(title=f"qlin quantize {result['source']} -> {result['output']}", title_justify="left")
    static = result["config"]["mode"] == "static"
    calibrated = result["calibration"] is not None
    cols = ["layer", "weight shape", "scale shape", "kernel", "weight SQNR dB"]
    cols += ["output SQNR dB"] if calibrated else []
    cols += ["input range", "input scale"] if static else []
    cols += ["bytes float -> int8", "note"]
    for col in cols:
        table.add_column(col, justify="right" if "SQNR" in col or "bytes" in col or "input" in col else "left")
    for r in result["layers"]:
        note = r["reason"] if r["status"] == "skipped" else ("" if r["batch_invariant"] else "batch-dependent")
        if r["status"] == "quantized" and r["reason"]:
            note = r["reason"] + ("" if r["batch_invariant"] else "; batch-dependent")
        if r["status"] == "quantized" and r["kernel_reason"].startswith("fallback"):
            note = r["kernel_reason"]
        cells = [r["name"] or "(root)", _shape(r["weight_shape"]), _shape(r["scale_shape"]), r["kernel"] or "float",
                 _num(r["weight_sqnr_db"])]
        cells += [_num(r["output_sqnr_db"])] if calibrated else []
        if static:
            rng = r["input_range"]
            cells += [f"[{rng[0]:.3g}, {rng[1]:.3g}]" if rng else "-",
                      f"{r['input_scale']:.3g} (z={r['input_zero_point']})" if r["input_scale"] is not None else "-"]
        table.add_row(*cells, f"{r['bytes_float']:,} -> {r['bytes_int8']:,}", note)
    out.print(table)
    for line in summary_lines(result):
        out.print(line)
    out.print(f"wrote {result['output']}" + (f", {report} and {report.with_suffix('.md')}" if report else ""))


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A qlin file, or a float checkpoint.")],
    model: ModelOpt = None,
    trust_pickle: TrustOpt = False,
    device: DeviceOpt = "cpu",
    verify: Annotated[bool, typer.Option("--verify", help="Recompute the payload sha256 of a qlin file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a qlin file's metadata and layers, or the Linear layers of a float checkpoint."""
    from .api import inspect_path

    info = inspect_path(file, model=model, trust_pickle=trust_pickle, device=device, verify=verify)
    if as_json:
        _print_json(info)
        return
    if info["kind"] == "qlin":
        for key, value in info["metadata"].items():
            out.print(f"{key}: {value}")
        out.print(f"config: {json.dumps(info['config'])}")
        table = Table(title=f"{info['path']}: {len(info['layers'])} Linear layers", title_justify="left")
        cols = ("layer", "weight", "scale shape", "zero point shape", "granularity", "symmetric",
                "scale min", "scale max", "kernel here", "note")
        for col in cols:
            table.add_column(col)
        for r in info["layers"]:
            if r["status"] != "quantized":
                table.add_row(r["name"] or "(root)", _shape(r["weight_shape"]), *["-"] * 7, f"float: {r['reason']}")
                continue
            note = r["kernel_reason"] + ("" if r["batch_invariant"] else "; results depend on the batch")
            if r["mode"] == "static":
                note += f"; static input scale {r['input_scale']:.3g}, zero point {r['input_zero_point']} ({r['observer']})"
            if r["smooth"] is not None:
                note += f"; SmoothQuant alpha {r['smooth']}"
            table.add_row(
                r["name"] or "(root)", f"{r['weight_dtype']} {_shape(r['weight_shape'])}", _shape(r["scale_shape"]),
                _shape(r["zero_point_shape"]), r["granularity"], str(r["symmetric"]).lower(),
                f"{r['scale_min']:.3g}", f"{r['scale_max']:.3g}", r["kernel"], note,
            )
        out.print(table)
        if info["verified"]:
            out.print(f"payload sha256 verified: {info['metadata']['payload_sha256']}")
        return
    table = Table(title=f"{info['path']}: {info['kind']}, {info['note']}", title_justify="left")
    for col in ("layer", "weight shape", "scale shape per tensor", "scale shape per channel"):
        table.add_column(col)
    for r in info["layers"]:
        table.add_row(r["name"] or "(root)", _shape(r["weight_shape"]), _shape(r["scale_shape_per_tensor"]),
                      _shape(r["scale_shape_per_channel"]))
    out.print(table)


@app.command("eval")
def evaluate(
    source: Annotated[Path, typer.Argument(help="The float checkpoint.")],
    quantized: Annotated[Path, typer.Argument(help="The qlin file made from it.")],
    inputs: Annotated[Path, typer.Option("--inputs", help="Inputs: a tensor (samples first) or a dict of tensors as keyword arguments.")],
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Class index per sample, for accuracy.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per forward pass.")] = 64,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed passes over the inputs.")] = 5,
    model: ModelOpt = None,
    trust_pickle: TrustOpt = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Run the float and the int8 model on the same inputs and compare them."""
    from .api import evaluate_checkpoint

    r = evaluate_checkpoint(
        source, quantized, inputs, labels, model=model, trust_pickle=trust_pickle,
        batch_size=batch_size, repeats=repeats, device=device,
    )
    if as_json:
        _print_json(r)
        return
    table = Table(title=f"qlin eval: {source} vs {quantized} on {r['samples']} samples ({r['compared']})",
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("SQNR dB", _num(r["sqnr_db"])), ("cosine (mean per sample)", _num(r["cosine"], 6)),
        ("max abs error", f"{r['max_abs_err']:.4g}"), ("MSE", f"{r['mse']:.4g}"),
        ("top-1 agreement", _num(r["top1_agreement"], 4)),
        ("accuracy float", _num(r["accuracy_float"], 4)), ("accuracy int8", _num(r["accuracy_int8"], 4)),
        (f"latency float ms (batch {r['batch_size']}, {r['threads']} threads)", _num(r["latency_float_ms"], 3)),
        ("latency int8 ms", _num(r["latency_int8_ms"], 3)), ("speedup", f"{r['speedup']:.2f}x"),
        ("size float bytes", f"{r['size_float_bytes']:,}"), ("size int8 bytes", f"{r['size_int8_bytes']:,}"),
        ("kernels", ", ".join(f"{k} x{v}" for k, v in r["kernels"].items())),
    ]
    for row in rows:
        table.add_row(*row)
    out.print(table)
    if not r["source_matches"]:
        err.print("note: the qlin file records another source file (sha256 differs)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C -> KeyboardInterrupt below
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        code = app(args=args, prog_name="qlin", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into a silent exit code 130
            err.print("interrupted", markup=False)
    except typer.Exit as exc:
        code = exc.exit_code
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
        elif kind == "QlinError":
            message = f"error: {exc}"
        else:
            message = f"error: internal error {type(exc).__name__}: {exc} (run with --debug for the traceback)"
        err.print(message, markup=False, soft_wrap=True)
        code = EXIT_CODES.get(kind, 1)

    # The work is done (outputs complete, or cleaned up): a Ctrl-C during the interpreter's
    # teardown (~0.5 s with torch loaded, after Python has reset SIGINT to its default) would
    # kill the process silently with -SIGINT instead of this exit code.
    _ignore_sigint_at_exit()
    sys.exit(code or 0)


@functools.cache
def _ignore_sigint_at_exit() -> None:
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
