"""Peak memory of `qlin quantize` on a model folder larger than a layer, whole vs `--stream`.

Builds (once, in --dir) a Llama-style causal LM from a config, random float32 weights, saved
with `save_pretrained` in several safetensors shards (default ~1.55 GB: hidden 2048, MLP 5632,
5 layers, vocabulary 32000, untied head), with the tokenizer of sample_models/docs_lm (so that
`--calib-text` works). Then runs `qlin quantize FOLDER` with and without `--stream` for each
setting (qlin defaults, which smooth from token ids and so run the model; `--calib-text
sample_models/docs_calib.txt` in dynamic and static mode; GPTQ 4-bit group 128 on the same text),
each in a fresh process, and prints each one's peak RSS above the peak RSS of a bare
`python -c "import torch"`, against the float size (the weight files' bytes), and its wall time;
checks whether the two outputs are byte-identical (they are but for GPTQ, whose streamed run
propagates quantized outputs: qlin_cli/sequential.py). Writes benchmarks/results/stream_memory.json.

    python benchmarks/stream_memory.py [--dir /tmp/qlin-stream-bench] [--layers 5] [--settings defaults,calib-text]
    python benchmarks/stream_memory.py --settings "calib-text batch 2,sensitivity" --runs stream

Not a test: it needs ~2 GB of disk and ~4 GB of memory (the whole-model runs) and takes about
half an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def peak_rss_of(cmd: list[str]) -> tuple[int, float]:
    """Peak RSS (bytes) and wall time (s) of `cmd`, run in a child of a fresh measuring process
    (so that RUSAGE_CHILDREN holds that one command only)."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]) * 1024, float(out[1])  # ru_maxrss is in KiB on Linux


def build(folder: Path, layers: int) -> None:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(folder, max_shard_size="400MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((BENCH_DIR.parent / "sample_models" / "docs_lm" / name).read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qlin-stream-bench"))
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--settings", default=None, help="comma-separated subset of: defaults, calib-text, "
                    "static calib-text, gptq 4-bit g128 calib-text, calib-text batch 2, sensitivity (default: all)")
    ap.add_argument("--runs", default="whole,stream", help="which runs of each setting: whole, stream or both")
    args = ap.parse_args()
    folder = args.dir / f"llama-{args.layers}"
    if not (folder / "config.json").is_file():
        args.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--build", str(folder), str(args.layers)], check=True)
    shards = sorted(folder.glob("*.safetensors"))
    float_bytes = sum(p.stat().st_size for p in shards)
    base, _ = peak_rss_of([sys.executable, "-c", "import torch"])
    qlin = [sys.executable, "-m", "qlin_cli"]
    text = str(BENCH_DIR.parent / "sample_models" / "docs_calib.txt")
    settings = {
        "defaults": [],
        "calib-text": ["--calib-text", text],
        "static calib-text": ["--mode", "static", "--calib-text", text],
        "gptq 4-bit g128 calib-text": ["--mode", "weight-only", "--bits", "4", "--group-size", "128", "--rounding",
                                       "gptq", "--calib-text", text],
        # the same 12 windows of 1,024 tokens, 2 to a forward (the others: all 12 in one)
        "calib-text batch 2": ["--calib-text", text, "--batch-size", "2"],
        # every layer's sensitivity (the model's output SQNR with it alone in int8), on the probe
        "sensitivity": ["--sensitivity"],
    }
    chosen = list(settings) if args.settings is None else args.settings.split(",")
    result = {"model": f"LlamaForCausalLM, hidden 2048, MLP 5632, {args.layers} layers, vocab 32000, float32",
              "shards": len(shards), "float_bytes": float_bytes, "import_torch_peak_rss_bytes": base, "settings": {}}
    print(f"float weights {float_bytes / 2**20:.0f} MiB in {len(shards)} shards; bare import torch peaks at {base / 2**20:.0f} MiB")
    for setting in chosen:
        runs = {}
        for name, extra in [(n, e) for n, e in (("whole", []), ("stream", ["--stream"])) if n in args.runs.split(",")]:
            out = args.dir / f"{name}.int8.safetensors"
            peak, wall = peak_rss_of([*qlin, "quantize", str(folder), "-o", str(out), "--force", *settings[setting], *extra])
            runs[name] = {"peak_rss_bytes": peak, "above_import_torch_bytes": peak - base,
                          "x_float": (peak - base) / float_bytes, "wall_s": wall,
                          "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "int8_bytes": out.stat().st_size}
            r = runs[name]
            print(f"{setting:>28} {name:>6}: peak {r['peak_rss_bytes'] / 2**20:.0f} MiB, above import torch "
                  f"{r['above_import_torch_bytes'] / 2**20:.0f} MiB = {r['x_float']:.2f}x the float size, {r['wall_s']:.1f} s",
                  flush=True)
        if len(runs) == 2:
            runs["identical"] = runs["whole"]["sha256"] == runs["stream"]["sha256"]
            print(f"{setting:>28} outputs byte-identical: {runs['identical']}", flush=True)
        result["settings"][setting] = runs
    path = BENCH_DIR / "results" / "stream_memory.json"
    if path.is_file():  # the settings not run this time stay as they were measured
        result["settings"] = {**json.loads(path.read_text()).get("settings", {}), **result["settings"]}
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        build(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
