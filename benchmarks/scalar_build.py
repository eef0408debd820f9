"""What `pertoken`'s loops without SIMD are worth against torch's CPU `_int_mm`: the per-token
kernel built two ways on this machine, timed against float32 and `int_mm` (torch's plain-loop
CPU `_int_mm`, the other kernel `auto` has for per-token and static layers on a CPU without
VNNI, and on any CPU that is not x86).

Builds, each in a fresh process with its own kernel cache (a temporary folder):
- `this CPU`: qlin's usual build (`-O3 -march=native`: AVX2 or AVX-512 loops where the CPU has them);
- `no SIMD loops` (x86 only): the same with `-mno-avx -mno-avx2 -mno-fma -mno-f16c`, so the
  kernels report `pertoken_isa == "scalar"`, as on a CPU without AVX2 or a non-x86 one (where the
  compiler still vectorizes the scalar loops with what -march=native allows: SSE here).

Layers (in x out) 768x768 and 2048x2048 (nn.Linear's seeded initialization), M = 1, 16, 64 tokens,
float32 inputs; methods: `float32` (F.linear), `qlin pertoken` (the kernel requested, per-token int8
activations), `qlin int_mm` (the same layer on torch's `_int_mm`). Median wall time, interleaved
(`common.bench_interleaved`).

    python benchmarks/scalar_build.py                 # ~3 min on 2 cores (two builds of ~1 min)

A script run by hand, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = [(768, 768), (2048, 2048)]
TOKENS = [1, 16, 64]
NO_SIMD = ["-mno-avx", "-mno-avx2", "-mno-fma", "-mno-f16c"]
OUT = common.RESULTS_DIR / "scalar_build.json"


def child(flags: list[str], threads: int, budget: float) -> dict:
    """In a fresh process: build the kernels with `flags` added, time the methods."""
    import torch
    import torch.nn as nn

    from qlin_cli.kernels import native
    from qlin_cli.qlinear import QuantizedLinear
    from qlin_cli.scheme import LayerScheme

    common.setup_threads(threads)
    native.CFLAGS = native.CFLAGS + tuple(flags)
    t0 = time.perf_counter()
    kernels = native.load()
    if kernels is None:
        return {"error": native.unavailable_reason()}
    out = {"isa": kernels.pertoken_isa, "build_s": time.perf_counter() - t0, "runs": []}
    for k, n in SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(k, n)
        q = QuantizedLinear.from_float(lin, LayerScheme(kernel="pertoken")).pack("cpu")
        qi = QuantizedLinear.from_float(lin, LayerScheme(kernel="int_mm")).pack("cpu")
        assert (q.kernel.name, qi.kernel.name) == ("pertoken", "int_mm"), (q.kernel, qi.kernel)
        for m in TOKENS:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            with torch.inference_mode():
                fns = {"float32": lambda: lin(x), "qlin pertoken": lambda: q(x), "qlin int_mm": lambda: qi(x)}
                timed = common.bench_interleaved(fns, budget_s=budget)
            out["runs"].append({"in": k, "out": n, "tokens": m,
                                "ms": {name: t.get("median_s", float("nan")) * 1e3 for name, t in timed.items()}})
            common.log(f"  {out['isa']} {k}x{n} M={m}: " + ", ".join(f"{a} {b:.3f} ms" for a, b in out["runs"][-1]["ms"].items()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timing per method per configuration")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--md-section", default="scalar-build", help="the RESULTS.md section to rewrite ('' for none)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child), args.threads, args.budget)))
        return
    start = time.perf_counter()
    builds = {"this CPU": []}
    if platform.machine() in ("x86_64", "AMD64"):
        builds["no SIMD loops"] = NO_SIMD
    result = {"machine": common.machine_info(args.threads), "cpu": common.cpu_summary(),
              "command": "python benchmarks/scalar_build.py " + " ".join(sys.argv[1:]),
              "threads": args.threads, "loadavg_start": os.getloadavg(), "builds": {}}
    with common.tempdir() as tmp:
        for name, flags in builds.items():
            common.log(f"build '{name}' {' '.join(flags)} ...")
            env = dict(os.environ, QLIN_CACHE_DIR=str(Path(tmp) / name.replace(" ", "_")))
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(flags), "--threads", str(args.threads),
                                   "--budget", str(args.budget)], capture_output=True, text=True, env=env, timeout=1800)
            if done.returncode != 0:
                result["builds"][name] = {"flags": flags, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
                continue
            result["builds"][name] = {"flags": flags, **json.loads(done.stdout.strip().splitlines()[-1])}
            common.write_json(args.out, result)
    result["loadavg_end"] = os.getloadavg()
    common.publish(result, markdown, args.out, args.md_section or None, start)


def markdown(result: dict) -> str:
    la0, la1 = result["loadavg_start"], result.get("loadavg_end", result["loadavg_start"])
    parts = [f"## pertoken without SIMD loops against torch's `_int_mm` (`benchmarks/scalar_build.py`, "
             f"{result['threads']} threads)",
             f"CPU: {result['cpu']}. " + common.machine_md(result["machine"]),
             f"Command: `{result['command']}` ({result.get('elapsed_s', 0):.0f} s); load average {la0[0]:.2f} at the "
             f"start, {la1[0]:.2f} at the end. Median ms of one call, methods interleaved; `x int_mm` = int_mm's time / "
             "pertoken's, `x float32` = float32's / pertoken's."]
    rows = []
    for name, b in result["builds"].items():
        if "error" in b:
            rows.append([name, "—", "—", "—", f"error: {b['error'][:80]}", "", "", "", ""])
            continue
        for r in b["runs"]:
            t = r["ms"]
            rows.append([f"{name} ({' '.join(b['flags']) or 'qlin flags'})", b["isa"], f"{r['in']}x{r['out']}", r["tokens"],
                         common.fmt(t["float32"], 3), common.fmt(t["qlin pertoken"], 3), common.fmt(t["qlin int_mm"], 3),
                         common.fmt(t["qlin int_mm"] / t["qlin pertoken"], 1),
                         common.fmt(t["float32"] / t["qlin pertoken"], 2)])
    parts.append(common.md_table(["build", "pertoken_isa", "layer (in x out)", "tokens", "float32 ms", "qlin pertoken ms",
                                  "qlin int_mm ms", "x int_mm", "x float32"], rows))
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
