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
activations: the default), QuantConfig(act_granularity="tensor") (dynamic per-tensor
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
--seq 128 --repeats 3 --max-call-s 20 --no-peers --no-ort --no-cost --no-md --out FILE.

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


def _as_callable(spec: Spec, m) -> Callable[..., torch.Tensor]:
    if isinstance(m, common.OrtModel):
        return lambda *a: m(*a)
    return lambda *a: spec.call(m, *a)


def run_batch(spec: Spec, models: dict, b: int, *, repeats: int, budget: float, max_call_s: float,
              prior: dict[str, float], log, max_wait: float) -> list[dict]:
    """Outputs and interleaved latency of every method at batch size `b`."""
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
        waited = common.wait_for_quiet(max_wait, log=log) if max_wait > 0 else 0.0
        # calls over 0.5 s (BERT batch 32): exactly `repeats` samples each, the call made above
        # serving as their warm-up; faster ones: as many samples as the time budget gives (<= 25)
        slow = {n for n in calls if est.get(n, 0.0) > 0.5}
        with common.OtherLoad() as load:
            timing = common.bench_interleaved(
                calls, budget_s=budget, min_samples=repeats,
                max_samples={n: repeats if n in slow else 25 for n in calls},
                sample_s=0.0 if slow else 0.005, warm={n: est[n] for n in slow}, log=log)
    f_t = timing.get("float", {}).get("median_s")
    for row in rows:
        t = timing.get(row["method"], {})
        row["other_load_cores"], row["waited_s"] = round(load.cores, 3), round(waited, 1)
        if "median_s" in t:
            row.update({"median_ms": t["median_s"] * 1e3, "min_ms": t["min_s"] * 1e3,
                        "samples": t["samples"], "set_aside": t["set_aside"],
                        "kept_disturbed_rounds": t["kept_disturbed_rounds"],
                        "speedup_vs_float": f_t / t["median_s"] if f_t else None})
        elif "error" in t:
            row["error"] = t["error"]
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


def markdown(result: dict) -> str:
    info = result["machine"]
    out = [
        "## Models (end to end)",
        "",
        common.machine_md(info),
        "",
        f"Command: `{result['command']}` ({result['elapsed_s']:.0f} s). Latency: median ms per "
        "batch, all methods interleaved (BERT batch 32: "
        f"{result['args']['repeats']} samples each after a warm-up); `×` = float time / method time "
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
            cells.append(common.fmt(i.get("prep_s"), 2))
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
    p.add_argument("--no-cost", action="store_true", help="skip the BERT quantize/RSS/load measurement")
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
    out_path = Path(args.out) if args.out else common.RESULTS_DIR / ("models_quick.json" if args.quick else "models.json")
    write_md = not args.no_md and not args.quick
    do_cost = not args.no_cost and not args.quick

    log = common.log
    start = time.perf_counter()
    result: dict[str, Any] = {
        "machine": common.machine_info(args.threads),
        "command": "python benchmarks/models.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {"threads": args.threads, "models": args.models, "batches": batches, "seq": args.seq,
                 "repeats": repeats, "budget_s": budget, "max_call_s": max_call_s, "quick": args.quick},
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
            rows, prior = [], {}
            for b in batches:
                log(f"{mname}: batch {b} ...")
                brows = run_batch(spec, models, b, repeats=repeats, budget=budget, max_call_s=max_call_s,
                                  prior=prior, log=log, max_wait=max_wait)
                rows += brows
                for r in brows:
                    if "median_ms" in r:
                        nxt = [x for x in batches if x > b]
                        if nxt:
                            prior[r["method"]] = r["median_ms"] / 1e3 * nxt[0] / b
                    log(f"  {r['method']:42s} " + (f"{r['median_ms']:10.2f} ms  x{r['speedup_vs_float']:.2f}  "
                        f"SQNR {r.get('sqnr_db', float('inf')):.1f} dB" if "median_ms" in r else r.get("not_timed", r.get("error", "?"))))
            mres = {"rows": rows, "methods": info, "accuracy": accuracy_rows(spec, models)}
            if mname == "bert" and do_cost:
                mres_cost = bert_cost(spec.model, workdir, args.threads, log, max_wait)
                result["bert_cost"] = mres_cost
            result["models"][mname] = mres
            del models, spec
            gc.collect()
    common.publish(result, markdown, out_path, "models" if write_md else None, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
