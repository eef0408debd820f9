"""The per-call cost of one layer (issue 23 item 1): float32 and bfloat16 `F.linear`, torch.ao's
`quantize_dynamic` Linear, and qlin's per-token int8 layer (`auto`: the `onednn` kernel on VNNI
CPUs, `pertoken` on AVX2 ones) against what it replaced, at 1, 16 and 128 tokens.

Layers (in, out): 384x384, 384x1536, 768x768, 4096x4096 (nn.Linear's seeded initialization, with
bias); inputs `(M, in)` float32 (bfloat16 for the bf16 row: a model cast to bf16 passes bf16).
Methods:
- `float32`: `F.linear(x, w, b)`; `bf16`: the same in bfloat16;
- `torch.ao dynamic`: `torch.ao.quantization.quantize_dynamic` (default qconfig: per-tensor
  weights and activations, fbgemm `linear_dynamic`), the module call;
- `qlin onednn, three calls`: the packed layer's `_three_calls` (quantize_rows, oneDNN's GEMM,
  epilogue_: what every call ran before the one-call path, at any M);
- `qlin onednn`: the packed layer as it runs now (one `pertoken_linear` call up to
  `pertoken_max_rows` rows, the three calls above), and `qlin module`: the whole
  `QuantizedLinear` call (reshapes included).
For each (threads, shape, M) the methods are timed round-robin, one call at a time; reported per
call: median wall time, median CPU time of the calling thread (`time.thread_time_ns`: with one
thread all of the work, with two the caller's share), and the process's CPU time per call
(`time.process_time_ns` over all calls, so with two threads it includes the worker, spinning
included). The load average is recorded before each thread count: on a shared machine wall times
are noisy and thread CPU times are the steadier figure.

    python benchmarks/layer_cost.py                 # ~2 min quiet; writes benchmarks/results/layer_cost.json
    python benchmarks/layer_cost.py --threads 1 --budget 0.2 --out /tmp/x.json
    python benchmarks/layer_cost.py --threads 1 --shapes 64x64,128x128,256x256,128x512 \
        --out benchmarks/results/layer_cost_small.json    # below auto's SMALL_LAYER (2**17 weights)
    python benchmarks/layer_cost.py --threads 2 --float16 --shapes 768x768,2048x2048,2048x5632 \
        --md-section fp16-layers --out benchmarks/results/layer_cost_fp16.json   # float16 models too

This is a script run by hand, never a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Unavailable  # noqa: E402

from qlin_cli.qlinear import QuantizedLinear  # noqa: E402
from qlin_cli.scheme import LayerScheme  # noqa: E402

SHAPES = [(384, 384), (384, 1536), (768, 768), (4096, 4096)]
TOKENS = [1, 16, 128]
OUT = common.RESULTS_DIR / "layer_cost.json"


def _methods(lin: nn.Linear, m: int, float16: bool = False) -> dict:
    """name -> (callable, its input) for one layer and token count."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, lin.in_features, generator=g)
    w, b = lin.weight.detach(), lin.bias.detach()
    wb, bb, xb = w.bfloat16(), b.bfloat16(), x.bfloat16()
    q = QuantizedLinear.from_float(lin, LayerScheme()).pack("cpu")  # auto: onednn (VNNI) or pertoken (AVX2)
    assert q.kernel.name in ("onednn", "pertoken"), q.kernel
    methods = {"float32": (lambda x: F.linear(x, w, b), x), "bf16": (lambda x: F.linear(x, wb, bb), xb)}
    if q.kernel.name == "onednn":  # what every call ran before the one-call path
        methods["qlin onednn, three calls"] = (q._run._three_calls, x)
    elif m * lin.in_features * lin.out_features <= 1 << 25:  # what auto ran on CPUs without VNNI
        # before the pertoken kernel; left out above ~33M multiply-adds (5 s a call at 4096x4096 x 16 here)
        methods["qlin int_mm"] = (QuantizedLinear.from_float(lin, LayerScheme(kernel="int_mm")).pack("cpu"), x)
    methods[f"qlin {q.kernel.name}"] = (q._run, x)
    methods["qlin module"] = (q, x)
    qb = QuantizedLinear.from_float(lin, LayerScheme()).pack("cpu").to(torch.bfloat16)
    methods["qlin module, bf16 in/out"] = (qb, xb)  # the int8 layer of a model cast to bf16
    if float16:  # a float16 model (transformers loads float16 checkpoints so): its layer, and qlin's int8 one
        lh = nn.Linear(lin.in_features, lin.out_features).half()
        lh.load_state_dict(lin.state_dict())
        methods["float16"] = (lambda x: F.linear(x, lh.weight, lh.bias), x.half())
        qh = QuantizedLinear.from_float(lh, LayerScheme()).pack("cpu")
        assert qh.kernel.name in ("onednn", "pertoken"), qh.kernel
        methods["qlin module, float16"] = (qh, x.half())
        if m * lin.in_features * lin.out_features <= 1 << 25:  # what auto ran for float16 before (int_mm)
            methods["qlin int_mm, float16"] = (QuantizedLinear.from_float(lh, LayerScheme(kernel="int_mm")).pack("cpu"),
                                               x.half())
    try:
        methods["torch.ao dynamic"] = (common.torch_ao_dynamic(lin), x)
    except Unavailable as exc:
        common.log(f"torch.ao dynamic: unavailable ({exc})")
    return methods


def _time(methods: dict, budget: float) -> dict:
    """Round-robin single calls until each method had ~budget seconds (at least 5 calls)."""
    wall = {k: [] for k in methods}
    cpu = {k: [] for k in methods}
    proc = dict.fromkeys(methods, 0)
    spent = dict.fromkeys(methods, 0.0)
    with torch.inference_mode():
        for fn, x in methods.values():  # warm-up
            for _ in range(3):
                fn(x)
        while min(spent.values()) < budget or min(len(v) for v in wall.values()) < 5:
            for name, (fn, x) in methods.items():
                p0, c0, t0 = time.process_time_ns(), time.thread_time_ns(), time.perf_counter_ns()
                fn(x)
                t1, c1, p1 = time.perf_counter_ns(), time.thread_time_ns(), time.process_time_ns()
                wall[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
                proc[name] += p1 - p0
                spent[name] += (t1 - t0) / 1e9
    return {name: {"wall_us": statistics.median(wall[name]) / 1e3, "thread_cpu_us": statistics.median(cpu[name]) / 1e3,
                   "process_cpu_us": proc[name] / len(wall[name]) / 1e3, "calls": len(wall[name])} for name in methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per method per configuration")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="in x out, e.g. 128x128,256x256")
    parser.add_argument("--float16", action="store_true",
                        help="also a float16 layer, qlin's int8 layer of it, and int_mm's (what float16 layers ran before)")
    parser.add_argument("--md-section", default="layer-cost", help="the RESULTS.md section to rewrite ('' for none)")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    result = {"machine": common.machine_info(torch.get_num_threads()), "runs": []}
    for threads in [int(t) for t in args.threads.split(",")]:
        common.setup_threads(threads)
        load = os.getloadavg()
        common.log(f"{threads} thread(s), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        for k, n in shapes:
            lin = nn.Linear(k, n)
            torch.manual_seed(0)
            lin.reset_parameters()
            for m in TOKENS:
                timings = _time(_methods(lin, m, args.float16), args.budget)
                result["runs"].append({"threads": threads, "in": k, "out": n, "tokens": m, "loadavg_before": load,
                                       "loadavg_after": os.getloadavg(), "methods": timings})
                common.log(f"  {k}x{n} M={m}: " + ", ".join(
                    f"{name} {t['wall_us']:.1f}/{t['thread_cpu_us']:.1f}" for name, t in timings.items()))
                common.write_json(args.out, result)  # after each configuration: a cut-short run keeps its part
    if args.md_section:
        result["command"] = "python benchmarks/layer_cost.py " + " ".join(sys.argv[1:])
        common.update_results_md(args.md_section, markdown(result))
    common.log(f"wrote {args.out}" + (f" and the {args.md_section} section of RESULTS.md" if args.md_section else ""))


def markdown(result: dict) -> str:
    """One table per thread count: median wall µs per call of each method, and qlin's module
    against float32 and bf16."""
    parts = ["## The per-call cost of one layer (`benchmarks/layer_cost.py`)", common.machine_md(result["machine"]),
             f"Command: `{result.get('command', 'python benchmarks/layer_cost.py')}`. Median wall µs of one call "
             "(methods timed round-robin, one call at a time); `qlin onednn, three calls` (VNNI CPUs) is the path "
             "every call took before the one-call path (and still takes above 16 rows); `qlin int_mm` (CPUs "
             "without VNNI) is what `auto` ran there before the `pertoken` kernel; `qlin module` is the whole "
             "`QuantizedLinear` call, `bf16 in/out` the same layer in a model cast to bf16; `x f32` / `x bf16` = "
             "that method's time / qlin module's" + ("; `float16` (`--float16`): the layer in float16, `qlin module, "
             "float16` qlin's int8 layer of it (float16 in and out), `qlin int_mm, float16` what `auto` ran for "
             "float16 layers before this release (torch's plain-loop CPU `_int_mm`; left out above 2**25 "
             "multiply-adds), `x f16` = float16 / qlin module, float16." if any(
                 "float16" in r["methods"] for r in result["runs"]) else ".")]
    names = list(dict.fromkeys(k for r in result["runs"] for k in r["methods"]))
    f16 = "float16" in names
    for threads in sorted({r["threads"] for r in result["runs"]}):
        rows = []
        for r in (r for r in result["runs"] if r["threads"] == threads):
            t = {k: v["wall_us"] for k, v in r["methods"].items()}
            rows.append([f"{r['in']}x{r['out']}", r["tokens"], *(common.fmt(t.get(k)) for k in names),
                         common.fmt(t["float32"] / t["qlin module"], 2), common.fmt(t["bf16"] / t["qlin module"], 2),
                         *([common.fmt(t["float16"] / t["qlin module, float16"], 2)] if f16 else [])])
        load = next(r["loadavg_before"] for r in result["runs"] if r["threads"] == threads)
        parts += [f"{threads} thread(s), load average {load[0]:.2f} before:",
                  common.md_table(["layer (in x out)", "tokens", *names, "x f32", "x bf16", *(["x f16"] if f16 else [])],
                                  rows)]
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
