"""End-to-end model benchmark: float vs qlin (each mode) vs the peers, plus qlin's quantize and
load cost on a BERT-base-shaped model.

Models:
- `encoder`: the sample encoder (`sample_models/encoder.safetensors` + `sample_models.encoder:build`),
  inputs from `sample_models/digits_test.safetensors` (batch 1 and 32 for latency; accuracy
  metrics over all 450 test samples), static calibration on `sample_models/digits_calib.safetensors`;
- `bert`: transformers `BertModel(BertConfig())` (12 layers, hidden 768, intermediate 3072, with
  the pooler; ~110M parameters), random weights (seed 0), eval mode, no download
  (HF_HUB_OFFLINE=1); random input_ids (seeded), attention_mask all ones, batch 1 and 32,
  sequence 128; static calibration on 4 batches of 8 other random sequences. Metrics on
  `last_hidden_state`.

Methods: `float`; qlin `quantize_model` with QuantConfig() (dynamic, asymmetric per-token
activations: the default), QuantConfig(kernel="onednn") (the same scheme, oneDNN kernel forced;
unavailable in qlin versions without it), QuantConfig(act_granularity="tensor") (dynamic per-tensor
activations, fbgemm `linear_dynamic` without reduce_range on VNNI CPUs: torch.ao's kernel),
QuantConfig(mode="weight-only"), QuantConfig(mode="static") with calibration; torch.ao
`quantize_dynamic` (default qconfig); torchao `quantize_(Int8DynamicActivationInt8WeightConfig())`
(eager); ONNX Runtime: the float model exported with `torch.onnx.export(dynamo=False)` run in ORT
(a reference), and `onnxruntime.quantization.quantize_dynamic` (QInt8, per_channel True/False);
ORT intra-op threads = --threads, spinning off (see common.OrtModel). A peer that fails is
reported as unavailable with the reason.

Measured: median latency per batch (all methods interleaved; BERT batch 32: --repeats samples,
default 3), speedup = float time / method time in the same run, output SQNR (dB) and mean/min
cosine (per token for BERT, per sample for the encoder) against float, the time to build each
variant; a method whose call is estimated (32 x its batch-1 time) above --max-call-s is not timed
at batch 32 and says so. For BERT also (in subprocesses, so that RSS is clean): the wall time of
`qlin_cli.quantize_model` on the loaded model, peak RSS while quantizing and over the process
(minus the RSS of a bare `import torch` process) against the float model's size, save time,
`load_quantized` time against loading the float safetensors into the same skeleton, and the
`qlin quantize` command on the same checkpoint (wall time and peak RSS).

How to run (from the repository root; peers: `pip install -e '.[bench]'`):

    python benchmarks/models.py --threads 2           # full: ~3 min on a quiet 2-core machine
    python benchmarks/models.py --threads 2 --quick   # encoder + BERT batch 1 only, no cost run: ~45 s

(longer while other processes use the CPUs: the script waits for them, up to --max-wait, and
redoes disturbed timing rounds).

Output: benchmarks/results/models.json (models_quick.json with --quick) and, for a full run, the
`models` section of benchmarks/RESULTS.md. Options: --models encoder,bert --batches 1,32
--seq 128 --repeats 3 --max-call-s 20 --no-peers --no-ort --no-cost --no-md --md-section NAME
--out FILE.

Loaded machine (issue 14: the default must stay fast on a busy machine): `--load` times every
batch twice, quiet and then while a background process (`python -c "while True: pass"`, pinned
to one core: --load-cpu N|last|any, default last; started and killed by the script, also on
Ctrl-C or if the script dies) keeps one core busy, and records per method and phase the median
and the worst single forward and the CPU time per forward (process CPU time of all threads).
Forwards are timed one by one in bursts (--load-burst-ms, default 50, at least 2 forwards; one
for calls over 0.5 s), each burst followed by a --load-gap-ms pause (default 20 ms) whose CPU
time (idle worker threads spinning) is counted to the burst's forwards; the first forward of a
burst (waking idle threads after the pause) is left out of the times. Tables: every method
quiet -> loaded with the ratios, and the targets for the default and the forced oneDNN kernel
(slowdowns no larger than torch.ao's; CPU per forward within 1.5x of quiet; worst loaded
forward no slower than float's median). Output:
models_loaded.json and the `models-loaded` section of RESULTS.md (with --models bert:
models_loaded_bert.json and `models-loaded-bert`, and so on). E.g.

    python benchmarks/models.py --threads 2 --models bert --load --no-cost --repeats 5   # ~8 min
    python benchmarks/models.py --threads 2 --models encoder --load                       # ~1 min

`--compile` adds the float model under `torch.compile` and qlin's default under
`qlinear.compile_model`, with the compile time per batch size in the prep column:

    python benchmarks/models.py --threads 2 --models bert --compile --no-cost --md-section models-compile

This is a script run by hand, never a test.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Unavailable, short_error  # noqa: E402

REPO = common.REPO
BERT_SEED, INPUT_SEED, CALIB_SEED = 0, 1, 2
CALIB_BATCHES, CALIB_BATCH = 4, 8


# ----------------------------------------------------------------------------------- models


def build_bert() -> nn.Module:
    """BertModel(BertConfig()) with seeded random weights, eval mode (no download). Also the
    `--model benchmarks/models.py:build_bert` factory for `qlin quantize`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BERT_SEED)
        model = BertModel(BertConfig())
    return model.eval()


def bert_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    from transformers import BertConfig

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, BertConfig().vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@dataclass
class Spec:
    name: str
    model: nn.Module
    inputs: dict[int, tuple[torch.Tensor, ...]]  # batch size -> positional inputs
    call: Callable[..., torch.Tensor]  # (model, *inputs) -> the compared output tensor
    calib: Any  # calibration inputs for quantize_model (tensor or dict of tensors)
    calib_batch: int
    input_names: list[str]
    dynamic_axes: dict
    metric_rows: str  # what a cosine row is
    extra_eval: tuple[torch.Tensor, torch.Tensor] | None = None  # (all inputs, labels) for accuracy
    notes: list[str] = field(default_factory=list)


def encoder_spec(batches: list[int]) -> Spec:
    from safetensors.torch import load_file

    from sample_models.encoder import build

    model = build()
    model.load_state_dict(load_file(str(REPO / "sample_models/encoder.safetensors")))
    model.eval()
    test = load_file(str(REPO / "sample_models/digits_test.safetensors"))["inputs"]
    labels = load_file(str(REPO / "sample_models/digits_test_labels.safetensors"))["labels"]
    calib = load_file(str(REPO / "sample_models/digits_calib.safetensors"))["inputs"]
    return Spec(
        name="encoder", model=model, inputs={b: (test[:b],) for b in batches},
        call=lambda m, x: m(x), calib=calib, calib_batch=32, input_names=["x"],
        dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, metric_rows="sample (logits)",
        extra_eval=(test, labels),
    )


def bert_spec(batches: list[int], seq: int) -> Spec:
    model = build_bert()
    big = bert_inputs(max(batches), seq, INPUT_SEED)
    calib = bert_inputs(CALIB_BATCHES * CALIB_BATCH, seq, CALIB_SEED)

    def call(m, ids, mask):
        out = m(input_ids=ids, attention_mask=mask)
        return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state

    return Spec(
        name="bert", model=model,
        inputs={b: (big["input_ids"][:b], big["attention_mask"][:b]) for b in batches},
        call=call, calib=calib, calib_batch=CALIB_BATCH, input_names=["input_ids", "attention_mask"],
        dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}},
        metric_rows="token (last_hidden_state)",
    )


# ----------------------------------------------------------------------------------- methods

QLIN_CONFIGS = {
    "qlin dynamic (default)": {},
    # the oneDNN kernel forced (qlin versions without it: reported unavailable; where it cannot
    # run, qlin falls back to fbgemm and the kernels column says so)
    "qlin dynamic (onednn)": {"kernel": "onednn"},
    "qlin dynamic, per-tensor activations": {"act_granularity": "tensor"},
    "qlin weight-only": {"mode": "weight-only"},
    "qlin static (calibrated)": {"mode": "static"},
}


def build_methods(spec: Spec, *, peers: bool, ort: bool, workdir: Path, threads: int, log) -> tuple[dict, dict]:
    """name -> model-like callable (called as spec.call(m, *inputs)), name -> info."""
    from qlin_cli import QuantConfig, quantize_model

    models: dict[str, Any] = {"float": spec.model}
    info: dict[str, dict] = {"float": {}}
    for name, cfg in QLIN_CONFIGS.items():
        t0 = time.perf_counter()
        try:
            config = QuantConfig(**cfg)
            m = copy.deepcopy(spec.model)
            res = quantize_model(m, config, calib=spec.calib if config.mode == "static" else None,
                                 batch_size=spec.calib_batch)
            kernels = Counter(r.kernel for r in res.layers if r.status == "quantized")
            skipped = [r.name for r in res.layers if r.status != "quantized"]
            models[name] = res.model
            info[name] = {"prep_s": time.perf_counter() - t0, "kernels": dict(kernels), "skipped": skipped}
        except Exception as exc:
            info[name] = {"unavailable": short_error(exc)}
            log(f"  {name}: unavailable: {info[name]['unavailable']}")
    if peers:
        builders = {
            "torch.ao quantize_dynamic": lambda: common.torch_ao_dynamic(spec.model),
            "torchao int8 dyn-act/int8-weight": lambda: common.torchao_int8(spec.model, "dyn"),
        }
        for name, build in builders.items():
            t0 = time.perf_counter()
            try:
                models[name] = build()
                info[name] = {"prep_s": time.perf_counter() - t0}
            except Unavailable as exc:
                info[name] = {"unavailable": str(exc)}
                log(f"  {name}: unavailable: {exc}")
    if peers and ort:
        names = ["ORT float (fp32 reference)", "ORT quantize_dynamic (per_channel=True)",
                 "ORT quantize_dynamic (per_channel=False)"]
        t0 = time.perf_counter()
        try:
            example = tuple(t[:2] for t in spec.inputs[max(spec.inputs)])
            fpath = common.ort_export(spec.model, example, spec.input_names, workdir, spec.name,
                                      call=spec.call, dynamic_axes=spec.dynamic_axes)
            export_s = time.perf_counter() - t0
            models[names[0]] = common.OrtModel(fpath, spec.input_names, threads)
            info[names[0]] = {"prep_s": export_s, "note": "torch.onnx.export(dynamo=False) time"}
            for name, pc in zip(names[1:], (True, False)):
                t0 = time.perf_counter()
                try:
                    models[name] = common.OrtModel(common.ort_quantize(fpath, pc), spec.input_names, threads)
                    info[name] = {"prep_s": export_s + time.perf_counter() - t0,
                                  "note": "export + quantize_dynamic time"}
                except Unavailable as exc:
                    info[name] = {"unavailable": str(exc)}
                    log(f"  {name}: unavailable: {exc}")
        except Unavailable as exc:
            for name in names:
                info[name] = {"unavailable": str(exc)}
            log(f"  ORT: unavailable: {exc}")
    return models, info


def add_compiled(spec: Spec, models: dict, info: dict, batches: list[int], log) -> None:
    """`--compile`: the float model under `torch.compile` and qlin's default under
    `qlinear.compile_model`, each compiled by one untimed-for-latency call per batch size (that
    call's time is the compile time reported per batch)."""
    from qlin_cli.qlinear import compile_model

    base = "qlin dynamic (default)"
    todo = {"float, torch.compile": lambda: torch.compile(copy.deepcopy(spec.model))}
    if base in models:
        todo[base + ", compile_model"] = lambda: compile_model(copy.deepcopy(models[base]))
    for name, build in todo.items():
        t0 = time.perf_counter()
        try:
            m = build()
            prep = time.perf_counter() - t0 + info.get(base if "qlin" in name else "float", {}).get("prep_s", 0.0)
            compile_s = {}
            with torch.no_grad():
                for b in batches:
                    t1 = time.perf_counter()
                    spec.call(m, *spec.inputs[b])
                    compile_s[b] = time.perf_counter() - t1
            models[name] = m
            info[name] = {"prep_s": prep, "compile_s": compile_s, **{k: v for k, v in info.get(base, {}).items()
                                                                     if "qlin" in name and k in ("kernels", "skipped")}}
            log(f"  {name}: compiled ({', '.join(f'b={b} {t:.1f} s' for b, t in compile_s.items())})")
        except Exception as exc:
            info[name] = {"unavailable": short_error(exc)}
            log(f"  {name}: unavailable: {info[name]['unavailable']}")


def _as_callable(spec: Spec, m) -> Callable[..., torch.Tensor]:
    if isinstance(m, common.OrtModel):
        return lambda *a: m(*a)
    return lambda *a: spec.call(m, *a)


@dataclass
class LoadMode:
    """--load: time every batch twice, quiet then with a competing CPU load (`common.CompetingLoad`:
    one process busy on one core, pinned to `cpu`, None = not pinned), every forward timed on its
    own: a sample is a burst of back-to-back forwards (at least 2, ~`burst_s`; slow calls,
    > 0.5 s: 1) followed by a `gap_s` pause, with the process CPU time around both (see
    `common.bench_interleaved(cpu_gap_s=...)`); fast calls get `samples` samples per method and
    phase, slow ones `repeats`; the loaded phase uses the quiet phase's burst sizes."""
    cpu: int | None
    gap_s: float
    samples: int
    burst_s: float = 0.05


def _phase(t: dict) -> dict:
    """One timing phase's figures of a method, in ms."""
    out = {"median_ms": t["median_s"] * 1e3, "worst_ms": t["max_s"] * 1e3, "best_ms": t["min_s"] * 1e3,
           "samples": t["samples"], "inner": t["inner"], "calls": t.get("calls", t["samples"]),
           "set_aside": t["set_aside"], "kept_disturbed_rounds": t["kept_disturbed_rounds"]}
    if "cpu_s" in t:
        out.update({"cpu_call_ms": t["cpu_s"] * 1e3, "cpu_tail_ms": t["cpu_tail_s"] * 1e3,
                    "cpu_ms": (t["cpu_s"] + t["cpu_tail_s"]) * 1e3})
    return out


def run_batch(spec: Spec, models: dict, b: int, *, repeats: int, budget: float, max_call_s: float,
              prior: dict[str, float], log, max_wait: float, load: LoadMode | None = None) -> list[dict]:
    """Outputs and interleaved latency of every method at batch size `b` (with `load`: quiet,
    then under a competing CPU load; the quiet phase's figures are also the row's own)."""
    args = spec.inputs[b]
    rows, calls, est = [], {}, {}
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = spec.call(spec.model, *args)
        est["float"] = time.perf_counter() - t0
        for name, m in models.items():
            fn = _as_callable(spec, m)
            row = {"model": spec.name, "batch": b, "method": name}
            guess = prior.get(name)
            if name != "float" and guess is not None and guess > max_call_s:
                row["not_timed"] = (f"estimated {guess:.0f} s per call (from the smaller batch) "
                                    f"> --max-call-s {max_call_s:g}")
                log(f"  {name} b={b}: {row['not_timed']}")
                rows.append(row)
                continue
            try:
                if name == "float":
                    y = ref
                else:
                    t0 = time.perf_counter()
                    y = fn(*args)
                    est[name] = time.perf_counter() - t0
                    row["sqnr_db"] = common.sqnr_db(ref, y)
                    row["cosine_mean"], row["cosine_min"] = common.row_cosine(ref, y)
                    if est[name] > max_call_s:
                        row["single_call_ms"] = est[name] * 1e3
                        row["not_timed"] = (f"one call took {est[name]:.1f} s > --max-call-s {max_call_s:g}; "
                                            "not timed further")
                        log(f"  {name} b={b}: {row['not_timed']}")
                        rows.append(row)
                        continue
                calls[name] = (lambda fn=fn: fn(*args))
            except Exception as exc:
                row["error"] = short_error(exc)
                log(f"  {name} b={b}: {row['error']}")
            rows.append(row)
        # calls over 0.5 s (BERT batch 32): exactly `repeats` samples each, the call made above
        # serving as their warm-up; faster ones: as many samples as the time budget gives (<= 25)
        slow = {n for n in calls if est.get(n, 0.0) > 0.5}
        fast_cap = load.samples if load else 25

        def timed(exclude_pids=(), inner=None):
            return common.bench_interleaved(
                calls, budget_s=budget, min_samples=repeats,
                max_samples={n: repeats if n in slow else fast_cap for n in calls},
                sample_s=(load.burst_s if load else 0.005) if not slow else 0.0,
                warm={n: est[n] for n in slow}, log=log,
                cpu_gap_s=load.gap_s if load else None, exclude_pids=exclude_pids, inner_override=inner)

        waited = common.wait_for_quiet(max_wait, log=log) if max_wait > 0 else 0.0
        with common.OtherLoad() as other:
            timing = timed()
        loaded = None
        if load is not None:
            waited_l = common.wait_for_quiet(max_wait, log=log) if max_wait > 0 else 0.0
            log(f"  batch {b}: timing again with a competing load on "
                + (f"CPU {load.cpu}" if load.cpu is not None else "any CPU (not pinned)") + " ...")
            with common.CompetingLoad(load.cpu) as spin:
                with common.OtherLoad((spin.pid,)) as other_l:
                    # the same calls per sample as the quiet phase: worst of as many calls
                    loaded = timed(exclude_pids=(spin.pid,),
                                   inner={n: t["inner"] for n, t in timing.items() if "inner" in t})
                spin_cores = spin.cpu_s() / max(other_l.seconds, 1e-6)
    f_t = timing.get("float", {}).get("median_s")
    for row in rows:
        t = timing.get(row["method"], {})
        row["other_load_cores"], row["waited_s"] = round(other.cores, 3), round(waited, 1)
        if "median_s" in t:
            row.update({"median_ms": t["median_s"] * 1e3, "min_ms": t["min_s"] * 1e3,
                        "samples": t["samples"], "set_aside": t["set_aside"],
                        "kept_disturbed_rounds": t["kept_disturbed_rounds"],
                        "speedup_vs_float": f_t / t["median_s"] if f_t else None})
            if load is not None:
                row["quiet"] = _phase(t)
        elif "error" in t:
            row["error"] = t["error"]
        if loaded is not None:
            tl = loaded.get(row["method"], {})
            if "median_s" in tl:
                row["loaded"] = _phase(tl)
                row["loaded"].update({"other_load_cores": round(other_l.cores, 3), "waited_s": round(waited_l, 1),
                                      "load_process_cores": round(spin_cores, 3),
                                      "load_cpu": "any" if load.cpu is None else load.cpu})
            elif "error" in tl:
                row["loaded_error"] = tl["error"]
    return rows


def accuracy_rows(spec: Spec, models: dict) -> dict[str, dict]:
    """Encoder: metrics over the whole test set (batches of 32): SQNR, cosine, top-1 agreement
    with float and accuracy."""
    if spec.extra_eval is None:
        return {}
    x, labels = spec.extra_eval
    out = {}
    with torch.no_grad():
        ref = torch.cat([spec.model(x[i:i + 32]) for i in range(0, len(x), 32)])
        for name, m in models.items():
            fn = _as_callable(spec, m)
            try:
                y = torch.cat([fn(x[i:i + 32]) for i in range(0, len(x), 32)])
            except Exception as exc:
                out[name] = {"error": short_error(exc)}
                continue
            cm, cmin = common.row_cosine(ref, y)
            out[name] = {"sqnr_db": common.sqnr_db(ref, y) if name != "float" else float("inf"),
                         "cosine_mean": cm, "cosine_min": cmin,
                         "top1_agreement": float((ref.argmax(1) == y.argmax(1)).double().mean()),
                         "accuracy": float((y.argmax(1) == labels).double().mean())}
    return out


# ----------------------------------------------------------------------------------- cost (BERT)


def _child_cost(workdir: Path, threads: int) -> dict:
    """Runs in a fresh process: load the float BERT checkpoint, quantize_model, save, and time
    load_quantized against loading the float safetensors. Prints one JSON object."""
    r: dict[str, Any] = {"rss_after_import_torch": common.rss_bytes()}
    common.setup_threads(threads)
    from safetensors.torch import load_file

    from qlin_cli import QuantConfig, load_quantized, quantize_model, save_quantized

    build_bert()  # imports transformers and warms up its lazy modules
    gc.collect()
    r["rss_after_imports"] = common.rss_bytes()
    fpath, qpath = workdir / "bert.safetensors", workdir / "bert.qlin.int8.safetensors"
    t0 = time.perf_counter()
    model = build_bert()
    r["build_skeleton_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.load_state_dict(load_file(str(fpath)))
    r["load_float_s"] = time.perf_counter() - t0
    gc.collect()
    r["rss_model_loaded"] = common.rss_bytes()
    r["peak_rss_before_quantize"] = common.peak_rss_bytes()  # imports, skeleton, float load
    r["peak_reset"] = common.reset_peak_rss()
    t0 = time.perf_counter()
    res = quantize_model(model, QuantConfig())
    r["quantize_s"] = time.perf_counter() - t0
    r["peak_rss_quantize"] = common.peak_rss_bytes()
    r["rss_after_quantize"] = common.rss_bytes()
    r["quantized_layers"] = len([x for x in res.layers if x.status == "quantized"])
    qpath.unlink(missing_ok=True)  # a redone measurement writes it again
    t0 = time.perf_counter()
    save_quantized(res, qpath)
    r["save_s"] = time.perf_counter() - t0
    r["peak_rss_through_save"] = max(common.peak_rss_bytes(), r["peak_rss_before_quantize"])
    r["qfile_bytes"] = qpath.stat().st_size
    r["float_file_bytes"] = fpath.stat().st_size
    del res, model
    gc.collect()
    fl, ql = [], []
    for _ in range(3):  # interleaved; the skeleton's construction is not timed
        sk = build_bert()
        t0 = time.perf_counter()
        sk.load_state_dict(load_file(str(fpath)))
        fl.append(time.perf_counter() - t0)
        del sk
        sk = build_bert()
        t0 = time.perf_counter()
        load_quantized(sk, qpath)
        ql.append(time.perf_counter() - t0)
        del sk
        gc.collect()
    r["load_float_safetensors_s"] = sorted(fl)[1]
    r["load_quantized_s"] = sorted(ql)[1]
    r["load_float_safetensors_all_s"], r["load_quantized_all_s"] = fl, ql
    return r


def _peak_child(cmd: list[str], env: dict | None = None, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float, int, int]:
    """Run `cmd` in a wrapper process that reports its child's wall time and peak RSS."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t0 = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t0\n"
        "sys.stderr.write(p.stderr[-4000:])\n"
        "sys.stdout.write(p.stdout)\n"
        "print(json.dumps({'rc': p.returncode, 'wall_s': dt, "
        "'maxrss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n"
    )
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=REPO)
    last = json.loads(p.stdout.strip().splitlines()[-1])
    return p, last["wall_s"], last["maxrss"], last["rc"]


def _child_cores(load: "common.OtherLoad") -> float:
    """CPU time of waited-for children during `load`'s block, in cores (RUSAGE_CHILDREN delta)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    now = ru.ru_utime + ru.ru_stime
    before = getattr(load, "children_s", None)
    return 0.0 if before is None else (now - before) / max(load.seconds, 1e-6)


def bert_cost(float_model: nn.Module, workdir: Path, threads: int, log, max_wait: float = 30.0) -> dict:
    from safetensors.torch import save_file

    out: dict[str, Any] = {}
    fpath = workdir / "bert.safetensors"
    state = {k: v.contiguous() for k, v in float_model.state_dict().items()}
    save_file(state, str(fpath))
    out["float_model_bytes"] = sum(t.numel() * t.element_size() for t in state.values())
    out["float_params"] = sum(p.numel() for p in float_model.parameters())
    del state
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    bare = subprocess.run(
        [sys.executable, "-c", "import torch; print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) * 1024)"],
        capture_output=True, text=True, env=env, timeout=120)
    out["rss_bare_import_torch"] = int(bare.stdout.strip())
    log("  BERT cost: quantize_model / save / load_quantized in a fresh process ...")
    for attempt in range(2):  # redone once if other processes took CPU time meanwhile
        common.wait_for_quiet(max_wait, log=log)
        with common.OtherLoad() as load:
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-cost", str(workdir),
                                "--threads", str(threads)], capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
        # this process sleeps meanwhile, so "other" load includes the child's own ~`threads` cores
        out["child_foreign_load_cores"] = round(max(0.0, load.cores - _child_cores(load)), 2)
        if out["child_foreign_load_cores"] <= 0.2:
            break
        log(f"  other processes took ~{out['child_foreign_load_cores']:.2f} cores meanwhile; redoing")
    if p.returncode != 0:
        out["child_error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        log(f"  BERT cost child failed: {out['child_error']}")
    else:
        out.update(json.loads(p.stdout.strip().splitlines()[-1]))
        base, size = out["rss_bare_import_torch"], out["float_model_bytes"]
        out["quantize_peak_minus_bare_over_float"] = (out["peak_rss_quantize"] - base) / size
        out["quantize_peak_minus_imports_over_float"] = (out["peak_rss_quantize"] - out["rss_after_imports"]) / size
        out["quantize_added_over_loaded_model"] = out["peak_rss_quantize"] - out["rss_model_loaded"]
        out["process_peak_minus_bare_over_float"] = (out["peak_rss_through_save"] - base) / size
        out["load_quantized_over_float_load"] = out["load_quantized_s"] / out["load_float_safetensors_s"]
    # the command line, as a user runs it
    inputs = workdir / "bert_probe.safetensors"
    save_file(bert_inputs(2, 128, CALIB_SEED), str(inputs))
    cmd = ["qlin", "quantize", str(fpath), "--model", "benchmarks/models.py:build_bert",
           "-o", str(workdir / "bert.cli.int8.safetensors"), "--inputs", str(inputs), "--force", "--json"]
    out["cli_command"] = " ".join(["qlin", "quantize", "bert.safetensors", "--model", "benchmarks/models.py:build_bert",
                                   "-o", "bert.int8.safetensors", "--inputs", "bert_probe.safetensors", "--force", "--json"])
    log("  BERT cost: qlin quantize (command line) ...")
    try:
        for attempt in range(2):
            common.wait_for_quiet(max_wait, log=log)
            with common.OtherLoad() as load:
                p, wall, maxrss, rc = _peak_child(cmd, env=env)
            out["cli_foreign_load_cores"] = round(max(0.0, load.cores - _child_cores(load)), 2)
            if out["cli_foreign_load_cores"] <= 0.2:
                break
            log(f"  other processes took ~{out['cli_foreign_load_cores']:.2f} cores meanwhile; redoing")
        out["cli_rc"], out["cli_wall_s"], out["cli_peak_rss"] = rc, wall, maxrss
        out["cli_peak_minus_bare_over_float"] = (maxrss - out["rss_bare_import_torch"]) / out["float_model_bytes"]
        if rc != 0:
            out["cli_error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
            log(f"  qlin quantize failed: {out['cli_error']}")
    except Exception as exc:
        out["cli_error"] = short_error(exc)
    return out


# ----------------------------------------------------------------------------------- report


TARGET_METHODS = ("qlin dynamic (default)", "qlin dynamic (onednn)")
TORCH_AO = "torch.ao quantize_dynamic"
CPU_RATIO_TARGET = 1.5


def _ratio(row: dict, key: str) -> float | None:
    q, l_ = row.get("quiet", {}).get(key), row.get("loaded", {}).get(key)
    return l_ / q if q and l_ is not None else None


def _ql(row: dict | None, key: str, digits: int = 1) -> str:
    """'quiet → loaded (ratio)' of one figure."""
    if row is None or key not in row.get("quiet", {}) or key not in row.get("loaded", {}):
        return "—"
    q, l_ = row["quiet"][key], row["loaded"][key]
    return f"{q:,.{digits}f} → {l_:,.{digits}f} ({l_ / q:.2f})" if q else f"{q:,.{digits}f} → {l_:,.{digits}f}"


def _loaded_row(rows: list[dict], method: str, batch: int) -> dict | None:
    """The row of `method` at `batch` that has quiet and loaded timings, or None."""
    return next((x for x in rows if x["method"] == method and x["batch"] == batch and "loaded" in x), None)


def _loaded_rows(rows: list[dict], methods, batches):
    """(method, batch, row) for each method and batch that has a loaded row."""
    for meth in methods:
        for b in batches:
            r = _loaded_row(rows, meth, b)
            if r is not None:
                yield meth, b, r


def load_markdown(rows: list[dict], load_args: dict) -> list[str]:
    """The --load tables of one model: every method quiet → loaded, then the issue-14 targets
    for the default and the forced oneDNN kernel."""
    batches = sorted({r["batch"] for r in rows if "loaded" in r})
    methods = list(dict.fromkeys(r["method"] for r in rows if "loaded" in r))
    lr = [r["loaded"] for r in rows if "loaded" in r]
    spin = [x.get("load_process_cores", 0.0) for x in lr]
    other = [x.get("other_load_cores", 0.0) for x in lr]
    where = load_args.get("cpu")
    out = ["#### Under a competing CPU load (quiet → loaded)", "",
           "Each batch timed twice: quiet, then while a background process (`python -c \"while True: "
           "pass\"`, " + ("not pinned" if where in (None, "any") else f"pinned to CPU {where}") + ", started "
           "and killed by the script) keeps one core busy. Every forward is timed on its own: a sample is "
           f"a burst of back-to-back forwards (>= 2, ~{1e3 * load_args.get('burst_s', 0.05):.0f} ms; calls "
           "over 0.5 s: one) and a "
           f"{1e3 * load_args.get('gap_s', 0.0):.0f} ms pause, the methods interleaved in a fresh order each "
           "round; the first forward of a burst (waking idle threads and virtual CPUs after the pause) is "
           "left out of the times, not of the CPU. Median and worst are over single forwards (the "
           "loaded phase has as many as the quiet one); CPU = process CPU time (all threads) per forward, "
           "including the pause after the burst (what idle worker threads still burn spinning, per "
           "forward: shown apart as \"after\"). (×) = loaded / quiet. The load process got "
           f"{min(spin, default=0):.2f}–{max(spin, default=0):.2f} cores; other processes "
           f"{max(other, default=0):.2f} cores at most (rounds disturbed by them are set aside and redone).", ""]
    header = ["method", "batch", "median ms", "worst ms", "CPU ms / forward", "after ms", "forwards timed"]
    table = []
    for meth, b, r in _loaded_rows(rows, methods, batches):
        table.append([meth, b, _ql(r, "median_ms"), _ql(r, "worst_ms"), _ql(r, "cpu_ms"),
                      f"{r['quiet'].get('cpu_tail_ms', 0):.1f} / {r['loaded'].get('cpu_tail_ms', 0):.1f}",
                      f"{r['quiet'].get('calls', r['quiet']['samples'])} / {r['loaded'].get('calls', r['loaded']['samples'])}"])
    out += [common.md_table(header, table), ""]
    # the targets (issue 14)
    trows = []
    for meth, b, r in _loaded_rows(rows, TARGET_METHODS, batches):
        ao = _loaded_row(rows, TORCH_AO, b)
        fl = _loaded_row(rows, "float", b)

        def vs_ao(key):
            mine, theirs = _ratio(r, key), (_ratio(ao, key) if ao else None)
            if mine is None or theirs is None:
                return "—"
            return f"{mine:.2f} vs {theirs:.2f}: " + ("met" if mine <= theirs else "missed")

        cpu = _ratio(r, "cpu_ms")
        worst = r["loaded"]["worst_ms"]

        def vs_float(phase):
            if fl is None:
                return "—"
            f_med = fl[phase]["median_ms"]
            return f"{worst:,.1f} vs {f_med:,.1f}: " + ("met" if worst <= f_med else "missed")

        trows.append([meth, b, vs_ao("median_ms"), vs_ao("worst_ms"),
                      "—" if cpu is None else f"{cpu:.2f}: " + ("met" if cpu <= CPU_RATIO_TARGET else "missed"),
                      vs_float("loaded"), vs_float("quiet")])
    if trows:
        out += ["Issue-14 targets under load: the method's slowdown (loaded / quiet) of the median and of "
                "the worst forward no larger than torch.ao `quantize_dynamic`'s; its CPU time per forward "
                f"within {CPU_RATIO_TARGET}x of its quiet CPU time; its worst loaded forward no slower than "
                "the float model's median (loaded, and quiet).", "",
                common.md_table(["method", "batch", "median slowdown vs torch.ao's", "worst slowdown vs torch.ao's",
                                 f"CPU loaded / quiet (<= {CPU_RATIO_TARGET})", "worst loaded vs float median (loaded)",
                                 "worst loaded vs float median (quiet)"], trows), ""]
    return out


def markdown(result: dict) -> str:
    info = result["machine"]
    loaded = bool(result["args"].get("load"))
    out = [
        "## Models (end to end)" + (" — quiet and under a competing CPU load" if loaded else ""),
        "",
        common.machine_md(info),
        "",
        f"Command: `{result['command']}` ({result['elapsed_s']:.0f} s). Latency: median ms per "
        "batch, all methods interleaved (BERT batch 32: "
        f"{result['args']['repeats']} samples each after a warm-up"
        + ("; with --load the main tables are the quiet phase: median of single forwards timed in short "
           "bursts between pauses" if loaded else "")
        + "); `×` = float time / method time "
        "in the same run. SQNR and cosine against the float model's output on the same batch "
        "(BERT: last_hidden_state, cosine per token; encoder: logits, per sample). prep s: time to "
        "build the variant (deep copy + quantize/export, in this process, not protected from "
        "foreign load; the clean quantize_model time is in the cost table). Raw data: "
        f"`benchmarks/results/{Path(result['out']).name}`.",
        "",
    ]
    for mname, mres in result["models"].items():
        rows = mres["rows"]
        batches = sorted({r["batch"] for r in rows})
        methods = list(dict.fromkeys(r["method"] for r in rows))
        title = {"bert": f"BERT-base-shaped (BertModel(BertConfig()), random weights), sequence {result['args']['seq']}",
                 "encoder": "Sample encoder (sample_models/encoder.safetensors)"}[mname]
        out += [f"### {title}", ""]
        header = ["method"] + [f"b={b} ms (×)" for b in batches] + [f"SQNR dB (b={max(batches)})",
                                                                    f"cosine mean / min (b={max(batches)})", "prep s", "kernels"]
        table = []
        for meth in methods:
            cells = [meth]
            for b in batches:
                r = next((r for r in rows if r["method"] == meth and r["batch"] == b), None)
                if r is None:
                    cells.append("—")
                elif "median_ms" in r:
                    cells.append(f"{r['median_ms']:,.1f} ({r['speedup_vs_float']:.2f})")
                elif "not_timed" in r:
                    one = r.get("single_call_ms")
                    f_r = next((x for x in rows if x["method"] == "float" and x["batch"] == b and "median_ms" in x), None)
                    cells.append(f"{one:,.0f}¹ ({f_r['median_ms'] / one:.2f})" if one and f_r else "not timed¹")
                else:
                    cells.append("error")
            rb = [r for r in rows if r["method"] == meth and "sqnr_db" in r]
            r = max(rb, key=lambda r: r["batch"]) if rb else None
            if meth == "float":
                cells += ["—", "—"]
            elif r is None:
                cells += ["—", "—"]
            else:
                tag = "" if r["batch"] == max(batches) else f" (b={r['batch']})"
                cells += [common.fmt(r["sqnr_db"]) + tag, f"{r['cosine_mean']:.5f} / {r['cosine_min']:.4f}"]
            i = mres["methods"].get(meth, {})
            cells.append(common.fmt(i.get("prep_s"), 2) + "".join(
                f"; compile b={b}: {t:.1f}" for b, t in i.get("compile_s", {}).items()))
            ks = i.get("kernels")
            cells.append(", ".join(f"{k} x{v}" for k, v in ks.items()) + (f", {len(i['skipped'])} float" if i.get("skipped") else "") if ks else "—")
            table.append(cells)
        out += [common.md_table(header, table), ""]
        nt = [r for r in rows if "not_timed" in r]
        if nt:
            out += ["¹ A single call, not a median: " + "; ".join(f"{r['method']} at b={r['batch']}: {r['not_timed']}" for r in nt) + ".", ""]
        acc = mres.get("accuracy")
        if acc:
            out += ["Whole test set (450 samples, batches of 32):", ""]
            t = [[k, common.fmt(v.get("sqnr_db")), f"{v['cosine_mean']:.5f}", f"{v['top1_agreement']:.4f}",
                  f"{v['accuracy']:.4f}"] for k, v in acc.items() if "error" not in v]
            out += [common.md_table(["method", "SQNR dB", "cosine mean", "top-1 agreement", "accuracy"], t), ""]
        if any("loaded" in r for r in rows):
            out += load_markdown(rows, result["args"].get("load") or {})
        loads = [r.get("other_load_cores", 0) for r in rows]
        kept = sum(r.get("kept_disturbed_rounds", 0) for r in rows if r["method"] == "float")
        out += [f"Foreign CPU load while timing: max {max(loads, default=0):.2f} cores; timing rounds "
                f"kept although disturbed: {kept}.", ""]
        un = {k: v["unavailable"] for k, v in mres["methods"].items() if "unavailable" in v}
        if un:
            out += ["Unavailable: " + "; ".join(f"{k}: {v}" for k, v in un.items()) + ".", ""]
    cost = result.get("bert_cost")
    if cost:
        mb = 1 / 2**20
        out += ["### BERT-base quantize and load cost", ""]
        if "child_error" in cost:
            out += [f"quantize_model child failed: {cost['child_error']}", ""]
        else:
            t = [
                ["float model (params + buffers)", f"{cost['float_model_bytes'] * mb:,.0f} MiB ({cost['float_params'] / 1e6:.1f} M parameters)"],
                ["qlin file", f"{cost['qfile_bytes'] * mb:,.0f} MiB (float safetensors {cost['float_file_bytes'] * mb:,.0f} MiB)"],
                ["`quantize_model(model, QuantConfig())` wall time", f"{cost['quantize_s']:.2f} s ({cost['quantized_layers']} layers)"],
                ["RSS of a bare `import torch` process", f"{cost['rss_bare_import_torch'] * mb:,.0f} MiB"],
                ["RSS after imports (torch, transformers, qlin) / with the float model loaded",
                 f"{cost['rss_after_imports'] * mb:,.0f} / {cost['rss_model_loaded'] * mb:,.0f} MiB"],
                ["peak RSS while quantizing, minus bare `import torch` (÷ float size)",
                 f"{(cost['peak_rss_quantize'] - cost['rss_bare_import_torch']) * mb:,.0f} MiB ({cost['quantize_peak_minus_bare_over_float']:.2f}x)"],
                ["peak RSS while quantizing, minus the RSS after imports (torch, transformers, qlin) (÷ float size)",
                 f"{(cost['peak_rss_quantize'] - cost['rss_after_imports']) * mb:,.0f} MiB ({cost['quantize_peak_minus_imports_over_float']:.2f}x)"],
                ["added by `quantize_model` above the loaded float model (peak − RSS before)",
                 f"{cost['quantize_added_over_loaded_model'] * mb:,.0f} MiB"],
                ["process peak RSS through load, quantize and save, minus bare torch (÷ float size)",
                 f"{(cost['peak_rss_through_save'] - cost['rss_bare_import_torch']) * mb:,.0f} MiB ({cost['process_peak_minus_bare_over_float']:.2f}x)"],
                ["`save_quantized`", f"{cost['save_s']:.2f} s"],
                ["load float safetensors into the skeleton (`load_file` + `load_state_dict`; median of 3)", f"{cost['load_float_safetensors_s']:.3f} s"],
                ["`load_quantized` into the same skeleton (read, validate, swap, pack; median of 3)", f"{cost['load_quantized_s']:.3f} s ({cost['load_quantized_over_float_load']:.2f}x the float load)"],
            ]
            if "cli_wall_s" in cost:
                status = "ok" if cost.get("cli_rc") == 0 else f"failed: {cost.get('cli_error')}"
                t.append([f"`{cost['cli_command']}` ({status}): wall time incl. Python start, imports, model build, probe, report, save; peak RSS minus bare torch (÷ float size)",
                          f"{cost['cli_wall_s']:.1f} s; {(cost['cli_peak_rss'] - cost['rss_bare_import_torch']) * mb:,.0f} MiB ({cost['cli_peak_minus_bare_over_float']:.2f}x)"])
            out += [common.md_table(["what", "measured"], t), "",
                    f"Foreign CPU load during these subprocesses: {cost.get('child_foreign_load_cores', '?')} cores "
                    f"(API child), {cost.get('cli_foreign_load_cores', '?')} cores (command line); each is redone once "
                    "when above 0.2.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = common.script_parser(__doc__, "encoder + BERT at batch 1, no cost run (~1 min)")
    p.add_argument("--models", default="encoder,bert")
    p.add_argument("--batches", help="default 1,32 (quick: 1)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, help="samples per method for slow (BERT batch 32) calls; default 3")
    p.add_argument("--budget", type=float, help="seconds per method for fast calls (default 1.0, quick 0.2)")
    p.add_argument("--max-call-s", type=float, help="do not time a method whose call takes (or, from a smaller "
                   "batch, is estimated to take) more than this many seconds (default 20, quick 2)")
    p.add_argument("--max-wait", type=float, help="seconds to wait for other processes to leave the CPUs before each timing (default 30, quick 5)")
    p.add_argument("--no-ort", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time the float model under torch.compile and "
                   "qlin's default under qlinear.compile_model (compile time per batch size in the prep column)")
    p.add_argument("--no-cost", action="store_true", help="skip the BERT quantize/RSS/load measurement")
    p.add_argument("--load", action="store_true", help="time every batch twice: quiet, then with a background "
                   "process busy on one core (started and killed by the script); adds worst forward and CPU time "
                   "per forward; writes models_loaded[_MODELS].json and the models-loaded[-MODELS] section of RESULTS.md")
    p.add_argument("--load-cpu", default="last", help="the CPU the load process is pinned to: a number, 'last' "
                   "(default: the last CPU this process may use) or 'any' (not pinned)")
    p.add_argument("--load-gap-ms", type=float, default=20.0, help="--load: pause after each burst of timed forwards, "
                   "during which idle worker threads' spinning is counted to them (default 20)")
    p.add_argument("--load-samples", type=int, default=30, help="--load: samples (bursts of forwards) per method and "
                   "phase for calls under 0.5 s (default 30; slower calls get --repeats single forwards)")
    p.add_argument("--load-burst-ms", type=float, default=50.0, help="--load: length of a burst of back-to-back "
                   "forwards of a fast call (default 50; at least 2 forwards)")
    p.add_argument("--md-section", help="the RESULTS.md section to rewrite (default: models; with --load models-loaded, or "
                   "models-loaded-bert etc. when --models names some of the models)")
    p.add_argument("--child-cost", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child_cost:
        print(json.dumps(_child_cost(Path(args.child_cost), args.threads)))
        return 0
    common.setup_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1] if args.quick else [1, 32])
    batches = sorted(batches)
    repeats = args.repeats or 3
    max_call_s = args.max_call_s if args.max_call_s is not None else (2.0 if args.quick else 20.0)
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 1.0)
    max_wait = args.max_wait if args.max_wait is not None else (5.0 if args.quick else 30.0)
    load = None
    if args.load:
        cpu = (common.default_load_cpu() if args.load_cpu == "last" else
               None if args.load_cpu == "any" else int(args.load_cpu))
        load = LoadMode(cpu=cpu, gap_s=args.load_gap_ms / 1e3, samples=args.load_samples,
                        burst_s=args.load_burst_ms / 1e3)
    # a --load run of some of the models gets its own file and section (models_loaded_bert.json,
    # models-loaded-bert), so that the runs of each model do not overwrite one another
    only = "" if not args.load or args.models == p.get_default("models") else "_" + "_".join(args.models.split(","))
    stem = "models" + ("_loaded" if args.load else "") + only + ("_quick" if args.quick else "")
    out_path = Path(args.out) if args.out else common.RESULTS_DIR / f"{stem}.json"
    write_md = not args.no_md and not args.quick
    section = args.md_section or ("models-loaded" + only.replace("_", "-") if args.load else "models")
    do_cost = not args.no_cost and not args.quick

    log = common.log
    start = time.perf_counter()
    result: dict[str, Any] = {
        "machine": common.machine_info(args.threads),
        "command": "python benchmarks/models.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {"threads": args.threads, "models": args.models, "batches": batches, "seq": args.seq,
                 "repeats": repeats, "budget_s": budget, "max_call_s": max_call_s, "quick": args.quick,
                 "load": None if load is None else {"cpu": "any" if load.cpu is None else load.cpu,
                                                    "gap_s": load.gap_s, "samples": load.samples,
                                                    "burst_s": load.burst_s}},
        "out": str(out_path), "models": {},
    }
    log(common.machine_md(result["machine"]))
    with common.tempdir() as tmp:
        for mname in args.models.split(","):
            log(f"{mname}: building ...")
            try:
                spec = encoder_spec(batches) if mname == "encoder" else bert_spec(batches, args.seq)
            except Exception as exc:
                result["models"][mname] = {"unavailable": short_error(exc), "rows": [], "methods": {}}
                log(f"{mname}: unavailable: {short_error(exc)}")
                continue
            workdir = Path(tmp) / mname
            workdir.mkdir()
            models, info = build_methods(spec, peers=not args.no_peers, ort=not args.no_ort,
                                         workdir=workdir, threads=args.threads, log=log)
            if args.compile:
                add_compiled(spec, models, info, batches, log)
            rows, prior = [], {}
            for b in batches:
                log(f"{mname}: batch {b} ...")
                brows = run_batch(spec, models, b, repeats=repeats, budget=budget, max_call_s=max_call_s,
                                  prior=prior, log=log, max_wait=max_wait, load=load)
                rows += brows
                for r in brows:
                    if "median_ms" in r:
                        nxt = [x for x in batches if x > b]
                        if nxt:
                            prior[r["method"]] = r["median_ms"] / 1e3 * nxt[0] / b
                    log(f"  {r['method']:42s} " + (f"{r['median_ms']:10.2f} ms  x{r['speedup_vs_float']:.2f}  "
                        f"SQNR {r.get('sqnr_db', float('inf')):.1f} dB" if "median_ms" in r else r.get("not_timed", r.get("error", "?")))
                        + (f"  | loaded: median {_ql(r, 'median_ms')}, worst {_ql(r, 'worst_ms')}, "
                           f"CPU {_ql(r, 'cpu_ms')} ms" if "loaded" in r else ""))
            mres = {"rows": rows, "methods": info, "accuracy": accuracy_rows(spec, models)}
            if mname == "bert" and do_cost:
                mres_cost = bert_cost(spec.model, workdir, args.threads, log, max_wait)
                result["bert_cost"] = mres_cost
            result["models"][mname] = mres
            del models, spec
            gc.collect()
    common.publish(result, markdown, out_path, section if write_md else None, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
