"""Per-layer benchmark of qlin's weight-only kernel (`lowbit_linear`, issues 15 and 24) against
float32, bfloat16 and torch's weight-only kernels, with the machine's read bandwidth measured in
the same run; and (`--memory`) the resident memory of a loaded model per format.

Layers (N, K) (4096, 4096) and (2048, 5632), M in {1, 2, 4, 16, 128, 512} tokens (x float32
(M, K), seeded Gaussian; weights Gaussian * 0.02, symmetric round-to-nearest):

- `float32`: F.linear(x, w); `bfloat16`: F.linear on bf16 x and w;
- `qlin int8 weight-only`: qlin's panel kernel on int8 per-channel weights (what `weight_only`
  runs on CPU); `torch int8pack`: `_weight_int8pack_mm` on the same weights (what it ran before);
- `qlin int8 per-token`: the same int8 weights with per-token int8 activations (`pertoken`, the
  default int8 kernel; SQNR against float32 on the dequantized weight, so it counts the
  activations' quantization too);
- `qlin 4-bit G=32` / `G=128`: qlin's panel kernel on 4-bit codes with a scale per group;
- `qlin W4A8 G=32` / `G=128`: the same codes with per-token int8 activations (`lowbit_dynamic`:
  an exact integer dot per group, vpmaddubsw on AVX2; SQNR against its own dequantized math);
- `torch int4pack G bf16`: `_weight_int4pack_mm_for_cpu` on the same codes, bf16 activations
  (not batch invariant, so never `auto`'s choice; here to show what that choice costs).

bytes = what a call reads of weights (codes, scales, zero points; float: the weight itself);
GB/s = bytes / median time; "% bw" = that against the read bandwidth of this run (the largest of
torch's `sum` over a 1 GiB float32 tensor, `torch.mv` over a 1 GiB float32 matrix and, wall clock
only, `read_bandwidth.cpp`'s threads each reading 1-8 sequential streams, the same threads), for
M <= 4, where a weight-only layer is bound by memory. Timing: methods interleaved in shuffled rounds after a warm-up call, median; a method
whose first call takes over 1 s gets that one call. SQNR (dB) against float32 F.linear on that
method's own dequantized weight (its arithmetic, not the quantization error).

    python benchmarks/lowbit_kernel.py                 # ~5 min on a quiet 2-core machine;
                                                       # writes the lowbit-kernel section of RESULTS.md
    python benchmarks/lowbit_kernel.py --quick         # (4096, 4096), M = 1, 4 and 512; no RESULTS.md
    python benchmarks/lowbit_kernel.py --memory        # RSS of a loaded model per format (lowbit-memory)
    python benchmarks/lowbit_kernel.py --threads 1 --clock cpu   # a call's CPU cost on one core
                                                       # (robust to a loaded machine; lowbit-kernel-cpu)

A script run by hand, never a test. Timings on a machine shared with other jobs are noisy: the
load average is recorded with each run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import short_error  # noqa: E402

from decode import stream_bandwidth  # noqa: E402
from qlin_cli.kernels import lowbit, lowbit_dynamic, native  # noqa: E402
from qlin_cli.kernels.pertoken import Pertoken  # noqa: E402

SHAPES = [(4096, 4096), (2048, 5632)]
TOKENS = [1, 2, 4, 16, 128, 512]
ROUNDS = {1: 21, 2: 15, 4: 15, 16: 9, 128: 5, 512: 3}
SLOW_S = 1.0
BANDWIDTH_BYTES = 1 << 30


def read_bandwidth(rounds: int = 7, clock=time.perf_counter) -> tuple[float, float]:
    """Bytes per second read from a 1 GiB float32 tensor (median), with the threads torch has
    now, by torch's `sum` and by a matrix-vector product (`torch.mv`, one token of a 1 GiB float32
    layer): on a CPU whose `sum` is bound by its adds (AMD Zen 1) the second is the bound."""
    x = torch.ones(BANDWIDTH_BYTES // 4)
    v = torch.ones(1 << 14)
    xm = x.view(-1, 1 << 14)
    out = []
    for fn in (x.sum, lambda: torch.mv(xm, v)):
        fn()
        times = []
        for _ in range(rounds):
            t0 = clock()
            fn()
            times.append(clock() - t0)
        out.append(BANDWIDTH_BYTES / statistics.median(times))
    return out[0], out[1]


def _quantize(w: torch.Tensor, bits: int, group: int):
    """Symmetric round-to-nearest per group: codes int8 (N, K), scale (N, K / G)."""
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    amax = w.reshape(n, k // group, group).abs().amax(-1).clamp_min(1e-12)
    scale = amax / qmax
    q = (w.reshape(n, k // group, group) / scale[..., None]).round().clamp(-qmax - 1, qmax)
    return q.reshape(n, k).to(torch.int8), scale.float().contiguous()


def _methods(w: torch.Tensor, x: torch.Tensor, m: int):
    """name -> (callable, reference output for its SQNR, weight bytes a call reads)."""
    n, k = w.shape
    ref_f32 = F.linear(x, w)
    wb, xb = w.bfloat16(), x.bfloat16()
    out = {"float32": (lambda: F.linear(x, w), ref_f32, n * k * 4),
           "bfloat16": (lambda: F.linear(xb, wb), ref_f32, n * k * 2)}
    q8, s8 = _quantize(w, 8, k)
    ref8 = F.linear(x, lowbit.dequantize(q8, 8, s8, None, k, k))
    p8 = lowbit.to_panels(q8, 8, s8.reshape(-1), None, None)
    out["qlin int8 weight-only"] = (lambda: lowbit.panel_linear(x, p8), ref8, p8.nbytes())
    pt = Pertoken(q8, s8.reshape(-1), torch.zeros(1, dtype=torch.int32), None, None)
    out["qlin int8 per-token"] = (lambda: pt(x), ref8, q8.numel() + n * 12)  # + scale, wsum, wsum_i
    if m <= 16:  # ~50x float32's time at 512 tokens
        s8v = s8.reshape(-1).contiguous()
        out["torch int8pack"] = (lambda: torch._weight_int8pack_mm(x, q8, s8v), ref8, q8.numel() + s8v.numel() * 4)
    for g in (32, 128):
        q, s = _quantize(w, 4, g)
        p = lowbit.to_panels(q, 4, s, None, g)
        ref = F.linear(x, lowbit.dequantize(q, 4, s, None, g, k))
        out[f"qlin 4-bit G={g}"] = ((lambda p=p: lowbit.panel_linear(x, p)), ref, p.nbytes())
        # W4A8: the same codes, per-token int8 activations, an integer dot per group; SQNR against
        # its own math (dequantized activation codes x dequantized weights)
        d = lowbit_dynamic.to_dot_panels(q, 4, s, None, g)
        zs = torch.zeros(s.shape, dtype=torch.int8)
        ref_d = lowbit_dynamic.lowbit_dynamic_reference(x, q, s, zs, g)
        out[f"qlin W4A8 G={g}"] = ((lambda d=d: _dot(x, d)), ref_d, d.nbytes() - d.wsum.numel() * 4)
        codes = (q.to(torch.int32) + 8).contiguous()
        wp = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.zeros(k // g, n, 2)
        sz[..., 0] = s.t()
        szb = sz.bfloat16()
        out[f"torch int4pack G={g} bf16"] = ((lambda wp=wp, g=g, szb=szb: torch._weight_int4pack_mm_for_cpu(xb, wp, g, szb)),
                                             ref, n * k // 2 + szb.numel() * 2)
    return out


def _dot(x: torch.Tensor, d) -> torch.Tensor:
    e = torch.empty(0)
    return native.load().lowbit_dynamic_linear(x, d.codes, d.scale, d.zq, d.wsum, e, e, d.n, d.k, d.group_size, 0)


def _run_config(n: int, k: int, m: int, rounds: int, seed: int, clock=time.perf_counter) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(m, k, generator=gen)
    methods = _methods(w, x, m)
    res: dict[str, dict] = {}
    times: dict[str, list[float]] = {}
    for name, (fn, ref, nbytes) in methods.items():  # warm-up call, output error, cost estimate
        try:
            t0 = clock()
            y = fn()
            first = clock() - t0
        except Exception as exc:  # a method that fails is reported, never fatal
            res[name] = {"error": short_error(exc)}
            continue
        res[name] = {"sqnr_db": None if name == "float32" else common.sqnr_db(ref, y.float()), "bytes": nbytes}
        times[name] = [first] if first > SLOW_S else []
    rng = random.Random(seed)
    fast = [name for name in times if not times[name]]
    for _ in range(rounds):
        rng.shuffle(fast)
        for name in fast:
            fn = methods[name][0]
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    base = statistics.median(times["float32"])
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name].update(ms=med * 1e3, min_ms=min(ts) * 1e3, samples=len(ts), speedup=base / med,
                         gb_s=res[name]["bytes"] / med / 1e9)
    return res


def _markdown(result: dict) -> str:
    tokens = result["tokens"]
    bw = result["bandwidth_gb_s"]
    parts = [common.machine_md(result["machine"]), "",
             f"Read bandwidth in this run: **{bw:.1f} GB/s**, the largest of torch `sum` over 1 GiB float32 "
             f"({result['bandwidth_sum_gb_s']:.1f}), `torch.mv` over a 1 GiB float32 matrix "
             f"({result['bandwidth_mv_gb_s']:.1f}) and each thread reading sequential streams side by side "
             f"(`read_bandwidth.cpp`: " + (f"{result['bandwidth_streams_gb_s']:.1f}, " if result.get("bandwidth_streams_gb_s") else "")
             + f"{result.get('bandwidth_streams_note', 'not measured')}), {result['threads']} thread(s); "
             f"load average {result['load_average']} at the start. "
             f"qlin's kernel paths built here: {', '.join(result['lowbit_paths'])}.", ""]
    for shape in result["shapes"]:
        n, k = shape["n"], shape["k"]
        header = (["method", "MB read"] + [f"M={m} ms (× f32)" for m in tokens]
                  + [f"M={m} GB/s (% bw)" for m in tokens if m <= 4] + [f"SQNR dB (M={tokens[-1]})"])
        names = list(dict.fromkeys(name for m in tokens for name in shape["by_m"][str(m)]))
        rows = []
        for name in names:
            first = next(shape["by_m"][str(m)][name] for m in tokens if name in shape["by_m"][str(m)])
            row = [name, f"{first['bytes'] / 1e6:.1f}" if "bytes" in first else "—"]
            for m in tokens:
                r = shape["by_m"][str(m)].get(name)
                row.append("—" if r is None else f"error: {r['error'][:40]}" if "error" in r else
                           f"{r['ms']:.2f} ({r['speedup']:.2f}×)" + ("¹" if r["samples"] == 1 else ""))
            for m in (t for t in tokens if t <= 4):
                r = shape["by_m"][str(m)].get(name)
                row.append("—" if r is None or "error" in r else f"{r['gb_s']:.1f} ({100 * r['gb_s'] / bw:.0f}%)")
            last = shape["by_m"][str(tokens[-1])].get(name) or first
            row.append(common.fmt(last.get("sqnr_db")) if "sqnr_db" in last else "—")
            rows.append(row)
        parts += [f"**Layer N={n}, K={k}** (y = x @ w.T, x (M, {k}))", "", common.md_table(header, rows), ""]
    parts.append("¹ one timed call, the first (over 1 s per call). Median of interleaved rounds otherwise; "
                 f"{result['threads']} thread(s), " + ("process CPU time per call (the bandwidth too)."
                                                       if result.get("clock") == "cpu" else "wall time."))
    parts.append("\n    " + result["command"])
    return "\n".join(parts)


# --------------------------------------------------------------------------- resident memory

MEMORY_FORMATS = {
    "float32": None,
    "bfloat16": None,
    "int8 (per-token)": {},
    "int8 weight-only": {"mode": "weight-only"},
    "4-bit G=32": {"bits": 4, "group_size": 32},
    "4-bit G=128": {"bits": 4, "group_size": 128},
    "W4A8 G=32": {"bits": 4, "group_size": 32, "mode": "dynamic"},
}

_LOAD = r"""
import gc, json, sys, torch
sys.path.insert(0, sys.argv[3])
from common import _proc_status_bytes, reset_peak_rss
def current_rss_bytes():
    return _proc_status_bytes("VmRSS")
from qlin_cli import empty_weights, load_quantized
from lowbit_kernel import mlp_stack
from qlin_cli.kernels import lowbit
torch.set_num_threads(2)
# warm up what any first load pays once (the kernels' module, OpenMP's threads, a packing pool)
from qlin_cli import QuantConfig, quantize_model
quantize_model(mlp_stack(1, 256, 512), QuantConfig(bits=4, group_size=32)).model(torch.randn(1, 256))
gc.collect()
base = current_rss_bytes()
reset = reset_peak_rss()
if sys.argv[1] == "float32" or sys.argv[1] == "bfloat16":
    model = mlp_stack(int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    if sys.argv[1] == "bfloat16":
        model = model.bfloat16()
else:
    with empty_weights():
        skeleton = mlp_stack(int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    model = load_quantized(skeleton, sys.argv[2])
peak = _proc_status_bytes("VmHWM") - base if reset else None
gc.collect()
loaded = current_rss_bytes() - base
x = torch.randn(1, int(sys.argv[5]), dtype=next(model.parameters(), torch.empty(0)).dtype
                if sys.argv[1] == "bfloat16" else torch.float32)
with torch.no_grad():
    model(x)  # one call: what a loaded model holds while it serves
gc.collect()
print(json.dumps({"rss": current_rss_bytes() - base, "rss_loaded": loaded, "peak": peak}))
"""


def mlp_stack(blocks: int, hidden: int, inter: int) -> nn.Module:
    """A Llama-shaped stack of MLPs: per block up (inter, hidden), then down (hidden, inter), no
    bias; seeded."""
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(hidden, inter, bias=False), nn.Linear(inter, hidden, bias=False)]
    return nn.Sequential(*layers).eval()


def memory(blocks: int, hidden: int, inter: int) -> dict:
    """RSS a fresh process gains by loading the model (and running one token), per format."""
    from qlin_cli import QuantConfig, quantize_model, save_quantized
    from qlin_cli.qlinear import QuantizedLinear

    weights = blocks * 2 * hidden * inter
    out = {"blocks": blocks, "hidden": hidden, "intermediate": inter, "weights": weights, "formats": {}}
    bench = str(Path(__file__).resolve().parent)
    with tempfile.TemporaryDirectory() as tmp:
        for name, keys in MEMORY_FORMATS.items():
            path, held = Path(tmp) / "m.safetensors", None
            if keys is not None:
                result = quantize_model(mlp_stack(blocks, hidden, inter), QuantConfig(**keys))
                held = sum(m._run.panels.nbytes() if hasattr(m._run, "panels") else m.weight.numel() + 4 * m.weight_scale.numel()
                           for m in result.model.modules() if isinstance(m, QuantizedLinear))
                save_quantized(result, path, force=True)
                del result
            common.log(f"memory: {name} ...")
            done = subprocess.run([sys.executable, "-c", _LOAD, name, str(path), bench, str(blocks), str(hidden),
                                   str(inter)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(common.REPO)})
            if done.returncode != 0:
                out["formats"][name] = {"error": done.stderr.strip().splitlines()[-1][:200]}
                continue
            got = json.loads(done.stdout.strip().splitlines()[-1])
            file_bytes = path.stat().st_size if path.exists() else weights * (4 if name == "float32" else 2)
            out["formats"][name] = {**got, "kernel_bytes": held if held is not None else file_bytes,
                                    "file_bytes": file_bytes}
    return out


def _memory_markdown(result: dict) -> str:
    mem = result["memory"]
    rows = []
    for name, r in mem["formats"].items():
        if "error" in r:
            rows.append([name, f"error: {r['error'][:60]}", "—", "—", "—", "—", "—"])
            continue
        peak = r.get("peak")
        rows.append([name, f"{r['rss'] / 2**20:.0f}", f"{r['kernel_bytes'] / 2**20:.0f}", f"{r['file_bytes'] / 2**20:.0f}",
                     f"{r['rss'] / r['kernel_bytes']:.2f}", "—" if peak is None else f"{peak / 2**20:.0f}",
                     "—" if peak is None else f"{peak / r['file_bytes']:.2f}"])
    return "\n".join([
        common.machine_md(result["machine"]), "",
        f"A Llama-shaped stack of {mem['blocks']} MLP blocks (up {mem['intermediate']}x{mem['hidden']}, down "
        f"{mem['hidden']}x{mem['intermediate']}, {mem['weights'] / 1e6:.0f} M weights), loaded in a fresh process "
        "(a quantized model: a skeleton on the meta device, `load_quantized`), after one token; RSS gained over "
        "the process before loading (after a warm-up that loads the kernels and starts the threads). \"read per token\": "
        "the bytes the kernels hold and read (float: the weights; int8 per-token: the int8 weight and its scales). "
        "\"peak loading\": the most RSS the process held (VmHWM, reset before) while `load_quantized` ran, over the same base "
        "(float formats: building the model).",
        "", common.md_table(["format", "RSS MiB", "read per token MiB", "file MiB", "RSS / read", "peak loading MiB",
                             "peak / file"], rows), "",
        "    " + result["command"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="(4096, 4096) at M = 1, 4 and 512; RESULTS.md untouched")
    p.add_argument("--tokens", help="token counts, e.g. 1,4 (default 1,2,4,16,128,512)")
    p.add_argument("--shapes", help="layers NxK, e.g. 4096x4096,2048x5632 (default: those two)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time calls by this process's CPU time (with --threads 1: a call's own cost, robust "
                        "to other jobs on the machine; section lowbit-kernel-cpu)")
    p.add_argument("--memory", action="store_true", help="RSS of a loaded model per format (section lowbit-memory)")
    p.add_argument("--blocks", type=int, default=4, help="--memory: MLP blocks (hidden 2048, intermediate 5632)")
    p.add_argument("--no-md", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--out", help="JSON output path (default benchmarks/results/lowbit_kernel[_quick][_cpu].json, "
                                 "lowbit_memory.json)")
    args = p.parse_args()
    common.setup_threads(args.threads)
    start = time.perf_counter()
    command = "python benchmarks/lowbit_kernel.py " + " ".join(sys.argv[1:])
    kernels = native.load()
    if kernels is None or not hasattr(kernels, "lowbit_paths"):
        raise SystemExit(f"qlin's kernels are not built here: {native.unavailable_reason()}")
    result = {"machine": common.machine_info(args.threads), "threads": args.threads, "command": command.strip(),
              "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    if args.memory:
        result["memory"] = memory(args.blocks, 2048, 5632)
        out = Path(args.out) if args.out else common.RESULTS_DIR / "lowbit_memory.json"
        common.publish(result, _memory_markdown, out, None if args.no_md else "lowbit-memory", start)
        return
    shapes, tokens = (SHAPES[:1], [1, 4, 512]) if args.quick else (SHAPES, TOKENS)
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    name = "lowbit_kernel" + ("_quick" if args.quick else "") + ("_cpu" if args.clock == "cpu" else "")
    out_path = Path(args.out) if args.out else common.RESULTS_DIR / f"{name}.json"
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    by_sum, by_mv = read_bandwidth(clock=clock)
    streams = stream_bandwidth(args.threads) if args.clock == "wall" else {"unavailable": "--clock cpu"}
    by_streams = streams.get(str(args.threads), 0.0)
    result.update(lowbit_paths=list(kernels.lowbit_paths), tokens=tokens, shapes=[], clock=args.clock,
                  bandwidth_sum_gb_s=by_sum / 1e9, bandwidth_mv_gb_s=by_mv / 1e9,
                  bandwidth_streams_gb_s=by_streams / 1e9 or None,
                  bandwidth_streams_note=streams.get("unavailable") or f"{streams['streams'][str(args.threads)]} streams a thread",
                  bandwidth_gb_s=max(by_sum, by_mv, by_streams) / 1e9)
    common.log(f"read bandwidth {result['bandwidth_gb_s']:.1f} GB/s")
    for n, k in shapes:
        entry = {"n": n, "k": k, "by_m": {}}
        for m in tokens:
            common.log(f"N={n} K={k} M={m} ...")
            entry["by_m"][str(m)] = r = _run_config(n, k, m, ROUNDS.get(m, 3), seed=n + k + m, clock=clock)
            common.log("  " + ", ".join(f"{name} {v['ms']:.2f} ms" for name, v in r.items() if "ms" in v))
        result["shapes"].append(entry)
    section = None if args.quick or args.no_md or args.tokens or args.shapes else \
        "lowbit-kernel" + ("-cpu" if args.clock == "cpu" else "")
    common.publish(result, _markdown, out_path, section, start)


if __name__ == "__main__":
    main()
