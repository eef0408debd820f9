"""OpenMP's spin at barriers, quiet and with one core busy: which setting `qlin` starts torch with.

Every torch method runs its parallel regions on OpenMP threads that spin at each barrier before
they sleep (GNU libgomp, torch's Linux wheels: GOMP_SPINCOUNT, 300,000 turns by default). When
another process holds one of the cores, a spinning thread holds the core the thread it waits for
needs. This script times one model under each setting, each in a fresh process with the
variables set before torch loads (as `qlin` sets them, `qlin_cli/entry.py`):

- settings: torch's default (none set), `GOMP_SPINCOUNT=1000` (qlin's choice), `10000`,
  `OMP_WAIT_POLICY=PASSIVE` (--settings to change);
- models: BERT-base (`benchmarks/models.py:build_bert`, random weights, sequence 128) in float32,
  quantized with qlin's default (dynamic per-token int8) and as 4-bit groups of 32 (weight-only);
  batches 1 and 32 (4-bit at batch 1 only: it is the decode path);
- phases: quiet, then while `common.CompetingLoad` keeps the last core busy;
- per phase: the median and the worst forward (each timed on its own, after 2 warm-up calls),
  and the process CPU time per forward (all threads).

Targets (issue 23): the chosen setting costs at most 3% of the quiet median against torch's
default; loaded, an int8 forward's median stays within 2x of its quiet median, and its worst
stays under float's loaded median (under torch's default).

    python benchmarks/spin.py --threads 2             # ~10 min on a quiet 2-core machine
    python benchmarks/spin.py --threads 2 --quick     # batch 1 only, fewer forwards

Output: benchmarks/results/spin.json and the `spin` section of RESULTS.md. A script run by
hand, never a test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SPIN_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
SETTINGS = {"torch default": {}, "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
            "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}
METHODS = ("float", "qlin int8 (default)", "qlin 4-bit g32")
SEQ = 128


def _prepare(workdir: Path) -> None:
    """The float weights and the two qlin files, made once (children only load them)."""
    from models import build_bert
    from safetensors.torch import save_file

    from qlin_cli import QuantConfig, quantize_model, save_quantized

    model = build_bert()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, workdir / "float.safetensors")
    for name, config in (("int8", QuantConfig()), ("int4", QuantConfig(mode="weight-only", bits=4, group_size=32))):
        save_quantized(quantize_model(copy.deepcopy(model), config), workdir / f"{name}.safetensors")


def _child(workdir: Path, method: str, batch: int, forwards: int, threads: int) -> dict:
    """In a fresh process (the spin variables already set): load, warm up, time quiet then loaded."""
    from models import bert_inputs, build_bert
    from safetensors.torch import load_file

    from qlin_cli import load_quantized

    common.setup_threads(threads)
    model = build_bert()
    if method == "float":
        model.load_state_dict(load_file(workdir / "float.safetensors"))
    else:
        model = load_quantized(model, workdir / ("int8.safetensors" if "int8" in method else "int4.safetensors"))
    inputs = bert_inputs(batch, SEQ, seed=1)
    out = {}
    with torch.inference_mode():
        for phase in ("quiet", "loaded"):
            common.wait_for_quiet(30)
            load = common.CompetingLoad(os.cpu_count() - 1) if phase == "loaded" else None
            with load or contextlib.nullcontext():
                for _ in range(2):
                    model(**inputs)
                times, c0 = [], time.process_time()
                for _ in range(forwards):
                    t0 = time.perf_counter()
                    model(**inputs)
                    times.append(time.perf_counter() - t0)
                cpu = (time.process_time() - c0) / forwards
            out[phase] = {"median_ms": statistics.median(times) * 1e3, "worst_ms": max(times) * 1e3,
                          "cpu_ms": cpu * 1e3, "forwards": forwards}
    return out


def _run(workdir: Path, setting: dict, method: str, batch: int, forwards: int, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SPIN_VARIABLES}
    env.update(setting, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, "--child", json.dumps([str(workdir), method, batch, forwards, threads])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        q, l = r.get("quiet"), r.get("loaded")
        if q is None:
            rows.append([r["setting"], r["method"], r["batch"], r.get("error", "failed"), "", "", "", "", ""])
            continue
        rows.append([r["setting"], r["method"], r["batch"], common.fmt(q["median_ms"]), common.fmt(l["median_ms"]),
                     common.fmt(l["median_ms"] / q["median_ms"], 2), common.fmt(l["worst_ms"]),
                     common.fmt(q["cpu_ms"]), common.fmt(l["cpu_ms"])])
    return "\n\n".join([
        "## OpenMP spin: quiet and with one core busy (`benchmarks/spin.py`)",
        common.machine_md(result["machine"]),
        f"Command: `{result['command']}`. BERT-base, sequence {SEQ}; each row a fresh process with the "
        "setting in its environment before torch loads; loaded = another process busy on the last core. "
        "ms per forward; CPU = process CPU time per forward, all threads.",
        common.md_table(["setting", "model", "batch", "quiet median", "loaded median", "loaded / quiet",
                         "loaded worst", "CPU quiet", "CPU loaded"], rows),
    ])


def main(argv=None) -> int:
    p = common.script_parser(__doc__, "batch 1 only, fewer forwards")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        workdir, method, batch, forwards, threads = json.loads(args.child)
        print(json.dumps(_child(Path(workdir), method, batch, forwards, threads)))
        return 0
    start = time.perf_counter()
    common.setup_threads(args.threads)
    batches = [1] if args.quick else [1, 32]
    result = {"machine": common.machine_info(args.threads), "rows": [],
              "command": "python benchmarks/spin.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        common.log("quantizing BERT-base twice (int8, 4-bit g32)")
        _prepare(workdir)
        for batch in batches:
            forwards = (20 if args.quick else 40) if batch == 1 else 6
            for method in METHODS:
                if batch > 1 and "4-bit" in method:
                    continue
                for name in args.settings.split(","):
                    common.log(f"  batch {batch}, {method}, {name}")
                    row = _run(workdir, SETTINGS[name], method, batch, forwards, args.threads)
                    result["rows"].append({"setting": name, "method": method, "batch": batch, **row})
    out = Path(args.out) if args.out else common.BENCH_DIR / "results" / ("spin_quick.json" if args.quick else "spin.json")
    common.publish(result, markdown, out, None if args.no_md or args.quick else "spin", start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
