"""Decode and prefill of a Llama-shaped model: float32, bf16 and qlin's formats against llama.cpp
and against the machine's read bandwidth, measured in the same run (issue 24).

The model: transformers `LlamaForCausalLM` built from a config, the shape of TinyLlama cut to 8
layers (hidden 2048, intermediate 5632, 32 heads, 4 key/value heads, vocabulary 32000, untied
head: 418 M weights in its Linear layers), random weights (seed 0), float32. `--small`: hidden
512, intermediate 1408, 2 layers, 8 heads, 4 key/value heads, vocabulary 4096 (a smoke run).

Formats, each loaded in a fresh process (so that its resident memory is its own):
- `float32`: the weights as built; `bf16`: the whole model cast to bfloat16;
- opt-in (`--formats f32,f16,int8,int8-f16`): `float16`, the model cast to float16, and `int8
  float16`, that float16 model quantized with `QuantConfig()` and loaded into a float16 skeleton
  (a float16 checkpoint as transformers and `qlin quantize DIR` load it: `dtype="auto"`);
- `int8`: qlin's default (`QuantConfig()`: dynamic, int8 per channel, per-token activations);
- `int8 weight-only`: `QuantConfig(mode="weight-only")`;
- `4-bit g32`, `4-bit g128`: `QuantConfig(bits=4, group_size=32 / 128)` (weight-only low-bit);
- `W4A8 g32`, `W4A8 g128`: the same weights with `mode="dynamic"`: per-token int8 activations, an
  integer dot per group (kernel `lowbit_dynamic`; llama.cpp's Q4_0 x Q8_0 does the same).
The qlin formats are quantized with `quantize_model` and saved with `save_quantized` in one
process, then loaded with `load_quantized` into an `empty_weights()` skeleton in another, as a
user serving the file would.

Modes:
- `bandwidth`: read bandwidth, `torch.sum` over a 1 GiB float32 buffer, best of 5, with 1 thread
  and with --threads (at the start and again at the end of the run), and at the end the same
  with each thread reading 1-8 sequential streams side by side (`read_bandwidth.cpp`, built with
  the machine's c++; some CPUs serve several streams a thread faster than torch.sum's one); the
  bound is the largest;
- `compiled` (not in the default modes; ~1 min of compiling a format): decode tokens/s of the
  model under `qlinear.compile_model` in a StaticCache, beside the eager model in the same cache;
- `decode`: tokens/s of --new-tokens one-token steps from an empty KV cache (a manual greedy loop
  over `model(ids, cache=cache, use_cache=True)`: transformers 5.25 renamed `past_key_values`
  to `cache`), best of --repeats; also a profile of
  one step: the time inside the Linear layers (forward hooks) against the rest;
- `prefill`: tokens/s of one forward of --prompt random tokens into an empty cache (logits of the
  last token only, as llama-bench computes), best of --repeats after an untimed call.
With --rounds N every format and then llama.cpp are measured N times in turn and each figure is
the best round's: this VM's read bandwidth moves by up to 2x from minute to minute (AMD EPYC Zen
5: 42-87 GB/s with 2 threads within one run), and one round measures llama.cpp minutes after the
qlin formats.
For each: the Linear layers' weight bytes read per token (codes at their width plus scales as the
kernel holds them, float16 for group scales; the embedding lookup and the KV cache are left out), the bytes/s that implies at the
measured tokens/s, and that against the measured bandwidth (% of bound); the resident memory
after the run. A format may spend --max-mode-s on a mode (its first steps or a prompt/8-token
probe estimate the cost): a slower one decodes fewer tokens once, or reports its probe's prefill
figure, marked as such (qlin's int8 kernels on a CPU without VNNI run at a few tokens/s).
Output check: each format's last-token logits after 8 tokens against the float32 model's (SQNR).

llama.cpp (unless --no-llama-cpp): its prebuilt CPU libraries from the npm package
`@node-llama-cpp/linux-x64` 3.21.1 and its source from `node-llama-cpp` 3.21.1; `llama-bench`
and two small programs (a quantizer, and one that prints a model's logits) are compiled against
those libraries, once, into ~/.cache/qlin-bench/llama.cpp (`install_llama_cpp`, ~1 min; needs
npm, git and g++; never part of qlin's install or CI). The same weights are written as GGUF F32
(the `gguf` package of that source; Q and K rows permuted as convert_hf_to_gguf.py does: its
logits match transformers' to ~65 dB) and quantized to Q8_0 and Q4_0 (`pure`: every matrix,
the output head too, as qlin quantizes it); `llama-bench -p PROMPT -n NEW -t THREADS -r REPEATS`
measures them (the best repetition kept). Where any of it cannot be had, one line says why and
the issue's figures (another machine) are quoted instead.

    python benchmarks/decode.py --write-results   # full model: results/decode.json and RESULTS.md's decode section
    python benchmarks/decode.py --small           # smoke run: 16 new tokens, a 128-token prompt, one repeat
    python benchmarks/decode.py --formats f32,q4g32 --modes decode   # a subset

Timing (2 threads): quantizing the four qlin formats of the full model takes minutes on its own
(`quantize_s` in the JSON), so the full run takes ~10-15 min on a quiet 2-core machine, and
--small ~1 min once llama.cpp is cached; far longer on a loaded one (the load average is
recorded at the start and the end).

A script run by hand, never a test.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# name -> QuantConfig keys (None: a float format)
FORMATS: dict[str, dict[str, Any] | None] = {
    "float32": None,
    "bf16": None,
    "int8": {},
    "int8 weight-only": {"mode": "weight-only"},
    "4-bit g32": {"bits": 4, "group_size": 32},
    "4-bit g128": {"bits": 4, "group_size": 128},
    "W4A8 g32": {"mode": "dynamic", "bits": 4, "group_size": 32},
    "W4A8 g128": {"mode": "dynamic", "bits": 4, "group_size": 128},
    "float16": None,
    "int8 float16": {},
}
# the model's dtype where it is not float32 (float formats: cast; qlin ones: quantized and loaded in it)
DTYPES = {"bf16": "bfloat16", "float16": "float16", "int8 float16": "float16"}


def model_dtype(fmt: str):
    """The torch dtype a format's model runs in."""
    import torch

    return getattr(torch, DTYPES.get(fmt, "float32"))
SHORT = {"f32": "float32", "bf16": "bf16", "int8": "int8", "int8-wo": "int8 weight-only",
         "q4g32": "4-bit g32", "q4g128": "4-bit g128", "w4a8g32": "W4A8 g32", "w4a8g128": "W4A8 g128",
         "f16": "float16", "int8-f16": "int8 float16"}
DEFAULT_FORMATS = [k for k in SHORT if k not in ("f16", "int8-f16")]
# the llama.cpp type with the same bytes per weight as a format (None: no such type measured)
PEER = {"float32": "F32", "bf16": None, "int8": "Q8_0", "int8 weight-only": "Q8_0", "4-bit g32": "Q4_0",
        "4-bit g128": None, "W4A8 g32": "Q4_0", "W4A8 g128": None, "float16": None, "int8 float16": "Q8_0"}
GGUF_TYPES = {"F32": 0, "Q8_0": 7, "Q4_0": 2}  # llama_ftype values (llama.h)
GGUF_BYTES_PER_WEIGHT = {"F32": 4.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}  # blocks of 32: codes + fp16 scale

# Issue 24's figures: an Intel Xeon under KVM with AMX (amx_int8, amx_bf16) and AVX-512, 2 threads,
# 28-30 GB/s; quoted where llama.cpp cannot be had here (tokens/s; None: not given in the issue).
ISSUE_LLAMA_CPP = {"F32": {"decode": 14.6, "prefill": None}, "Q8_0": {"decode": 56.0, "prefill": None},
                   "Q4_0": {"decode": 106.0, "prefill": 645.0}}

NODE_LLAMA_CPP = "3.21.1"
LLAMA_CPP_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlin-bench" / "llama.cpp"


def model_config(small: bool):
    from transformers import LlamaConfig

    if small:
        keys = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4)
    else:
        keys = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                    num_attention_heads=32, num_key_value_heads=4)
    return LlamaConfig(**keys, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def describe_config(cfg) -> str:
    return (f"LlamaForCausalLM, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
            f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads ({cfg.num_key_value_heads} key/value), "
            f"vocabulary {cfg.vocab_size}, untied head, random weights (seed 0)")


# ----------------------------------------------------------------------------------- the model


def build_weights(small: bool, path: Path) -> None:
    """The float32 model's state dict, seeded, saved as safetensors: every format and the GGUF
    files start from these bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(small)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def skeleton(small: bool):
    from transformers import LlamaForCausalLM

    from qlin_cli import empty_weights

    with empty_weights():
        return LlamaForCausalLM(model_config(small)).eval()


def load_float(small: bool, weights: Path):
    from safetensors.torch import load_file

    model = skeleton(small)
    model.load_state_dict(load_file(str(weights)), assign=True)
    return model


def linear_weight_bytes(model) -> int:
    """Bytes of the Linear layers' weights as a decode step reads them: float weights at their
    dtype; qlin's at their width (4-bit packed two per byte) plus scales at the width the kernel
    holds them (float32, or float16 for group scales, `primitives.half_scales`; and the zero
    points of asymmetric schemes); biases."""
    import torch.nn as nn

    from qlin_cli import QuantizedLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            s = m.scheme
            panels = getattr(getattr(m, "_run", None), "panels", None)  # lowbit, lowbit_dynamic: their scales' width
            scale_bytes = 4 if panels is None else panels.scale.element_size()
            total += m.out_features * ((m.in_features * s.bits + 7) // 8) + m.weight_scale.numel() * scale_bytes
            total += 0 if s.symmetric else m.weight_zero_point.numel()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        else:
            continue
        total += 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
    return total


def kernels_of(model) -> dict[str, int]:
    from collections import Counter

    import torch.nn as nn

    from qlin_cli import QuantizedLinear

    counts = Counter(m.kernel.name if isinstance(m, QuantizedLinear) else f"float ({m.weight.dtype})".replace("torch.", "")
                     for m in model.modules() if isinstance(m, (QuantizedLinear, nn.Linear)))
    return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------------- measuring


def step(model, ids, cache, **kwargs):
    """One forward of `ids` (1, T) after `cache` (None: empty): (logits, the grown cache). The
    cache's keyword is `cache` from transformers 5.25 on, `past_key_values` before; `kwargs` go
    to the forward (a StaticCache's `cache_position`)."""
    key = _cache_key(type(getattr(model, "_orig_mod", model)))  # a torch.compile'd model: its module's
    out = model(input_ids=ids, use_cache=True, **{key: cache}, **kwargs)
    return out.logits, getattr(out, key)


@functools.cache
def _cache_key(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def decode_tokens(model, first: int, n: int) -> tuple[float, list[int]]:
    """Seconds for `n` one-token greedy steps from an empty cache, starting from token `first`."""
    import torch

    ids = torch.tensor([[first]])
    cache, out_ids = None, []
    t0 = time.perf_counter()
    for _ in range(n):
        logits, cache = step(model, ids, cache)
        ids = logits[:, -1:].argmax(-1)
        out_ids.append(int(ids))
    return time.perf_counter() - t0, out_ids


@contextlib.contextmanager
def linear_timer(model):
    """Forward pre/post hooks on every nn.Linear and QuantizedLinear of `model` while the block
    runs; yields a one-element list that accumulates the seconds spent inside those layers."""
    import torch.nn as nn

    from qlin_cli import QuantizedLinear

    spent = [0.0]
    started: dict[int, float] = {}

    def pre(mod, args):
        started[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        spent[0] += time.perf_counter() - started.pop(id(mod))

    handles = []
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, nn.Linear)):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield spent
    finally:
        for h in handles:
            h.remove()


def profile_step(model, first: int, before: int, steps: int) -> dict[str, float]:
    """Mean seconds per decode step inside the Linear layers and in the whole step, over `steps`
    steps that follow `before` untimed ones, from an empty cache."""
    import torch

    ids, cache = torch.tensor([[first]]), None
    total = 0.0
    with linear_timer(model) as spent:
        for i in range(before + steps):
            if i == before:
                spent[0] = 0.0
            t0 = time.perf_counter()
            logits, cache = step(model, ids, cache)
            if i >= before:
                total += time.perf_counter() - t0
            ids = logits[:, -1:].argmax(-1)
    return {"step_s": total / steps, "linear_s": spent[0] / steps, "steps": steps}


def measure_decode(model, args, log_name: str) -> tuple[dict, dict]:
    """Decode tokens/s (best of the timed runs) and the profile of a step. A format too slow
    for --new-tokens x --repeats within --max-mode-s runs fewer tokens, once (and says so); one
    whose first step takes over --max-mode-s / 8 gets no warm-up beyond that step and no
    separate profile (its one timed run is profiled)."""
    first = 1
    t1 = decode_tokens(model, first, 1)[0]  # warm-up: the first step, from an empty cache
    slow = t1 * 8 > args.max_mode_s
    per_token = t1 if slow else decode_tokens(model, first, min(4, args.new_tokens))[0] / min(4, args.new_tokens)
    tokens, repeats = args.new_tokens, args.repeats
    if per_token * tokens * repeats > args.max_mode_s:
        repeats = 1
        tokens = max(2, min(tokens, int(args.max_mode_s / per_token)))
    if slow:
        with linear_timer(model) as spent:
            runs = [decode_tokens(model, first, tokens)]
        prof = {"step_s": runs[0][0] / tokens, "linear_s": spent[0] / tokens, "steps": tokens, "in_timed_run": True}
    else:
        runs = [decode_tokens(model, first, tokens) for _ in range(repeats)]
        steps = max(2, min(args.profile_steps, int(args.max_mode_s / 4 / per_token)))
        prof = profile_step(model, first, before=min(4, tokens), steps=steps)
    res = {"seconds": [r[0] for r in runs], "tokens": tokens, "repeats": repeats,
           "tokens_per_s": tokens / min(r[0] for r in runs), "first_ids": runs[0][1][:16], "slow": slow}
    common.log(f"  {log_name}: decode {res['tokens_per_s']:.2f} tokens/s ({tokens} tokens x {repeats}); "
               f"a step {prof['step_s'] * 1e3:.1f} ms, its Linear layers {prof['linear_s'] * 1e3:.1f} ms")
    return res, prof


def measure_compiled(model, args, log_name: str) -> dict:
    """Decode tokens/s of `qlinear.compile_model(model)` (torch.compile, each packed qlin layer
    one opaque op; a float model: plain torch.compile) in a transformers StaticCache, so that one
    graph serves every step: --new-tokens greedy steps, best of --repeats, after a warm-up of 4
    steps that compiles (its seconds recorded); eager in the same cache for comparison."""
    import torch
    from transformers import StaticCache

    from qlin_cli.qlinear import compile_model

    n = args.new_tokens

    def run(m, steps: int) -> tuple[float, list[int]]:  # every run in a cache of one size: one graph for all
        cache = StaticCache(config=model.config, max_cache_len=n + 8)
        ids, out_ids = torch.tensor([[1]]), []
        t0 = time.perf_counter()
        for i in range(steps):
            logits, cache = step(m, ids, cache, cache_position=torch.tensor([i]))
            ids = logits[:, -1:].argmax(-1)
            out_ids.append(int(ids))
        return time.perf_counter() - t0, out_ids

    run(model, 4)
    eager = [run(model, n) for _ in range(args.repeats)]
    compiled = compile_model(model)
    try:
        t0 = time.perf_counter()
        run(compiled, 4)
        compile_s = time.perf_counter() - t0
        runs = [run(compiled, n) for _ in range(args.repeats)]
    except Exception as exc:  # a compiler that fails here is reported, never fatal
        common.log(f"  {log_name}: compiled decode failed: {common.short_error(exc)}")
        return {"error": common.short_error(exc), "static_eager_tokens_per_s": n / min(e[0] for e in eager)}
    res = {"tokens": n, "tokens_per_s": n / min(r[0] for r in runs),
           "static_eager_tokens_per_s": n / min(e[0] for e in eager), "compile_s": compile_s,
           "same_tokens_as_eager": runs[0][1] == eager[0][1]}
    common.log(f"  {log_name}: compiled decode {res['tokens_per_s']:.2f} tokens/s (eager in the same cache "
               f"{res['static_eager_tokens_per_s']:.2f}; compiling {compile_s:.0f} s; the same greedy tokens: "
               f"{res['same_tokens_as_eager']})")
    return res


def measure_prefill(model, args, log_name: str, slow: bool = False) -> dict:
    """Prefill tokens/s of --prompt tokens: first a probe of prompt / 8 tokens (prompt / 64 where
    decode was `slow`), the cost estimate; then one untimed call and --repeats timed ones (the
    best kept), or, where one call is estimated over --slow-call-s, that one call alone; or,
    where the calls would pass --max-mode-s, the probe's figure only (marked as such)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen)
    call = lambda n: model(input_ids=ids[:, :n], use_cache=True, logits_to_keep=1)  # noqa: E731
    probe_n = max(1, args.prompt // (64 if slow else 8))
    t0 = time.perf_counter()
    call(probe_n)
    probe_s = time.perf_counter() - t0
    estimate = probe_s * args.prompt / probe_n
    res: dict[str, Any] = {"tokens": args.prompt, "probe_tokens": probe_n, "probe_s": probe_s}
    if estimate > args.max_mode_s:
        res.update(tokens_per_s=probe_n / probe_s, probe_only=True)
        common.log(f"  {log_name}: prefill of {args.prompt} tokens estimated at {estimate:.0f} s, over --max-mode-s: "
                   f"the {probe_n}-token probe's {res['tokens_per_s']:.1f} tokens/s only")
        return res
    calls = 1 if estimate > args.slow_call_s else 1 + min(args.repeats, max(1, int(args.max_mode_s / estimate) - 1))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call(args.prompt)
        times.append(time.perf_counter() - t0)
    timed = times[1:] or times
    res.update(seconds=times, first_call_only=len(times) == 1, tokens_per_s=args.prompt / min(timed))
    common.log(f"  {log_name}: prefill {res['tokens_per_s']:.1f} tokens/s")
    return res


def worker(fmt: str, args) -> dict[str, Any]:
    """One format in this (fresh) process: load it, then measure. Returns the JSON-able result."""
    import gc

    import torch

    common.setup_threads(args.threads)
    import transformers.models.llama.modeling_llama  # noqa: F401 (before the RSS baseline: the model needs it)

    import qlin_cli.qfile  # noqa: F401
    import qlin_cli.qlinear  # noqa: F401

    workdir = Path(args.dir)
    res: dict[str, Any] = {"format": fmt, "rss_imports_bytes": common.rss_bytes()}
    reset = common.reset_peak_rss()  # the peak while loading, below
    t0 = time.perf_counter()
    dtype = model_dtype(fmt)
    if FORMATS[fmt] is None:
        model = load_float(args.small, workdir / "float32.safetensors").to(dtype)
    else:
        from qlin_cli import load_quantized

        model = load_quantized(skeleton(args.small).to(dtype), qlin_path(workdir, fmt))
    load_s = time.perf_counter() - t0
    peak = common.peak_rss_bytes() if reset else None
    gc.collect()
    res.update(load_s=load_s, peak_load_bytes=peak, rss_loaded_bytes=common.rss_bytes(), kernels=kernels_of(model),
               linear_bytes=linear_weight_bytes(model))
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([CHECK_TOKENS])).logits[0, -1].float()
        torch.save({"name": fmt, "logits": logits}, workdir / f"logits.{slug(fmt)}.pt")
        if "decode" in args.modes:
            res["decode"], res["profile"] = measure_decode(model, args, fmt)
        if "prefill" in args.modes:
            res["prefill"] = measure_prefill(model, args, fmt, slow=res.get("decode", {}).get("slow", False))
        if "compiled" in args.modes and not res.get("decode", {}).get("slow", False):
            res["compiled"] = measure_compiled(model, args, fmt)
    gc.collect()
    res.update(rss_bytes=common.rss_bytes(), peak_rss_bytes=common.peak_rss_bytes())
    return res


def slug(fmt: str) -> str:
    return fmt.replace(" ", "_")


def qlin_path(workdir: Path, fmt: str) -> Path:
    return workdir / f"{slug(fmt)}.qlin.safetensors"


def prepare(formats: list[str], args) -> dict[str, Any]:
    """In this (fresh) process: the float32 weights built and saved, then each qlin format of
    `formats` quantized from them and saved as a qlin file. Returns {format: quantize_s, file_bytes}."""
    import gc

    import torch

    from qlin_cli import QuantConfig, quantize_model, save_quantized

    common.setup_threads(args.threads)
    workdir = Path(args.dir)
    build_weights(args.small, workdir / "float32.safetensors")
    out: dict[str, Any] = {}
    for fmt in formats:
        if FORMATS[fmt] is None:
            continue
        model = load_float(args.small, workdir / "float32.safetensors").to(model_dtype(fmt))
        t0 = time.perf_counter()
        with torch.inference_mode():
            result = quantize_model(model, QuantConfig(**FORMATS[fmt]))
        seconds = time.perf_counter() - t0
        path = save_quantized(result, qlin_path(workdir, fmt))
        out[fmt] = {"quantize_s": seconds, "file_bytes": path.stat().st_size}
        common.log(f"  {fmt}: quantized in {seconds:.1f} s, file {path.stat().st_size / 1e6:.0f} MB")
        del model, result
        gc.collect()
    return out


def run_child(argv: list[str], timeout: float) -> dict[str, Any]:
    """This script's `argv` in a fresh process; its JSON answer (last stdout line) or {error}."""
    rc, out, _, _ = common.run_child([sys.executable, str(Path(__file__).resolve()), *argv], timeout, pass_stderr=True)
    if rc != 0:
        return {"error": f"exit {rc}" + (f": {out.strip().splitlines()[-1][:300]}" if out.strip() else "")}
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- llama.cpp

QUANTIZE_C = r"""
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
/* quantize IN OUT FTYPE THREADS: llama_model_quantize with every tensor at FTYPE (pure) */
int main(int argc, char ** argv) {
    if (argc != 5) { fprintf(stderr, "usage: quantize IN OUT FTYPE THREADS\n"); return 2; }
    llama_backend_init();
    llama_model_quantize_params p = llama_model_quantize_default_params();
    p.ftype = (enum llama_ftype) atoi(argv[3]);
    p.nthread = atoi(argv[4]);
    p.pure = true;
    return llama_model_quantize(argv[1], argv[2], &p) == 0 ? 0 : 1;
}
"""


LOGITS_CPP = r"""
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <vector>
// logits MODEL THREADS TOKEN...: the last token's logits after one batch of TOKENS, one a line
int main(int argc, char ** argv) {
    if (argc < 4) { fprintf(stderr, "usage: logits MODEL THREADS TOKEN...\n"); return 2; }
    ggml_backend_load_all();
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) return 1;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256;
    cp.n_threads = cp.n_threads_batch = atoi(argv[2]);
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) return 1;
    std::vector<llama_token> tokens;
    for (int i = 3; i < argc; i++) tokens.push_back(atoi(argv[i]));
    if (llama_decode(ctx, llama_batch_get_one(tokens.data(), (int) tokens.size())) != 0) return 1;
    const float * logits = llama_get_logits_ith(ctx, -1);
    for (int i = 0; i < llama_vocab_n_tokens(llama_model_get_vocab(model)); i++) printf("%.9g\n", logits[i]);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
"""
INSTALL_RECIPE = "2"  # bump when install_llama_cpp builds something new: cached installs are redone
CHECK_TOKENS = [1, 15, 263, 1000, 2048, 3000, 77, 5]  # the logit check's tokens (all below --small's vocabulary)


class LlamaCpp:
    """Paths of an installed llama.cpp: `bench` and `quantize` executables (beside the shipped
    libraries, where ggml looks for its CPU backends), the source's gguf-py, its version."""

    def __init__(self, root: Path):
        self.root = root
        self.bins = root / "bins"
        self.bench = self.bins / "llama-bench"
        self.quantize = self.bins / "qlin-quantize"
        self.logits = self.bins / "qlin-logits"
        self.gguf_py = root / "src" / "gguf-py"
        self.version = (root / "VERSION").read_text().strip() if (root / "VERSION").exists() else "?"


def _sh(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise common.Unavailable(f"`{' '.join(map(str, cmd[:3]))} ...` failed: "
                                 f"{(p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or ['exit ' + str(p.returncode)]}")
    return p.stdout


def install_llama_cpp(root: Path = LLAMA_CPP_CACHE) -> LlamaCpp:
    """llama.cpp for this benchmark, cached under `root` (once; later runs reuse it): the npm
    packages `@node-llama-cpp/linux-x64` (prebuilt CPU libraries, one per CPU kind) and
    `node-llama-cpp` (the source, as a git bundle) at NODE_LLAMA_CPP, `llama-bench` and a small
    quantizer compiled against the libraries. Raises Unavailable with the reason."""
    done = root / "READY"
    if done.exists() and done.read_text().strip() == INSTALL_RECIPE:
        return LlamaCpp(root)
    for tool in ("npm", "git", "g++"):
        if shutil.which(tool) is None:
            raise common.Unavailable(f"{tool} is not installed")
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        raise common.Unavailable("the prebuilt libraries are for Linux x86-64")
    root.mkdir(parents=True, exist_ok=True)
    packs = root / "npm"
    packs.mkdir(exist_ok=True)
    tgz = {name: packs / f"{name.lstrip('@').replace('/', '-')}-{NODE_LLAMA_CPP}.tgz"
           for name in ("@node-llama-cpp/linux-x64", "node-llama-cpp")}
    missing = [f"{n}@{NODE_LLAMA_CPP}" for n, p in tgz.items() if not p.exists()]
    if missing:
        common.log(f"llama.cpp: npm pack {' '.join(missing)} ...")
        _sh(["npm", "pack", "--silent", *missing], cwd=packs, timeout=600)
    bins, src = root / "bins", root / "src"
    for d in (bins, src, root / "unpack"):
        shutil.rmtree(d, ignore_errors=True)
    with tarfile.open(tgz["@node-llama-cpp/linux-x64"]) as t:
        t.extractall(root / "unpack" / "bin", filter="data")
    shutil.move(root / "unpack" / "bin" / "package" / "bins" / "linux-x64", bins)
    with tarfile.open(tgz["node-llama-cpp"]) as t:
        t.extractall(root / "unpack" / "src", filter="data")
    info = json.loads((root / "unpack" / "src" / "package" / "llama" / "llama.cpp.info.json").read_text())
    bundle = root / "unpack" / "src" / "package" / "llama" / "gitRelease.bundle"
    _sh(["git", "clone", "--quiet", "--bare", str(bundle), str(root / "unpack" / "git")])
    src.mkdir()
    archive = subprocess.run(["git", "--git-dir", str(root / "unpack" / "git"), "archive", "HEAD", "include",
                              "ggml/include", "common", "vendor", "tools/llama-bench", "gguf-py"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    libs = sorted(p.name for p in bins.glob("*.so") if not p.name.startswith("libggml-cpu-"))
    link = [str(bins / n) for n in libs] + [f"-Wl,-rpath,{bins}", "-pthread"]
    inc = [f"-I{src / d}" for d in ("include", "ggml/include", "common", "vendor")]
    common.log("llama.cpp: compiling llama-bench and a quantizer against the shipped libraries ...")
    _sh(["g++", "-O2", "-DNDEBUG", "-std=c++17", *inc, str(src / "tools/llama-bench/llama-bench.cpp"),
         str(src / "tools/llama-bench/main.cpp"), "-o", str(bins / "llama-bench"), *link])
    (root / "unpack" / "quantize.cpp").write_text(QUANTIZE_C)
    _sh(["g++", "-O2", "-std=c++17", *inc, str(root / "unpack" / "quantize.cpp"), "-o", str(bins / "qlin-quantize"), *link])
    (root / "unpack" / "logits.cpp").write_text(LOGITS_CPP)
    _sh(["g++", "-O2", "-std=c++17", *inc, str(root / "unpack" / "logits.cpp"), "-o", str(bins / "qlin-logits"), *link])
    shutil.rmtree(root / "unpack")
    (root / "VERSION").write_text(f"node-llama-cpp {NODE_LLAMA_CPP} (llama.cpp release {info.get('tag', '?')})\n")
    done.write_text(INSTALL_RECIPE)
    return LlamaCpp(root)


def _permute(w, n_head: int):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half Q/K rows to GGUF's order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(cfg, weights: Path, path: Path, gguf_py: Path) -> None:
    """The float32 weights as a GGUF F32 llama model, with a made-up SentencePiece vocabulary
    (<unk>, <s>, </s>, the 256 byte tokens, then fillers): llama-bench feeds token ids only."""
    sys.path.insert(0, str(gguf_py))
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    sd = load_file(str(weights))
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("qlin-bench llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)  # all F32
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(cfg.vocab_size - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (cfg.vocab_size - 259)  # unknown, control, byte, normal
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _permute(t, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_rows(cfg, args, workdir: Path, linear_params: int) -> dict[str, Any]:
    """llama-bench's pp/tg tokens/s for F32, Q8_0 and Q4_0 of the same weights, or {unavailable}."""
    try:
        lc = install_llama_cpp()
    except (common.Unavailable, OSError, subprocess.SubprocessError) as exc:
        return {"unavailable": str(exc) if isinstance(exc, common.Unavailable) else common.short_error(exc)}
    f32 = gguf_path(workdir, "F32")
    try:
        common.log("llama.cpp: writing GGUF files ...")
        write_gguf(cfg, workdir / "float32.safetensors", f32, lc.gguf_py)
        files = {"F32": f32}
        for name in ("Q8_0", "Q4_0"):
            files[name] = gguf_path(workdir, name)
            _sh([str(lc.quantize), str(f32), str(files[name]), str(GGUF_TYPES[name]), str(args.threads)])
    except (common.Unavailable, OSError, ImportError, subprocess.SubprocessError) as exc:
        return {"unavailable": f"writing the GGUF files failed: {common.short_error(exc)}"}
    rows: dict[str, Any] = {"version": lc.version, "types": {}}
    for name, path in files.items():
        logits = common.run_child([str(lc.logits), str(path), str(args.threads), *map(str, CHECK_TOKENS)], timeout=300)
        if logits.returncode == 0:
            import torch

            torch.save({"name": f"llama.cpp {name}", "logits": torch.tensor([float(v) for v in logits.stdout.split()])},
                       workdir / f"logits.llama.cpp_{name}.pt")
        rows["types"][name] = keep_best(None, {"file_bytes": path.stat().st_size,
                                               "linear_bytes": int(linear_params * GGUF_BYTES_PER_WEIGHT[name]),
                                               **llama_bench(name, path, args, lc.bench)})
    cmd_show = f"llama-bench -m MODEL.gguf -p {args.prompt} -n {args.new_tokens} -t {args.threads} -r {args.repeats}"
    rows["command"] = cmd_show
    return rows


def gguf_path(workdir: Path, name: str) -> Path:
    """The GGUF file of one llama.cpp type (F32, Q8_0, Q4_0) in a run's folder."""
    return workdir / f"model.{name}.gguf"


def llama_bench(name: str, path: Path, args, bench: Path | None = None) -> dict[str, Any]:
    """llama-bench's best decode and prefill tokens/s for one GGUF file, its CPU backend and
    peak RSS (or an error)."""
    bench = bench or install_llama_cpp().bench  # (cached: the second call finds it built)
    cmd = [str(bench), "-m", str(path), "-p", str(args.prompt), "-n", str(args.new_tokens),
           "-t", str(args.threads), "-r", str(args.repeats), "-o", "json"]
    rc, out, err, peak = common.run_child(cmd, timeout=900)
    entry: dict[str, Any] = {}
    if rc != 0:
        entry["error"] = (err.strip().splitlines() or [f"exit {rc}"])[-1][:300]
    else:
        for test in json.loads(out):
            mode = "prefill" if test["n_prompt"] else "decode"
            if mode not in args.modes:  # llama-bench runs both; a mode left out is not reported
                continue
            # llama-bench's avg_ts is the mean of tokens/s over its repetitions; the best:
            samples = test.get("samples_ts") or [test["avg_ts"]]
            entry[mode] = {"tokens_per_s": max(samples), "samples_ts": samples,
                           "tokens": test["n_prompt"] or test["n_gen"]}
        backend = re.search(r"loaded CPU backend from (\S+)", err)
        entry["cpu_backend"] = Path(backend.group(1)).name if backend else None
    entry["peak_rss_bytes"] = peak
    common.log(f"  llama.cpp {name}: " + ", ".join(f"{m} {entry[m]['tokens_per_s']:.1f} tokens/s"
                                                    for m in ("decode", "prefill") if m in entry))
    return entry


def keep_best(old: dict[str, Any] | None, new: dict[str, Any], rounds_before: int = 0) -> dict[str, Any]:
    """One format's entry over --rounds: the facts of every round (a file's size), each mode's
    figures (and the decode profile) from the round with the most tokens/s in that mode, every
    round's tokens/s in `rounds` (None for a round without it; `rounds_before`: how many rounds
    `old` holds) and every round's error in `errors`. This VM's read bandwidth moves by up to 2x
    from minute to minute, and llama.cpp runs after the qlin formats: rounds give every format
    and llama.cpp several minutes each."""
    modes = ("decode", "prefill", "compiled")

    def tps(entry: dict[str, Any], mode: str) -> float | None:
        cell = entry.get(mode)
        return cell.get("tokens_per_s") if isinstance(cell, dict) else None

    out = {k: v for k, v in (old or {}).items() if k != "error"}  # the earlier rounds' best figures
    out.update({k: v for k, v in new.items() if k not in ("error", "errors", "rounds", "profile", *modes)})
    errors = [*out.pop("errors", []), *([new["error"]] if "error" in new else [])]
    rounds = out["rounds"] = {m: list(v) for m, v in out.get("rounds", {}).items()}
    for mode in modes:
        t = tps(new, mode)
        if t is None and mode not in rounds:
            continue
        rounds.setdefault(mode, [None] * rounds_before).append(t)
        if t is not None and t > (tps(out, mode) or 0):
            out[mode] = new[mode]
            if mode == "decode" and "profile" in new:
                out["profile"] = new["profile"]
    if errors:
        out["errors"] = errors
        if not any(tps(out, m) is not None for m in modes):
            out["error"] = errors[-1]  # no round gave a figure
    return out


# ----------------------------------------------------------------------------------- the run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--small", action="store_true", help="a 2-layer hidden-512 model: a smoke run")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help=f"comma-separated, of {', '.join(SHORT)} (default: all but the float16 ones)")
    p.add_argument("--modes", default="decode,prefill,bandwidth")
    p.add_argument("--new-tokens", type=int, help="decode: one-token steps per run (default 64; --small 16)")
    p.add_argument("--prompt", type=int, help="prefill: tokens in the one forward (default 512; --small 128)")
    p.add_argument("--repeats", type=int, help="timed runs per figure, the best kept (default 2; --small 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every format and llama.cpp this many times in turn, each figure the best round's "
                        "(a machine whose bandwidth moves from minute to minute)")
    p.add_argument("--profile-steps", type=int, default=8, help="decode steps averaged in the profile")
    p.add_argument("--max-mode-s", type=float, default=40.0,
                   help="seconds a format may spend on one mode: a slower one runs fewer tokens (decode) or "
                        "reports its probe of prompt/8 tokens (prefill)")
    p.add_argument("--slow-call-s", type=float, default=12.0,
                   help="prefill: a call estimated slower than this runs once, untimed call included")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--write-results", action="store_true", help="rewrite the decode section of benchmarks/RESULTS.md")
    p.add_argument("--md-section", help="rewrite this section of benchmarks/RESULTS.md instead (e.g. fp16-host)")
    p.add_argument("--out", help="JSON output (default benchmarks/results/decode[_small].json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for key, full, small in (("new_tokens", 64, 16), ("prompt", 512, 128), ("repeats", 2, 1)):
        if getattr(args, key) is None:
            setattr(args, key, small if args.small else full)
    if args.prepare:
        print(json.dumps(common.json_safe(prepare([SHORT[f] for f in args.formats.split(",")], args))))
        return 0
    if args.worker:
        print(json.dumps(common.json_safe(worker(args.worker, args))))
        return 0
    bad = [f for f in args.formats.split(",") if f not in SHORT]
    if bad or set(args.modes) - {"decode", "prefill", "bandwidth", "compiled"}:
        p.error(f"unknown format or mode: {', '.join(bad) or args.modes} (formats: {', '.join(SHORT)}; "
                "modes: decode, prefill, bandwidth, compiled)")
    if (args.write_results or args.md_section) and args.small:
        p.error("--write-results and --md-section record the full model only (leave out --small)")
    formats = [SHORT[f] for f in args.formats.split(",")]
    return run(args, formats, argv)


def run(args, formats: list[str], argv) -> int:
    start = time.perf_counter()
    common.setup_threads(args.threads)
    cfg = model_config(args.small)
    result: dict[str, Any] = {
        "machine": common.machine_info(args.threads), "cpu": common.cpu_summary(),
        "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": describe_config(cfg), "loadavg_start": os.getloadavg(), "settings": {
            "threads": args.threads, "new_tokens": args.new_tokens, "prompt": args.prompt,
            "repeats": args.repeats, "rounds": args.rounds, "modes": args.modes, "profile_steps": args.profile_steps,
            "max_mode_s": args.max_mode_s},
        "formats": {}, "bandwidth": {},
    }
    common.log(f"{result['cpu']}; load average {' '.join(f'{v:.2f}' for v in result['loadavg_start'])}")
    if "bandwidth" in args.modes:
        result["bandwidth"]["start"] = _bandwidth(args.threads)
    child_args = ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--prompt", str(args.prompt),
                  "--repeats", str(args.repeats), "--profile-steps", str(args.profile_steps),
                  "--max-mode-s", str(args.max_mode_s), "--slow-call-s", str(args.slow_call_s),
                  "--modes", ",".join(args.modes), "--formats", args.formats] + (["--small"] if args.small else [])
    with common.tempdir() as tmp:
        workdir = Path(tmp)
        child_args += ["--dir", str(workdir)]
        common.log(f"building the float32 weights ({describe_config(cfg)}) and quantizing ...")
        prepared = run_child(["--prepare", *child_args], timeout=1800)
        for r in range(args.rounds):  # each round every format, then llama.cpp: each sees every minute
            for fmt in formats:
                common.log(f"{fmt} ..." + (f" (round {r + 1} of {args.rounds})" if args.rounds > 1 else ""))
                entry: dict[str, Any] = dict(prepared.get(fmt, {}))
                if "error" in prepared:
                    entry = {"error": f"preparing: {prepared['error']}"}
                else:
                    entry.update(run_child(["--worker", fmt, *child_args], timeout=1800))
                    if r == args.rounds - 1:
                        qlin_path(workdir, fmt).unlink(missing_ok=True)
                result["formats"][fmt] = keep_best(result["formats"].get(fmt), entry, r)
                common.write_json(_out_path(args), result)  # a cut-short run keeps its part
            if args.no_llama_cpp:
                result["llama_cpp"] = {"unavailable": "left out (--no-llama-cpp)"}
            elif r == 0:
                result["llama_cpp"] = llama_cpp_rows(cfg, args, workdir, _linear_params(cfg))
                if "unavailable" in result["llama_cpp"]:
                    common.log(f"llama.cpp unavailable: {result['llama_cpp']['unavailable']}; quoting issue 24's figures")
            else:  # the GGUF files llama_cpp_rows wrote, measured again
                for name, entry in result["llama_cpp"].get("types", {}).items():
                    again = llama_bench(name, gguf_path(workdir, name), args)
                    result["llama_cpp"]["types"][name] = keep_best(entry, again, r)
        result["logits_sqnr_db"] = logits_sqnr(workdir)
    if "bandwidth" in args.modes:
        result["bandwidth"]["end"] = _bandwidth(args.threads)
        streams = stream_bandwidth(args.threads)
        if "unavailable" in streams:
            common.log(f"several-stream read bandwidth unavailable: {streams['unavailable']}")
            result["bandwidth_streams_unavailable"] = streams["unavailable"]
        else:
            result["stream_counts"] = streams.pop("streams")
            result["bandwidth"]["streams"] = streams
    result["loadavg_end"] = os.getloadavg()
    section = args.md_section or ("decode" if args.write_results else None)
    common.publish(result, markdown, _out_path(args), section, start)
    return 0


def logits_sqnr(workdir: Path) -> dict[str, float]:
    """SQNR (dB) of the last token's logits after CHECK_TOKENS, each format's and each llama.cpp
    type's, against the float32 model's in transformers; for llama.cpp's F32 it checks that the
    GGUF file holds the same model."""
    import torch

    ref = workdir / f"logits.{slug('float32')}.pt"
    if not ref.exists():
        return {}
    reference = torch.load(ref)["logits"]
    out = {}
    for path in sorted(workdir.glob("logits.*.pt")):
        got = torch.load(path)
        if got["name"] != "float32":
            same = got["logits"].shape == reference.shape
            out[got["name"]] = common.sqnr_db(reference, got["logits"]) if same else None
    return out


def _out_path(args) -> Path:
    return Path(args.out) if args.out else common.RESULTS_DIR / ("decode_small.json" if args.small else "decode.json")


def _linear_params(cfg) -> int:
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return cfg.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * i) + cfg.vocab_size * h


def _bandwidth(threads: int) -> dict[str, float]:
    out = {}
    for t in sorted({1, threads}):
        out[str(t)] = common.read_bandwidth(t)
        common.log(f"read bandwidth, {t} thread(s): {out[str(t)] / 1e9:.1f} GB/s")
    common.setup_threads(threads)
    return out


def stream_bandwidth(threads: int) -> dict[str, Any]:
    """Read bandwidth with each thread reading 1, 2, 4 or 8 sequential streams side by side
    (benchmarks/read_bandwidth.cpp, built here once into the llama.cpp cache's folder): {threads:
    best GB/s as bytes/s, "streams": {threads: the stream count that gave it}}, or {"unavailable":
    why}. Kernels that read several rows at once can reach it where torch.sum's one stream a
    thread cannot."""
    src = Path(__file__).resolve().parent / "read_bandwidth.cpp"
    exe = LLAMA_CPP_CACHE.parent / f"read_bandwidth-{hashlib.sha256(src.read_bytes()).hexdigest()[:12]}"
    try:
        if not exe.exists():  # built under a temporary name: a killed build leaves no broken binary
            exe.parent.mkdir(parents=True, exist_ok=True)
            tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
            try:
                _sh([os.environ.get("CXX", "c++"), "-O3", "-mavx2", "-fopenmp", str(src), "-o", str(tmp)], timeout=120)
                os.replace(tmp, exe)
            finally:
                tmp.unlink(missing_ok=True)
        out: dict[str, Any] = {"streams": {}}
        for t in sorted({1, threads}):
            rows = [line.split() for line in _sh([str(exe), str(t)], timeout=300).splitlines() if line.strip()]
            streams, gbs = max(((int(r[0]), float(r[1])) for r in rows), key=lambda r: r[1])
            out[str(t)], out["streams"][str(t)] = gbs * 1e9, streams
            common.log(f"read bandwidth, {t} thread(s), {streams} streams a thread: {gbs:.1f} GB/s")
        return out
    except (OSError, common.Unavailable, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"unavailable": str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__}


# ----------------------------------------------------------------------------------- the tables


def markdown(result: dict) -> str:
    s = result["settings"]
    bw = result["bandwidth"]
    bound = max((v[str(s["threads"])] for v in bw.values()), default=None)
    lc = result.get("llama_cpp") or {}
    quoted = "unavailable" in lc
    peers = {} if quoted else lc.get("types", {})
    la0, la1 = result["loadavg_start"], result.get("loadavg_end", result["loadavg_start"])
    parts = [
        f"## Decode and prefill of a Llama-shaped model (`benchmarks/decode.py`, {s['threads']} threads)",
        f"CPU: {result['cpu']}. " + common.machine_md(result["machine"]),
        f"Command: `{result['command']}` ({result.get('elapsed_s', 0):.0f} s); load average {la0[0]:.2f} at the "
        f"start, {la1[0]:.2f} at the end. Model: {result['model']}. Each format runs in a fresh process; the qlin "
        "formats are loaded from the file `save_quantized` wrote into an `empty_weights()` skeleton. decode: "
        f"{s['new_tokens']} one-token greedy steps from an empty KV cache; prefill: one forward of {s['prompt']} "
        f"tokens into an empty cache (logits of the last token only); best of {s['repeats']} runs"
        + (f", and of {s['rounds']} rounds (each round every format in turn, then llama.cpp: all "
           f"tokens/s of each round in the JSON's `rounds`)" if s.get("rounds", 1) > 1 else "") + ". Linear MB/token: "
        "the Linear layers' weights as a token reads them (codes at their width plus scales as the kernel holds "
        "them: float16 group scales, float32 others); GB/s: those "
        "bytes times tokens/s; % bound: that against the read bandwidth measured in this run. RSS: the process's "
        "resident memory after loading the model and running both modes (in brackets: less the RSS after its "
        "imports, once the model is loaded / after both modes, whose freed activations the C library keeps; "
        "safetensors maps the float weights, so they count once read); for llama.cpp, llama-bench's peak RSS "
        "(it maps its model file too).",
    ]
    if bw:
        sums = {w: d for w, d in bw.items() if w != "streams"}
        parts.append("Read bandwidth (`torch.sum` over 1 GiB of float32, best of 5): " + "; ".join(
            f"{when}: " + ", ".join(f"{t} thread(s) {v / 1e9:.1f} GB/s" for t, v in d.items()) for when, d in sums.items())
            + ("; each thread reading several sequential streams side by side (`benchmarks/read_bandwidth.cpp`, "
               "1 GiB, best of 5): " + ", ".join(f"{t} thread(s) {v / 1e9:.1f} GB/s ({result['stream_counts'][t]} "
                                                  "streams a thread)" for t, v in bw["streams"].items())
               if "streams" in bw else "")
            + (f"; the bound is the largest, {bound / 1e9:.1f} GB/s." if bound else "."))
    if quoted:
        parts.append(f"llama.cpp could not be had here ({lc['unavailable']}). The llama.cpp column quotes issue 24's "
                     "figures, from an Intel Xeon with AMX (amx_int8, amx_bf16) and AVX-512, 2 threads, 28-30 GB/s: "
                     "another machine, so its ratios say little.")
    elif lc:
        parts.append(f"llama.cpp: {lc.get('version')}, its prebuilt CPU libraries (backend chosen by ggml for this "
                     f"CPU: {_backend(peers)}); `{lc.get('command')}` on GGUF files of the same weights (F32, and "
                     "Q8_0 / Q4_0 quantized with `pure`: every matrix, the head too, as qlin quantizes it).")
    sq = result.get("logits_sqnr_db") or {}
    if sq:
        parts.append(f"Output check: SQNR (dB) of the last token's logits after {len(CHECK_TOKENS)} tokens against the "
                     "float32 model in transformers: " + ", ".join(f"{k} {common.fmt(v)}" for k, v in sq.items())
                     + (" (llama.cpp F32: the GGUF file holds the same model, Q and K rows permuted)."
                        if "llama.cpp F32" in sq else "."))
    rows_f = result["formats"]
    loading = [[fmt, f"{r['load_s']:.1f}", common.fmt(r["file_bytes"] / 1e6, 0) if r.get("file_bytes") else "—",
                f"{(r['peak_load_bytes'] - r['rss_imports_bytes']) / 1e6:,.0f}",
                common.fmt((r["peak_load_bytes"] - r["rss_imports_bytes"]) / r["file_bytes"], 2) if r.get("file_bytes") else "—",
                f"{(r['rss_loaded_bytes'] - r['rss_imports_bytes']) / 1e6:,.0f}"]
               for fmt, r in rows_f.items() if r.get("peak_load_bytes")]
    if loading:
        parts.append("Loading (qlin formats: `load_quantized` of the file into an `empty_weights()` skeleton; float: "
                     "the float32 safetensors file, bf16 cast after), MB over the RSS after the imports; peak: the "
                     "most resident memory while loading (VmHWM, reset before):")
        parts.append(common.md_table(["format", "load s", "file MB", "peak loading MB", "peak / file", "RSS loaded MB"],
                                     loading))
    tps_decode = {f"llama.cpp {n}": e["decode"]["tokens_per_s"] for n, e in peers.items() if "decode" in e}
    for mode in ("decode", "prefill"):
        if mode not in s["modes"]:
            continue
        tps = {f: r[mode]["tokens_per_s"] for f, r in rows_f.items() if mode in r}
        tps.update({f"llama.cpp {n}": e[mode]["tokens_per_s"] for n, e in peers.items() if mode in e})
        table, notes = [], []
        for fmt, r in rows_f.items():
            if "error" in r or mode not in r:
                table.append([fmt, f"error: {r.get('error', 'not measured')}"])
                continue
            m, t = r[mode], tps[fmt]
            cell = _tps(t)
            if m.get("probe_only"):
                cell = f"~{cell} ({m['probe_tokens']}-token probe)"
                notes.append(f"{fmt}: {s['prompt']} tokens were estimated at {m['probe_s'] * s['prompt'] / m['probe_tokens']:.0f} s "
                             "a call, over --max-mode-s; the figure is that of one forward of "
                             f"{m['probe_tokens']} tokens.")
            elif m.get("first_call_only"):
                cell += " (1 call)"
            elif mode == "decode" and (m["tokens"], m["repeats"]) != (s["new_tokens"], s["repeats"]):
                cell += f" ({m['tokens']} tokens x {m['repeats']})"
                if m.get("slow"):
                    notes.append(f"{fmt}: its first step took over --max-mode-s / 8, so it ran {m['tokens']} tokens "
                                 "once after that one step, with the Linear layers' hooks on (its profile below is "
                                 "that run).")
            if FORMATS[fmt] is not None and DTYPES.get(fmt) == "float16" and tps.get("float16"):
                notes.append(f"{fmt}: {t / tps['float16']:.2f}x the float16 model.")
            peer = PEER.get(fmt)
            peer_t = (ISSUE_LLAMA_CPP.get(peer, {}).get(mode) if quoted else tps.get(f"llama.cpp {peer}")) if peer else None
            table.append(_row(fmt, cell, t, tps, r["linear_bytes"], bound, mode, r.get("rss_bytes"),
                              (r.get("rss_imports_bytes"), r.get("rss_loaded_bytes")),
                              f"{peer} {_tps(peer_t)}" + (" (issue 24)" if quoted else "") if peer_t else "—",
                              common.fmt(t / peer_t, 2) if peer_t else "—",
                              ", ".join(f"{k} x{v}" for k, v in r.get("kernels", {}).items())))
        for name, e in peers.items():
            t = tps.get(f"llama.cpp {name}")
            table.append(_row(f"llama.cpp {name}", _tps(t) if t else f"error: {e.get('error', '?')}", t, tps,
                              e["linear_bytes"], bound, mode, e.get("peak_rss_bytes"), None, "", "", "llama.cpp"))
        if mode == "decode":
            header = ["format", "tokens/s", "x float32", "x bf16", "llama.cpp, same bytes/weight", "x llama.cpp",
                      "Linear MB/token", "GB/s", "% bound", "RSS MB", "kernels"]
        else:
            header = ["format", "tokens/s", "x float32", "x bf16", "llama.cpp, same bytes/weight", "x llama.cpp",
                      "RSS MB", "kernels"]
            table = [row if len(row) < len(header) else row[:6] + row[9:] for row in table]
        parts.append(f"### {mode} ({s['new_tokens'] if mode == 'decode' else s['prompt']} tokens)")
        parts.append(common.md_table(header, [row + [""] * (len(header) - len(row)) for row in table]))
        if notes:
            parts.append("\n".join(f"- {n}" for n in notes))
    comp = {f: r["compiled"] for f, r in rows_f.items() if "compiled" in r}
    if comp:
        rows = []
        for fmt, c in comp.items():
            peer = PEER.get(fmt)
            peer_t = tps_decode.get(f"llama.cpp {peer}") if peer else None
            t = c.get("tokens_per_s")
            rows.append([fmt, f"error: {c['error'][:60]}" if "error" in c else _tps(t),
                         _tps(c.get("static_eager_tokens_per_s")),
                         common.fmt(t / c["static_eager_tokens_per_s"], 2) if t else "—",
                         f"{peer} {_tps(peer_t)}: {common.fmt(t / peer_t, 2)}" if t and peer_t else "—",
                         common.fmt(c.get("compile_s"), 0),
                         {True: "yes", False: "no"}.get(c.get("same_tokens_as_eager"), "—")])
        parts.append("### decode, compiled (`--modes ...,compiled`)")
        parts.append("`qlinear.compile_model(model)` (torch.compile; each packed qlin layer one opaque op) in a "
                     "transformers StaticCache, so one graph serves every step; the same greedy steps, best of "
                     f"{s['repeats']}; eager: the uncompiled model in the same cache.")
        parts.append(common.md_table(["format", "compiled tokens/s", "eager tokens/s", "x eager", "x llama.cpp",
                                      "compile s", "same greedy tokens"], rows))
    prof = {f: r["profile"] for f, r in rows_f.items() if "profile" in r}
    if prof:
        rows = []
        for fmt, pr in prof.items():
            lin_bytes = rows_f[fmt]["linear_bytes"]
            gbs = lin_bytes / pr["linear_s"] / 1e9 if pr["linear_s"] else None
            rows.append([fmt, common.fmt(pr["step_s"] * 1e3, 2), common.fmt(pr["linear_s"] * 1e3, 2),
                         common.fmt((pr["step_s"] - pr["linear_s"]) * 1e3, 2),
                         common.fmt(100 * pr["linear_s"] / pr["step_s"], 0), common.fmt(gbs, 1),
                         common.fmt(100 * gbs * 1e9 / bound, 0) if gbs and bound else "—"])
        parts.append("### One decode step, profiled")
        parts.append("Forward hooks around every Linear layer (nn.Linear or QuantizedLinear) time the layers' share "
                     f"of a decode step; the mean of up to {s.get('profile_steps', 8)} steps after 4 untimed ones "
                     "(fewer for slow formats). Linear GB/s: the Linear layers' bytes over their time alone.")
        parts.append(common.md_table(["format", "step ms", "Linear ms", "rest ms", "Linear %", "Linear GB/s",
                                      "Linear % bound"], rows))
    return "\n\n".join(parts)


def _tps(v: float | None) -> str:
    """tokens/s with two significant digits below 10 (a slow format's 0.04 is not 0.0)."""
    return "—" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2g}"


def _backend(peers: dict) -> str:
    names = sorted({e.get("cpu_backend") or "?" for e in peers.values()})
    return ", ".join(names) or "?"


def _row(name, cell, t, tps, linear_bytes, bound, mode, rss, rss0, peer, x_peer, note) -> list:
    """rss0: None, or (the RSS after the imports, the RSS once the model was loaded)."""
    f32, bf16 = tps.get("float32"), tps.get("bf16")
    imports, loaded = rss0 or (None, None)
    gbs = linear_bytes * t / 1e9 if t and mode == "decode" else None
    return [name, cell, common.fmt(t / f32, 2) if t and f32 else "—", common.fmt(t / bf16, 2) if t and bf16 else "—",
            peer, x_peer, common.fmt(linear_bytes / 1e6, 0), common.fmt(gbs, 1) if gbs else "—",
            common.fmt(100 * gbs * 1e9 / bound, 0) if gbs and bound else "—",
            (f"{rss / 2**20:,.0f}" + (f" ({(loaded - imports) / 2**20:,.0f} / {(rss - imports) / 2**20:,.0f})"
                                      if imports and loaded else f" ({(rss - imports) / 2**20:,.0f})" if imports else ""))
            if rss else "—", note]


if __name__ == "__main__":
    sys.exit(main())
