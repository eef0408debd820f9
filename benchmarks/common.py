"""Shared helpers of the qlin benchmark scripts (`benchmarks/layer_kernels.py`, `benchmarks/models.py`).

Not a benchmark itself and not a test. It holds:

- `machine_info()`: CPU model and int8-relevant flags (VNNI, AMX), torch and peer versions,
  threads, the qlin git commit; recorded at the top of every result file;
- `bench_interleaved()`: median latency of several callables timed round-robin (interleaved),
  after a warm-up, with per-method sample counts sized to a time budget;
- `sqnr_db()`, `row_cosine()`: output error metrics against a float reference;
- the peers (torch.ao `quantize_dynamic`, torchao `quantize_`, ONNX Runtime `quantize_dynamic`),
  each behind a function that raises `Unavailable` with a one-line reason instead of crashing;
- `update_results_md()`: rewrites one marked section of `benchmarks/RESULTS.md`, leaving the rest
  of the file (hand-written notes) alone;
- `cpu_summary()` (the CPU in one phrase: vendor, AVX-512 or not, AMX or not), `read_bandwidth()`
  (the machine's read bandwidth with N threads), `run_child()` (a command's output and its own
  peak RSS), `rss_bytes()` and `peak_rss_bytes()` (this process's).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"

if str(REPO) not in sys.path:  # so that `sample_models` and an uninstalled `qlin_cli` import
    sys.path.insert(0, str(REPO))

# Peers print import-time noise through logging (torchao's optional CUDA .so files, torch's
# pytree deprecation notes, ORT's "consider pre-processing" advice); keep it off the console.
for _name in ("torchao", "torch.utils._pytree", "root", "onnxruntime", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class Unavailable(Exception):
    """A peer or method that cannot run here; the message is the one-line reason."""


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "qlin_cli"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty(qlin_cli)" if dirty else "")) or None
    except Exception:
        return None


def cpu_summary() -> str:
    """The CPU in one phrase for a results table: model, vendor, the widest vector and int8/bf16
    extensions, and AMX or not, e.g. `AMD EPYC (AuthenticAMD): AVX2, no AVX-512, no AMX`."""
    vendor, flags = "?", set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    have = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"), ("avx512_bf16", "AVX-512 BF16"),
                                     ("avx_vnni", "AVX-VNNI")) if flag in flags]
    if "avx512f" not in flags:
        have = (["AVX2"] if "avx2" in flags else []) + ["no AVX-512"] + [h for h in have if h == "AVX-VNNI"]
    amx = "AMX (" + ", ".join(f for f in ("amx_int8", "amx_bf16") if f in flags) + ")" if "amx_tile" in flags else "no AMX"
    return f"{_cpu_model()} ({vendor}): {', '.join(have + [amx])}"


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "threads_requested": threads,
        "quantized_engine": torch.backends.quantized.engine,
        "qlin_commit": _git_commit(),
        "peers": {name: _version(name) for name in ("torchao", "onnxruntime", "onnx", "transformers")},
    }


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (interop threads can be set once per process)
        pass


def machine_md(info: dict[str, Any]) -> str:
    peers = ", ".join(f"{k} {v}" for k, v in info["peers"].items() if v) or "none"
    return (
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, flags "
        f"{' '.join(info['cpu_flags']) or '(none found)'}; torch {info['torch']} "
        f"({info['torch_threads']} threads, quantized engine {info['quantized_engine']}); "
        f"Python {info['python']}; peers: {peers}; qlin commit {info['qlin_commit']}; "
        f"run {info['date']}."
    )


# ----------------------------------------------------------------------------------- timing


def bench_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    budget_s: float,
    min_samples: int = 3,
    max_samples: int | dict[str, int] = 25,
    sample_s: float = 0.002,
    warmup_s: float = 0.02,
    max_disturbed_factor: float = 3.0,
    warm: dict[str, float] | None = None,
    log: Callable[[str], None] | None = None,
    cpu_gap_s: float | None = None,
    exclude_pids: tuple[int, ...] = (),
    inner_override: dict[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Median wall time of one call of each callable, timed interleaved.

    Warm-up: every callable runs once untimed, then once timed (the cost estimate; a first call
    over 1 s is used as the estimate itself), then for ~`warmup_s` more. A sample is `inner`
    back-to-back calls (enough to last `sample_s`) divided by `inner`. Each callable gets
    `clamp(budget_s / sample time, min_samples, max_samples)` samples; the rounds go over all
    callables that still need samples, in a freshly shuffled order each round (seeded), so that
    no callable always follows the same one (what runs just before a call, and what it left in
    the caches, measurably shifts its time). `max_samples` may be a dict (name -> cap, default 25).
    `warm` (name -> seconds of a call already made) skips the
    warm-up of those callables and uses the figure as the estimate (for calls of seconds).

    Rounds during which other processes ran for 3+ clock ticks and more than 5% of a core
    (measured from /proc/stat) are "disturbed": their samples are set aside and the round is redone, until the disturbed
    rounds' time exceeds `max_disturbed_factor` times the clean rounds' planned time; if too few
    clean samples remain, all samples are used. A callable that raises is reported with `error`
    and dropped. Returns {name: {median_s, min_s, max_s, samples, inner, set_aside,
    kept_disturbed_rounds}} or {name: {error}}.

    `cpu_gap_s` (the loaded-machine mode of models.py): every call is timed on its own, so the
    figures are per single call (`median_s`, `min_s` and `max_s`, the worst call). A sample is
    `inner` back-to-back calls (at least 2 for callables not in `warm`, 1 for those in `warm`),
    followed by a pause of `cpu_gap_s` seconds; each callable gets exactly its `max_samples`
    samples. The first call of a sample of 2+ is left out of the wall-time figures (after the
    pause, idle worker threads and, in a VM, idle virtual CPUs must be woken: measured ~1.5 ms
    here, which would swamp a 0.2 ms forward) but counted in the CPU time. The process CPU time
    (all its threads: `time.process_time`) is taken around the sample (`cpu_s`, per call) and
    over the pause (`cpu_tail_s`, per call: what the idle worker threads still burn spinning
    after the last call returned, e.g. OpenMP's spin-wait; the pause also keeps one method's
    tail out of the next one's figure). `inner_override` (name -> calls per sample) fixes the
    sample size, e.g. to that of an earlier run, so that two runs' worst calls compare like
    with like; `inner` is returned. `exclude_pids`: processes (a load generator started on
    purpose) whose CPU time does not count as "other processes" when deciding whether a round
    was disturbed.
    """
    out: dict[str, dict[str, Any]] = {}
    est: dict[str, float] = {}
    for name, fn in fns.items():
        if warm and name in warm:
            est[name] = warm[name]
            continue
        try:
            t0 = time.perf_counter()
            fn()
            first = time.perf_counter() - t0
            if first < 1.0:
                t0 = time.perf_counter()
                fn()
                first = time.perf_counter() - t0
                end = time.perf_counter() + warmup_s
                while time.perf_counter() < end:
                    fn()
            est[name] = max(first, 1e-7)
        except Exception as exc:  # a method that fails is reported, never fatal
            out[name] = {"error": short_error(exc)}
            if log:
                log(f"  {name}: {out[name]['error']}")
    per_call = cpu_gap_s is not None
    inner = {n: max(1, int(sample_s / e)) for n, e in est.items()}
    if per_call:
        inner = {n: 1 if warm and n in warm else max(2, k) for n, k in inner.items()}
    if inner_override:
        inner.update({n: k for n, k in inner_override.items() if n in inner})
    cap = {n: max_samples.get(n, 25) if isinstance(max_samples, dict) else max_samples for n in est}
    target = {n: int(min(cap[n], max(min_samples, budget_s / (est[n] * inner[n])))) for n in est}
    if per_call:  # a fixed count (the cap), so that the worst of the samples compares like with like
        target = {n: max(min_samples, cap[n]) for n in est}
    planned = sum(target[n] * inner[n] * est[n] for n in est)
    clean: dict[str, list[float]] = {n: [] for n in est}
    dirty: dict[str, list[float]] = {n: [] for n in est}
    # per-call mode: the single calls' times of each sample, and (cpu in the sample, cpu in the
    # pause after it, calls), kept alongside clean/dirty
    calls_clean: dict[str, list[float]] = {n: [] for n in est}
    calls_dirty: dict[str, list[float]] = {n: [] for n in est}
    cpu_clean: dict[str, list[tuple[float, float, int]]] = {n: [] for n in est}
    cpu_dirty: dict[str, list[tuple[float, float, int]]] = {n: [] for n in est}
    disturbed_time = 0.0
    forced = 0
    names = list(est)
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        rng = random.Random(0)
        while names:
            order = list(names)
            rng.shuffle(order)  # a fresh order each round: no callable always follows the same one
            got: dict[str, float] = {}
            got_calls: dict[str, list[float]] = {}
            got_cpu: dict[str, tuple[float, float, int]] = {}
            with OtherLoad(exclude_pids) as load:
                for name in order:
                    fn, k = fns[name], inner[name]
                    try:
                        if per_call:
                            each = [0.0] * k
                            c0 = time.process_time()
                            t0 = t_prev = time.perf_counter()
                            for i in range(k):
                                fn()
                                t = time.perf_counter()
                                each[i], t_prev = t - t_prev, t
                            c1 = time.process_time()
                            time.sleep(cpu_gap_s)
                            got[name] = (t_prev - t0) / k
                            got_calls[name] = each[1:] if k > 1 else each
                            got_cpu[name] = (c1 - c0, time.process_time() - c1, k)
                            continue
                        t0 = time.perf_counter()
                        for _ in range(k):
                            fn()
                        got[name] = (time.perf_counter() - t0) / k
                    except Exception as exc:
                        out[name] = {"error": short_error(exc)}
            # /proc/stat ticks and this process's CPU time disagree by a tick now and then, so a
            # round counts as disturbed only when others ran for 3+ ticks and > 5% of a core
            quiet_round = load.foreign_s <= max(0.05 * load.seconds, 2.5 / os.sysconf("SC_CLK_TCK"))
            if not quiet_round:
                if disturbed_time > max_disturbed_factor * planned:
                    quiet_round, forced = True, forced + 1  # give up filtering: keep it
                else:
                    disturbed_time += load.seconds
            for name, t in got.items():
                (clean if quiet_round else dirty)[name].append(t)
                if name in got_cpu:
                    (cpu_clean if quiet_round else cpu_dirty)[name].append(got_cpu[name])
                    (calls_clean if quiet_round else calls_dirty)[name].extend(got_calls[name])
            names = [n for n in names if len(clean[n]) < target[n] and n not in out]
    finally:
        if gc_was:
            gc.enable()
    for name in est:
        if name in out:
            continue
        use_clean = len(clean[name]) >= min_samples
        s = clean[name] if use_clean else clean[name] + dirty[name]
        out[name] = {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "samples": len(s),
                     "inner": inner[name], "set_aside": len(dirty[name]), "kept_disturbed_rounds": forced}
        if per_call:
            each = calls_clean[name] if use_clean else calls_clean[name] + calls_dirty[name]
            c = cpu_clean[name] if use_clean else cpu_clean[name] + cpu_dirty[name]
            n_calls = sum(v[2] for v in c)
            out[name].update({"median_s": statistics.median(each), "min_s": min(each), "max_s": max(each),
                              "calls": len(each), "cpu_s": sum(v[0] for v in c) / n_calls,
                              "cpu_tail_s": sum(v[1] for v in c) / n_calls})
    return out


# ----------------------------------------------------------------------------------- metrics


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - approx)^2), in float64; inf when equal."""
    ref = reference.detach().double()
    noise = float((ref - approx.detach().double()).pow(2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * math.log10(float(ref.pow(2).sum()) / noise)


def row_cosine(reference: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """Mean and min cosine similarity over the rows of the last dimension (tokens, samples)."""
    r = reference.detach().double().reshape(-1, reference.shape[-1])
    a = approx.detach().double().reshape(-1, reference.shape[-1])
    c = torch.nn.functional.cosine_similarity(r, a, dim=1, eps=1e-12)
    return float(c.mean()), float(c.min())


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def log(msg: str) -> None:
    """Progress goes to stderr, so that stdout carries only the Markdown a script prints."""
    print(msg, file=sys.stderr, flush=True)


def script_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --threads, --quick, --no-peers, --no-md, --out."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-md", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--out", help="JSON output path")
    return p


def publish(result: dict, markdown: Callable[[dict], str], out_path: Path, section: str | None,
            start: float) -> None:
    """Finish a run: record its time, write the JSON, render `markdown(result)`, rewrite its
    RESULTS.md `section` with it (None: leave RESULTS.md alone) and print it."""
    result["elapsed_s"] = time.perf_counter() - start
    write_json(out_path, result)
    md = markdown(result)
    if section:
        update_results_md(section, md)
    print(md)
    log(f"done in {result['elapsed_s']:.0f} s; wrote {out_path}" + (" and benchmarks/RESULTS.md" if section else ""))


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=1) + "\n")
    tmp.replace(path)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "exact" if value > 0 else "-inf"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_us(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    us = seconds * 1e6
    return f"{us:.1f}" if us < 100 else f"{us:,.0f}"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_results_md(section: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace the text between `<!-- {section}:begin -->` and `<!-- {section}:end -->` in
    RESULTS.md (appending the markers if absent); the rest of the file is kept."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.exists() else "# qlin benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# ----------------------------------------------------------------------------------- peers


def quiet():
    """A context manager that drops warnings (torch.ao's deprecation notices and the like)."""
    cm = warnings.catch_warnings()

    class _Q:
        def __enter__(self):
            cm.__enter__()
            warnings.simplefilter("ignore")
            return self

        def __exit__(self, *exc):
            return cm.__exit__(*exc)

    return _Q()


def torch_ao_dynamic(model: nn.Module, per_channel: bool = False) -> nn.Module:
    """torch.ao.quantization.quantize_dynamic on a deep copy: every nn.Linear to the fbgemm
    `linear_dynamic` module (int8 weights; uint8 activations per tensor, reduce_range on x86)."""
    try:
        with quiet():
            from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

            qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
            return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: qconfig}, dtype=torch.qint8)
    except Exception as exc:
        raise Unavailable(short_error(exc)) from None


def _torchao_config(kind: str):
    try:
        with quiet():
            import torchao  # noqa: F401
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except Exception as exc:
        raise Unavailable(f"torchao does not import ({short_error(exc)})") from None
    cfg = Int8DynamicActivationInt8WeightConfig() if kind == "dyn" else Int8WeightOnlyConfig()
    return quantize_, cfg


def torchao_int8(model: nn.Module, kind: str) -> nn.Module:
    """torchao `quantize_` (eager, no torch.compile) on a deep copy. kind `dyn`:
    Int8DynamicActivationInt8WeightConfig() (per-row int8 weights, per-token symmetric int8
    activations); `wo`: Int8WeightOnlyConfig()."""
    quantize_, cfg = _torchao_config(kind)
    try:
        m = copy.deepcopy(model).eval()
        with quiet():
            quantize_(m, cfg)
        return m
    except Exception as exc:
        raise Unavailable(short_error(exc)) from None


class OrtModel:
    """An ONNX Runtime session called like a module on torch tensors: float (exported) or int8
    (`onnxruntime.quantization.quantize_dynamic`, QInt8 weights). Threads: intra-op = the torch
    thread count; spinning off, because a spinning ORT pool steals the cores of whatever runs
    next in an interleaved benchmark (measured: a torch call after a spinning ORT call ran ~3x
    slower)."""

    def __init__(self, path: Path, input_names: list[str], threads: int, spinning: bool = False):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = input_names
        self.path = path

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        feeds = {n: a.numpy() for n, a in zip(self.input_names, args)}
        return torch.from_numpy(self.session.run(None, feeds)[0])


class _Eval(nn.Module):
    """Wrapper that the ONNX exporter traces; kept in eval mode (a fresh wrapper is in training
    mode, and the TorchScript exporter would then export dropout as active)."""

    def __init__(self, model: nn.Module, call: Callable):
        super().__init__()
        self.model = model
        self._call = call

    def forward(self, *args):
        return self._call(self.model, *args)


def ort_export(model: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
               workdir: Path, name: str, call: Callable | None = None,
               dynamic_axes: dict | None = None) -> Path:
    """torch.onnx.export(..., dynamo=False) of `model` (eval) to `workdir/name.onnx`."""
    try:
        import onnx  # noqa: F401 (the exporter needs it)
        import onnxruntime  # noqa: F401
    except Exception as exc:
        raise Unavailable(f"onnx/onnxruntime do not import ({short_error(exc)})") from None
    wrapper = _Eval(model, call or (lambda m, *a: m(*a))).eval()
    path = workdir / f"{name}.onnx"
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(
                wrapper, example, str(path), dynamo=False, input_names=input_names, output_names=["y"],
                dynamic_axes=dynamic_axes, opset_version=17,
            )
    except Exception as exc:
        raise Unavailable(f"torch.onnx.export(dynamo=False) failed: {short_error(exc)}") from None
    return path


def ort_quantize(float_path: Path, per_channel: bool) -> Path:
    """onnxruntime.quantization.quantize_dynamic with QInt8 weights (per channel or per tensor)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except Exception as exc:
        raise Unavailable(f"onnxruntime.quantization does not import ({short_error(exc)})") from None
    out = float_path.with_name(float_path.stem + (".int8pc.onnx" if per_channel else ".int8pt.onnx"))
    try:
        with quiet():
            quantize_dynamic(str(float_path), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    except Exception as exc:
        raise Unavailable(f"quantize_dynamic failed: {short_error(exc)}") from None
    return out


def tempdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="qlin-bench-")


# ----------------------------------------------------------------------------------- contention


def _proc_jiffies(pid: int | str) -> int:
    """utime + stime of a process (all its threads), in clock ticks; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _cpu_jiffies(exclude_pids: tuple[int, ...] = ()) -> tuple[int, int]:
    """(busy jiffies of the whole machine, busy jiffies of this process and its threads plus
    those of `exclude_pids`)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    busy_all = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle and iowait
    return busy_all, _proc_jiffies("self") + sum(_proc_jiffies(p) for p in exclude_pids)


class OtherLoad:
    """CPU used by other processes while a block runs, in cores (0.0 = the machine was ours).

    Another process on a 2-core machine skews every latency; the scripts record this figure per
    configuration, and wait (up to a limit) for the machine to be quiet before timing.
    `exclude_pids`: processes not counted as "other" (a load generator started on purpose)."""

    def __init__(self, exclude_pids: tuple[int, ...] = ()):
        self.exclude_pids = tuple(exclude_pids)

    def __enter__(self):
        import resource

        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.children_s = ru.ru_utime + ru.ru_stime  # CPU time of waited-for children so far
        self.t0, (self.a0, self.s0) = time.perf_counter(), _cpu_jiffies(self.exclude_pids)
        return self

    def __exit__(self, *exc):
        a1, s1 = _cpu_jiffies(self.exclude_pids)
        dt = max(time.perf_counter() - self.t0, 1e-6)
        hz = os.sysconf("SC_CLK_TCK")
        self.seconds = dt
        self.foreign_s = max(0.0, ((a1 - self.a0) - (s1 - self.s0)) / hz)
        self.cores = self.foreign_s / dt
        return False


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.15, log: Callable[[str], None] | None = None) -> float:
    """Sleep until other processes use less than `threshold_cores` over a 0.5 s window, or
    `max_wait_s` passes. Returns the seconds waited."""
    start = time.perf_counter()
    warned = False
    while True:
        with OtherLoad() as load:
            time.sleep(0.5)
        if load.cores < threshold_cores or time.perf_counter() - start > max_wait_s:
            return time.perf_counter() - start
        if log and not warned:
            log(f"  waiting for the machine to be quiet (other processes use {load.cores:.2f} cores)")
            warned = True


class CompetingLoad:
    """A background process busy on one core while the block runs: `python -c "while True: pass"`,
    pinned to CPU `cpu` (None: not pinned, the scheduler places it), at normal priority.

    It is started on entry (and given `settle_s` to get going) and killed on exit, whatever ends
    the block (an exception, Ctrl-C); it also asks the kernel to kill it should this process die
    first (PR_SET_PDEATHSIG), so that no spinner outlives the benchmark. `pid` is for
    `OtherLoad(exclude_pids=...)`; `cpu_s()` is the CPU time it got so far (seconds), so that a
    report can say how much of a core it actually took."""

    def __init__(self, cpu: int | None, settle_s: float = 0.3):
        self.cpu, self.settle_s = cpu, settle_s
        self.proc: subprocess.Popen | None = None
        self.pid = -1

    def _preexec(self):  # runs in the child, between fork and exec
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=self._preexec)
        self.pid = self.proc.pid
        try:
            time.sleep(self.settle_s)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the load process exited at once (rc {self.proc.returncode})")
        except BaseException:
            self.stop()
            raise
        self._j0 = _proc_jiffies(self.pid)
        return self

    def cpu_s(self) -> float:
        """CPU seconds the load process got since it settled (its last figure once stopped)."""
        if self.proc is None:
            return getattr(self, "final_cpu_s", 0.0)
        return (_proc_jiffies(self.pid) - getattr(self, "_j0", 0)) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None:
            self.final_cpu_s = self.cpu_s()
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def __exit__(self, *exc):
        self.stop()
        return False


def default_load_cpu() -> int | None:
    """The CPU a pinned load process takes by default: the last one this process may run on."""
    try:
        return max(os.sched_getaffinity(0))
    except (AttributeError, OSError, ValueError):
        return None


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (kB) in bytes; 0 where it is not readable."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    """Current resident set size of this process (VmRSS)."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last `reset_peak_rss()` (VmHWM)."""
    return _proc_status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s with `threads` torch threads: `torch.sum` over an `nbytes`
    float32 buffer (far larger than the caches), best of `repeats` after one untimed pass.
    Leaves torch's thread count as it found it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(nbytes // 4)
        buf.sum()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t0)
        return buf.numel() * 4 / best
    finally:
        torch.set_num_threads(before)


class ChildRun(NamedTuple):
    returncode: int  # negative: killed by that signal (-9 at the timeout)
    stdout: str
    stderr: str  # "" when passed through to this process's stderr
    peak_rss_bytes: int  # the command's own peak resident memory


# Runs argv[3:] with a timeout of argv[1] s; writes its wait4 peak RSS (KiB) and exit code to argv[2].
_PEAK_RSS_PROBE = """import os, subprocess, sys, threading
p = subprocess.Popen(sys.argv[3:])
t = threading.Timer(float(sys.argv[1]), p.kill)
t.start()
_, status, usage = os.wait4(p.pid, 0)
t.cancel()
open(sys.argv[2], "w").write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_child(cmd: list[str], timeout: float, *, pass_stderr: bool = False) -> ChildRun:
    """Run `cmd` to its end (killed after `timeout` s) and return its output and its own peak
    RSS. The command is started by a small fresh Python process, not by this one: Linux counts a
    process's RSS before its exec into its peak (`ru_maxrss`), so a command forked from a large
    process would report that process's size (its true peak is then over-stated by at most the
    starter's ~10 MB, instead). `pass_stderr`: the child's stderr goes to ours (progress lines)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".maxrss") as peak:
        starter = [sys.executable, "-S", "-c", _PEAK_RSS_PROBE, str(timeout), peak.name]
        p = subprocess.run([*starter, *cmd], stdin=subprocess.DEVNULL, stdout=out,
                           stderr=None if pass_stderr else err, timeout=timeout + 30)
        out.seek(0)
        err.seek(0)
        got = peak.read().split()  # "maxrss_kib returncode", absent if the starter itself failed
        rc = int(got[1]) if len(got) == 2 else p.returncode or 1
        return ChildRun(rc, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                        int(got[0]) * 1024 if got else 0)
