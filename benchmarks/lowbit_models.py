"""Model-level figures of n-bit and group-wise weights (issue 15): file size, output SQNR and, for
the digits models, test-set accuracy, at 8 bits (per channel: dynamic, the default, and
weight-only), 4 bits in groups of 128, 64 and 32, and 2 bits in groups of 32; then the size and
accuracy curve of `--min-sqnr` over 4-bit groups of 64 (layers widened to 8 bits, most
sensitive first, before any goes float).

Models: the sample MLP (sample_models/digits_mlp.safetensors) and sample encoder
(sample_models/encoder.safetensors), scored on sample_models/digits_test.safetensors; and a
Llama-style causal LM built from a config with seeded random weights (hidden 512, 4 layers,
~25 M parameters in its Linear layers), scored on the logits of 8 random token sequences of 64.
A layer whose input is narrower than the group (the sample models' 64-input first layer at
G = 128) takes 8 bits per channel through a recipe rule, as a user would write it.

    python benchmarks/lowbit_models.py            # ~3 min; writes benchmarks/results/lowbit_models.json
                                                  # and the lowbit-models section of RESULTS.md

A script run by hand, never a test.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SAMPLES = common.REPO / "sample_models"
CURVE_TARGETS = (20.0, 25.0, 30.0, 35.0, 40.0)


def configs(first_in: int) -> dict[str, dict[str, Any]]:
    """Name -> QuantConfig keys. Layers narrower than the group take 8 bits per channel."""
    def grouped(bits: int, g: int) -> dict[str, Any]:
        keys: dict[str, Any] = {"bits": bits, "group_size": g}
        if first_in < g:
            keys["layers"] = [{"match": "^(embed|0|model\\.embed)$", "bits": 8, "granularity": "channel"}]
        return keys

    return {
        "8-bit dynamic (default)": {},
        "8-bit weight-only, per channel": {"mode": "weight-only"},
        "4-bit per channel, weight-only": {"bits": 4, "mode": "weight-only"},
        "4-bit G=128": grouped(4, 128),
        "4-bit G=64": grouped(4, 64),
        "4-bit G=32": grouped(4, 32),
        "2-bit G=32": grouped(2, 32),
    }


def digits_models() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    from sample_models.digits import build_digits_mlp
    from sample_models.encoder import build

    test = load_file(str(SAMPLES / "digits_test.safetensors"))
    labels = load_file(str(SAMPLES / "digits_test_labels.safetensors"))
    x, y = next(iter(test.values())), next(iter(labels.values()))
    mlp = build_digits_mlp()
    mlp.load_state_dict(load_file(str(SAMPLES / "digits_mlp.safetensors")))
    enc = build()
    enc.load_state_dict(load_file(str(SAMPLES / "encoder.safetensors")))
    return {"digits MLP": (mlp.eval(), x, y), "sample encoder": (enc.eval(), x, y)}


def llama_model() -> tuple[nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))
    return model, ids


def measure(name: str, model: nn.Module, keys: dict[str, Any], run, reference: torch.Tensor,
            labels: torch.Tensor | None, tmp: Path, min_sqnr: float | None = None, data=None) -> dict[str, Any]:
    from qlin_cli import QuantConfig, quantize_model, save_quantized
    from qlin_cli.fallback import quantize_to_target

    t0 = time.perf_counter()
    config = QuantConfig(**keys)
    m = copy.deepcopy(model)
    if min_sqnr is None:
        res = quantize_model(m, config)
    else:
        res = quantize_to_target(m, config, min_sqnr_db=min_sqnr, eval_inputs=data)
    path = save_quantized(res, tmp / f"{abs(hash((name, str(keys), min_sqnr)))}.safetensors")
    with torch.no_grad():
        out = run(res.model)
    row = {
        "config": keys, "file_bytes": path.stat().st_size, "sqnr_db": common.sqnr_db(reference, out),
        "kernels": sorted({r.kernel for r in res.layers if r.kernel}), "seconds": time.perf_counter() - t0,
        "bits": sorted({r.plan.scheme.bits for r in res.layers if r.plan.scheme is not None}),
    }
    if labels is not None:
        row["accuracy"] = float((out.argmax(-1) == labels).float().mean())
    if res.fallback is not None:
        steps = res.fallback.steps
        row["widened"] = sum(s.to == "8-bit" for s in steps)
        row["to_float"] = sum(s.to == "float" for s in steps)
    path.unlink()
    return row


def main(argv=None) -> int:
    p = common.script_parser(__doc__, "the digits models only, no curve")
    args = p.parse_args(argv)
    common.setup_threads(args.threads)
    start = time.perf_counter()
    result: dict[str, Any] = {"machine": common.machine_info(args.threads),
                              "command": "python benchmarks/lowbit_models.py " + " ".join(sys.argv[1:] if argv is None else argv),
                              "models": {}}
    common.log(common.machine_md(result["machine"]))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        subjects: dict[str, tuple] = {}
        for name, (model, x, y) in digits_models().items():
            subjects[name] = (model, lambda m, x=x: m(x), y, x)
        if not args.quick:
            llama, ids = llama_model()
            subjects["Llama-style LM (random weights)"] = (llama, lambda m, ids=ids: m(input_ids=ids).logits, None, {"input_ids": ids})
        for name, (model, run, labels, data) in subjects.items():
            common.log(f"{name} ...")
            with torch.no_grad():
                reference = run(model)
            float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            entry: dict[str, Any] = {"float_bytes": float_bytes, "rows": {}, "curve": []}
            if labels is not None:
                entry["float_accuracy"] = float((reference.argmax(-1) == labels).float().mean())
            first_in = min(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
            for cname, keys in configs(first_in).items():
                entry["rows"][cname] = measure(cname, model, keys, run, reference, labels, tmp)
                r = entry["rows"][cname]
                common.log(f"  {cname:34s} {r['file_bytes']:>12,} B  SQNR {r['sqnr_db']:6.2f} dB"
                           + (f"  acc {r['accuracy']:.4f}" if "accuracy" in r else ""))
            if not args.quick:
                for target in CURVE_TARGETS:
                    try:
                        r = measure("curve", model, configs(first_in)["4-bit G=64"], run, reference, labels, tmp,
                                    min_sqnr=target, data=data)
                    except Exception as exc:  # the target cannot be met even with everything float
                        r = {"error": common.short_error(exc)}
                    r["target_sqnr_db"] = target
                    entry["curve"].append(r)
                    common.log(f"  --min-sqnr {target:g}: " + (f"{r['file_bytes']:,} B, SQNR {r['sqnr_db']:.2f} dB, "
                               f"{r['widened']} to 8-bit, {r['to_float']} to float" if "error" not in r else r["error"]))
            result["models"][name] = entry
    common.publish(result, markdown, Path(args.out) if args.out else common.RESULTS_DIR / "lowbit_models.json",
                   None if args.no_md or args.quick else "lowbit-models", start)
    return 0


def markdown(result: dict) -> str:
    out = ["## n-bit and group-wise weights: model level (issue 15)", "", common.machine_md(result["machine"]), "",
           f"Command: `{result['command']}` ({result['elapsed_s']:.0f} s). File: the qlin file's bytes; SQNR: the "
           "model's output (logits) against the float model on the same inputs; accuracy on the 360 digits test "
           "samples. Layers narrower than the group take 8 bits per channel by a recipe rule.", ""]
    for name, entry in result["models"].items():
        out += [f"### {name}", ""]
        rows = []
        if "float_accuracy" in entry:
            rows.append(["float", f"{entry['float_bytes']:,}", "1.00", "exact", f"{entry['float_accuracy']:.4f}", "—"])
        else:
            rows.append(["float", f"{entry['float_bytes']:,}", "1.00", "exact", "—", "—"])
        for cname, r in entry["rows"].items():
            rows.append([cname, f"{r['file_bytes']:,}", f"{entry['float_bytes'] / r['file_bytes']:.2f}",
                         common.fmt(r["sqnr_db"], 2), f"{r['accuracy']:.4f}" if "accuracy" in r else "—",
                         ", ".join(r["kernels"])])
        out += [common.md_table(["weights", "file bytes", "x smaller", "output SQNR dB", "accuracy", "kernels"], rows), ""]
        if entry["curve"]:
            out += ["`--min-sqnr` over 4-bit G=64 (widen to 8 bits first, then float):", ""]
            crow = []
            for r in entry["curve"]:
                if "error" in r:
                    crow.append([f"{r['target_sqnr_db']:g}", "—", "—", "—", r["error"]])
                else:
                    crow.append([f"{r['target_sqnr_db']:g}", f"{r['file_bytes']:,}", common.fmt(r["sqnr_db"], 2),
                                 f"{r['accuracy']:.4f}" if "accuracy" in r else "—",
                                 f"{r['widened']} to 8-bit, {r['to_float']} to float"])
            out += [common.md_table(["target dB", "file bytes", "output SQNR dB", "accuracy", "steps"], crow), ""]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
