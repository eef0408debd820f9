"""Micro-benchmark of qlin's n-bit group-wise weight-only kernel (`lowbit_linear`, issue 15).

For layers (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008)} and M in {1, 4, 16, 128}
tokens (x float32 (M, K), seeded Gaussian; weight Gaussian * 0.02, symmetric round-to-nearest):

- `float32`: F.linear(x, w) (the float layer); `bfloat16`: F.linear on bf16 x and w;
- `qlin 4-bit G=32/64/128/K`: qlin's fused kernel on packed 4-bit codes with a scale per group of
  G input channels (G = K: per channel); `qlin 8-bit per channel`: the same kernel on int8;
- `torch int4pack G fp32/bf16`: torch's `_weight_int4pack_mm_for_cpu` on the same 4-bit codes
  (`_convert_weight_to_int4pack_for_cpu(codes 0..15 as int32, 1)`, scales_and_zeros (K/G, N, 2)
  with w = (code - 8) * s + 0), float32 and bfloat16 activations (it takes G in 32..256 only);
  float32 activations cost ~0.1 s per call per token, so from M = 4 it runs for G = 128 only;
- `torch int8pack`: `_weight_int8pack_mm` on the same int8 per-channel weights.

Timing: all methods of a configuration interleaved (a fresh shuffled order each round), after a
warm-up call; median of the rounds (fewer rounds at large M); a method whose first call takes
over 1 s is not repeated: that call is its one sample. Speedup = float32 median / method median. SQNR (dB) of each output
against float32 F.linear with that method's own dequantized weight (for float32 and bfloat16:
the float weight), so it measures the kernel's arithmetic, not the quantization error.

    python benchmarks/lowbit_kernel.py                    # ~5 min on a quiet 2-core machine
    python benchmarks/lowbit_kernel.py --quick            # (4096, 4096), M = 1 and 16
    python benchmarks/lowbit_kernel.py --threads 1 --clock cpu --tokens 1,4 \
        --out benchmarks/results/lowbit_kernel_1thread_cpu.json   # a call's CPU cost, one core

Output: a Markdown table on stdout, benchmarks/results/lowbit_kernel.json (--out to change).
A script run by hand, never a test. Timings on a machine shared with other jobs are noisy.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import short_error  # noqa: E402

from qlin_cli.kernels import lowbit, native  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [1, 4, 16, 128]
GROUPS = [32, 64, 128, None]  # None: per channel (G = K)
ROUNDS = {1: 15, 4: 11, 16: 7, 128: 3}
SLOW_S = 1.0  # a method slower than this per call gets one timed call


def _quantize(w: torch.Tensor, bits: int, group: int):
    """Symmetric round-to-nearest per group: codes int8 (N, K) in [-2^(b-1), 2^(b-1) - 1],
    scale (N, K / G)."""
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    amax = w.reshape(n, k // group, group).abs().amax(-1).clamp_min(1e-12)
    scale = amax / qmax
    q = (w.reshape(n, k // group, group) / scale[..., None]).round().clamp(-qmax - 1, qmax)
    return q.reshape(n, k).to(torch.int8), scale.float().contiguous()


def _methods(w: torch.Tensor, x: torch.Tensor, m: int):
    """name -> (callable, reference output for its SQNR)."""
    n, k = w.shape
    kernels = native.load()
    if kernels is None or not hasattr(kernels, "lowbit_linear"):
        raise SystemExit(f"qlin's fused kernels are not built here: {native.unavailable_reason()}")
    no_z, no_b = torch.empty(0, dtype=torch.int8), torch.empty(0)
    ref_f32 = F.linear(x, w)
    wb, xb = w.bfloat16(), x.bfloat16()
    out = {"float32": (lambda: F.linear(x, w), ref_f32), "bfloat16": (lambda: F.linear(xb, wb), ref_f32)}
    for group in GROUPS:
        g = group or k
        q, s = _quantize(w, 4, g)
        packed = lowbit.pack_int4(q)
        ref = F.linear(x, lowbit.dequantize(packed, 4, s, None, g, k))
        label = f"G={group}" if group else "per channel"
        out[f"qlin 4-bit {label}"] = ((lambda p=packed, s=s, g=g: kernels.lowbit_linear(x, p, 4, s, no_z, g, no_b)), ref)
        if group is None:
            continue
        codes = (q.to(torch.int32) + 8).contiguous()
        wp = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.zeros(k // g, n, 2)
        sz[..., 0] = s.t()
        szb = sz.bfloat16()
        out[f"torch int4pack G={g} bf16"] = ((lambda wp=wp, g=g, szb=szb: torch._weight_int4pack_mm_for_cpu(xb, wp, g, szb)), ref)
        if m == 1 or g == 128:
            out[f"torch int4pack G={g} fp32"] = ((lambda wp=wp, g=g, sz=sz: torch._weight_int4pack_mm_for_cpu(x, wp, g, sz)), ref)
    q8, s8 = _quantize(w, 8, k)
    ref8 = F.linear(x, lowbit.dequantize(q8, 8, s8, None, k, k))
    out["qlin 8-bit per channel"] = (lambda: kernels.lowbit_linear(x, q8, 8, s8, no_z, k, no_b), ref8)
    s8v = s8.reshape(-1).contiguous()
    out["torch int8pack"] = (lambda: torch._weight_int8pack_mm(x, q8, s8v), ref8)
    return out


def _run_config(n: int, k: int, m: int, rounds: int, seed: int, clock=time.perf_counter) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(m, k, generator=gen)
    methods = _methods(w, x, m)
    res: dict[str, dict] = {}
    times: dict[str, list[float]] = {}
    for name, (fn, ref) in methods.items():  # warm-up call, output error, cost estimate
        try:
            t0 = clock()
            y = fn()
            first = clock() - t0
        except Exception as exc:  # a method that fails is reported, never fatal
            res[name] = {"error": short_error(exc)}
            continue
        res[name] = {"sqnr_db": None if name == "float32" else common.sqnr_db(ref, y.float())}
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
        res[name].update(ms=med * 1e3, min_ms=min(ts) * 1e3, samples=len(ts), speedup=base / med)
    return res


def _markdown(result: dict) -> str:
    tokens = result["tokens"]
    parts = [common.machine_md(result["machine"]), ""]
    for shape in result["shapes"]:
        n, k = shape["n"], shape["k"]
        header = ["method"] + [f"M={m} ms (× f32)" for m in tokens] + [f"SQNR dB (M={tokens[-1]})"]
        names = list(dict.fromkeys(name for m in tokens for name in shape["by_m"][str(m)]))
        rows = []
        for name in names:
            row = [name]
            for m in tokens:
                r = shape["by_m"][str(m)].get(name)
                if r is None:
                    row.append("—")
                elif "error" in r:
                    row.append(f"error: {r['error'][:40]}")
                else:
                    row.append(f"{r['ms']:.2f} ({r['speedup']:.2f}×)" + ("¹" if r["samples"] == 1 else ""))
            last = shape["by_m"][str(tokens[-1])].get(name) or shape["by_m"][str(tokens[0])].get(name, {})
            row.append(common.fmt(last.get("sqnr_db")) if "sqnr_db" in last else "—")
            rows.append(row)
        parts += [f"**Layer N={n}, K={k}** (y = x @ w.T, x (M, {k}))", "", common.md_table(header, rows), ""]
    parts.append("¹ one timed call, the first (over 1 s per call). Median of interleaved rounds otherwise; "
                 f"{result['threads']} thread(s), " + ("process CPU time per call." if result["clock"] == "cpu" else "wall time."))
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="(4096, 4096) at M = 1 and 16 only")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time calls by this process's CPU time (with --threads 1, a call's own "
                        "cost, robust to other jobs on the machine)")
    p.add_argument("--tokens", help="token counts, e.g. 1,4 (default 1,4,16,128)")
    p.add_argument("--shapes", help="layers NxK, e.g. 4096x4096,11008x4096 (default: the three above)")
    p.add_argument("--out", help="JSON output path (default benchmarks/results/lowbit_kernel[_quick].json)")
    args = p.parse_args()
    common.setup_threads(args.threads)
    shapes, tokens = (SHAPES[:1], [1, 16]) if args.quick else (SHAPES, TOKENS)
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    out_path = Path(args.out) if args.out else common.RESULTS_DIR / ("lowbit_kernel_quick.json" if args.quick else "lowbit_kernel.json")
    start = time.perf_counter()
    kernels = native.load()
    result = {
        "machine": common.machine_info(args.threads),
        "threads": args.threads,
        "clock": args.clock,
        "avx512_path": bool(getattr(kernels, "lowbit_avx512", False)),
        "tokens": tokens,
        "shapes": [],
    }
    for n, k in shapes:
        entry = {"n": n, "k": k, "by_m": {}}
        for m in tokens:
            common.log(f"N={n} K={k} M={m} ...")
            entry["by_m"][str(m)] = _run_config(n, k, m, ROUNDS.get(m, 3 if m > 16 else 9), seed=n + k + m,
                                                clock=time.process_time if args.clock == "cpu" else time.perf_counter)
            f32 = entry["by_m"][str(m)]["float32"]["ms"]
            q4 = entry["by_m"][str(m)]["qlin 4-bit G=128"]["ms"]
            common.log(f"  float32 {f32:.2f} ms, qlin 4-bit G=128 {q4:.2f} ms ({f32 / q4:.2f}×)")
        result["shapes"].append(entry)
    common.publish(result, _markdown, out_path, None, start)


if __name__ == "__main__":
    main()
