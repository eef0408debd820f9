"""A decode step's Linear layers one at a time, against the memory bound (issue 24, item 1): for
each format the Llama-shaped model's layers (q/o 2048x2048, k/v 256x2048, gate/up 5632x2048, down
2048x5632, head 32000x2048; no bias) at 1, 2 and 4 tokens: the bytes a call reads (codes at their
width, scales, zero points) over its wall time, against the read bandwidth measured in the same
run: `torch.sum` and `read_bandwidth.cpp`'s streams, as decode.py measures them, at the start and
the end (the best of the four is the bound), and `torch.sum` over as many bytes between each
configuration's own passes (this VM's bandwidth moves by up to 2x from minute to minute).

Each (format, shape) packs enough copies of its layer (>= 256 MB as a call reads them, more than
any last level cache here) that every call reads its weights from memory, as a decode step does; a pass
calls every copy once, and the figure is the best of the passes (>= 5, ~budget seconds each) of
that pass's total bytes over its total time. Formats: float32 and bf16 (`F.linear`), int8
per-token (auto: `onednn`'s one call up to 16 rows on VNNI CPUs, `pertoken` elsewhere), int8
weight-only, 4-bit g32 weight-only (`lowbit`) and W4A8 g32 (`lowbit_dynamic`). Layers are
`QuantizedLinear.from_float(...).pack("cpu")`, the path `load_quantized` takes.

    python benchmarks/decode_layers.py                   # ~3-6 min; section decode-layers
    python benchmarks/decode_layers.py --formats int8 --tokens 1 --no-md   # one kernel, by hand

A script run by hand, never a test.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from decode import linear_weight_bytes, stream_bandwidth  # noqa: E402

from qlin_cli.qlinear import QuantizedLinear  # noqa: E402
from qlin_cli.scheme import LayerScheme  # noqa: E402

SHAPES = {"q/o": (2048, 2048), "k/v": (256, 2048), "gate/up": (5632, 2048), "down": (2048, 5632),
          "head": (32000, 2048)}  # name -> (out, in)
# name -> LayerScheme keys (None: float); the decode.py formats of one group size
FORMATS = {"float32": None, "bf16": None, "int8": {}, "int8 weight-only": {"mode": "weight-only"},
           "4-bit g32": {"bits": 4, "group_size": 32}, "W4A8 g32": {"mode": "dynamic", "bits": 4, "group_size": 32}}
SHORT = {"f32": "float32", "bf16": "bf16", "int8": "int8", "int8-wo": "int8 weight-only", "q4g32": "4-bit g32",
         "w4a8g32": "W4A8 g32"}
OUT = common.RESULTS_DIR / "decode_layers.json"
SECTION = "decode-layers"


def build(fmt: str, out_f: int, in_f: int, min_bytes: int) -> tuple[list, torch.dtype, str]:
    """Layers of one format and shape (at least two, and `min_bytes` of weights as a call reads
    them), the dtype of their input, and their kernel. No bias, as a Llama model's layers."""
    layers, kernel, held = [], "float", 0
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    for i in itertools.count():
        if len(layers) >= 2 and held >= min_bytes:
            break
        lin = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            torch.nn.init.normal_(lin.weight, std=0.02, generator=torch.Generator().manual_seed(i))
        if FORMATS[fmt] is None:
            layers.append(lin.to(dtype))
        else:
            layers.append(QuantizedLinear.from_float(lin, LayerScheme(**FORMATS[fmt])).pack("cpu"))
            kernel = layers[-1].kernel.name
        held += linear_weight_bytes(layers[-1])
    return layers, dtype, kernel


def measure(layers: list, x: torch.Tensor, budget: float, buf: torch.Tensor | None = None) -> tuple[float, float]:
    """Seconds of the best pass over all copies (one call each), and (with `buf`) the read
    bandwidth in bytes/s of `buf.sum()`, the best of one between every two passes: this VM's
    bandwidth moves by up to 2x from minute to minute, so each row has its own bound."""
    best, best_sum, spent, passes = float("inf"), float("inf"), 0.0, 0
    with torch.inference_mode():
        for q in layers[:2]:
            q(x)
        while passes < 5 or spent < budget:
            t0 = time.perf_counter()
            for q in layers:
                q(x)
            dt = time.perf_counter() - t0
            best, spent, passes = min(best, dt), spent + dt, passes + 1
            if buf is not None:
                t0 = time.perf_counter()
                buf.sum()
                best_sum = min(best_sum, time.perf_counter() - t0)
    return best, (0.0 if buf is None else buf.numel() * buf.element_size() / best_sum)


def bandwidth(threads: int, when: str) -> dict[str, float]:
    """Read bandwidth (bytes/s) by `torch.sum` (one stream a thread) and read_bandwidth.cpp (the
    best of 1-8 streams a thread), as decode.py measures it."""
    out = {f"torch.sum, {when}": common.read_bandwidth(threads)}
    streams = stream_bandwidth(threads)
    if str(threads) in streams:
        out[f"{streams['streams'][str(threads)]} streams a thread, {when}"] = streams[str(threads)]
    common.log(", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in out.items()))
    return out


def run(args) -> dict:
    common.setup_threads(args.threads)
    bw = bandwidth(args.threads, "start")
    buf = torch.ones(args.min_bytes // 4)  # as large as a configuration's copies (at least)
    rows = []
    for fmt in args.formats:
        for name in args.shapes:
            out_f, in_f = SHAPES[name]
            layers, dtype, kernel = build(fmt, out_f, in_f, args.min_bytes)
            nbytes = sum(linear_weight_bytes(q) for q in layers)  # decode.py's Linear MB/token
            for m in args.tokens:
                x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)).to(dtype)
                t, local = measure(layers, x, args.budget, buf)
                gbs = nbytes / t
                rows.append({"format": fmt, "layer": name, "shape": f"{out_f} x {in_f}", "tokens": m, "kernel": kernel,
                             "us_per_call": t / len(layers) * 1e6, "gb_s": gbs / 1e9, "sum_gb_s": local / 1e9,
                             "pct_sum": 100 * gbs / local, "copies": len(layers), "mb_per_call": nbytes / len(layers) / 1e6})
                common.log(f"{fmt:>16} {name:>8} M={m}: {t / len(layers) * 1e6:8.1f} us  {gbs / 1e9:5.1f} GB/s "
                           f"(torch.sum between its passes {local / 1e9:5.1f}) [{kernel}]")
            del layers
    bw.update(bandwidth(args.threads, "end"))
    bound = max(bw.values())  # of the start and end measurements (each row also has its own minute's)
    for r in rows:
        r["pct_bound"] = 100 * r["gb_s"] * 1e9 / bound
    common.log(f"bound {bound / 1e9:.1f} GB/s")
    return {"machine": common.machine_info(args.threads), "cpu": common.cpu_summary(),
            "bandwidth": {k: v / 1e9 for k, v in bw.items()}, "bound_gb_s": bound / 1e9, "rows": rows, "command": " ".join(["python", "benchmarks/decode_layers.py", *sys.argv[1:]])}


def markdown(result: dict) -> str:
    bw = ", ".join(f"{k} {v:.1f} GB/s" for k, v in result["bandwidth"].items())
    lines = ["## A decode step's layers against the read bandwidth (`benchmarks/decode_layers.py`)", "",
             f"CPU: {result['cpu']}. {common.machine_md(result['machine'])}", "",
             f"Command: `{result['command']}` ({result['elapsed_s']:.0f} s). Bound: the best read bandwidth measured at the run's start and end "
             f"({bw}): **{result['bound_gb_s']:.1f} GB/s**. Each cell: GB/s read (the layer's stored bytes "
             f"over the wall time of a call, its weights from memory); in brackets, % of the bound and % of "
             f"`torch.sum`'s bandwidth measured between the configuration's own passes (over as many bytes: the "
             f"bandwidth of that minute); then the time a call.", ""]
    tokens = sorted({r["tokens"] for r in result["rows"]})
    for fmt in dict.fromkeys(r["format"] for r in result["rows"]):
        rs = [r for r in result["rows"] if r["format"] == fmt]
        lines += [f"### {fmt} (kernel: {rs[0]['kernel']})", ""]
        body = []
        for layer in dict.fromkeys(r["layer"] for r in rs):
            cells = {r["tokens"]: r for r in rs if r["layer"] == layer}
            first = next(iter(cells.values()))
            body.append([f"{layer} ({first['shape']}, {first['mb_per_call']:.1f} MB)"] + [
                f"{cells[m]['gb_s']:.1f} ({cells[m]['pct_bound']:.0f}% / {cells[m]['pct_sum']:.0f}%), "
                f"{cells[m]['us_per_call']:.0f} us"
                if m in cells else "—" for m in tokens])
        lines += [common.md_table(["layer (MB a call)"] + [f"M = {m}" for m in tokens], body), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", default=",".join(SHORT), help=f"comma-separated, of {', '.join(SHORT)}")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated layer names, of {', '.join(SHAPES)}")
    p.add_argument("--tokens", default="1,2,4")
    p.add_argument("--budget", type=float, default=0.5, help="seconds of passes per configuration")
    p.add_argument("--min-mb", type=int, default=256, help="MB of weights a configuration's copies hold at least")
    p.add_argument("--no-md", action="store_true", help=f"do not rewrite RESULTS.md's {SECTION} section")
    p.add_argument("--md-section", default=SECTION)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    try:
        args.formats = [SHORT[f] for f in args.formats.split(",")]
    except KeyError as exc:
        p.error(f"unknown format {exc} (formats: {', '.join(SHORT)})")
    args.shapes = args.shapes.split(",")
    if set(args.shapes) - set(SHAPES):
        p.error(f"unknown layer {', '.join(sorted(set(args.shapes) - set(SHAPES)))} (layers: {', '.join(SHAPES)})")
    try:
        args.tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens takes comma-separated token counts, not {args.tokens!r}")
    args.min_bytes = args.min_mb << 20
    start = time.perf_counter()
    result = run(args)
    common.publish(result, markdown, args.out, None if args.no_md else args.md_section, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
