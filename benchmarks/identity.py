#!/usr/bin/env python
"""Prove that a refactor changed nothing a user of the `qlin` command line sees.

Runs the real CLI of two code trees (`--old`, the previous release; `--new`, this checkout) on
the same cases and compares, old vs new, for every case:

- the exit code (and, on a failure, the first line of stderr);
- the output: a qlin file byte for byte (sha256), or every file of a compressed-tensors folder;
- the `--report` JSON and the `--json` stdout key for key and value for value, recursively
  (keys about timing are ignored: any key with a `latency` or `speedup` part, or an `ms` part
  such as `latency_float_ms`); the key ORDER of every JSON object is compared too and reported
  as a warning only;
- the Markdown twin of the report (`.md`): a warning only (it may change);
- stderr of successful commands: a warning only.

Then `qlin inspect OUT --json` on each output, `qlin inspect SOURCE --json` on the float sources,
and `qlin eval SOURCE OUT --json --repeats 1` on each qlin output (compared the same way).

Each tree runs in its own scratch folder (`WORK/old`, `WORK/new`) holding the same inputs under
the same relative names (`in/...`, `configs/...` copied from that tree, `out/...`, `rep/...`), and
every command gets relative paths, so a report that names a file names it the same way in both;
any absolute path of the scratch folder or of the tree that still shows up is replaced by
`<WORK>` / `<TREE>` before comparing. A command is

    python -c "import sys; sys.argv=['qlin', *ARGS]; from qlin_cli.cli import main; main()"

with `PYTHONPATH=<tree>` prepended (the script checks that `qlin_cli` imports from the tree),
`CI=true`, and the rest of the environment (OMP_NUM_THREADS included) unchanged. The float
sources, the probe/calibration/eval data and the sample files come from the OLD tree (so a
change of the shipped data does not hide as a CLI change; shipped recipes and sample files are
compared by bytes as a case of their own), plus a tiny Hugging Face BERT folder built here from
a fixed seed, and its token-id data.

    git worktree add /work/baseline 7847369             # the tree to compare against, once
    python benchmarks/identity.py                       # /work/baseline (default) vs this checkout
    python benchmarks/identity.py --new /work/baseline  # the baseline against itself: all same
    python benchmarks/identity.py --quick               # a subset, about a minute

One line per case (`same` / `DIFFERS: what`), indented warning lines, then
`N cases: N same, M differ`. Exit status 1 if any case differs, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OLD = Path("/work/baseline")
RUNNER = "import sys; sys.argv=['qlin', *sys.argv[1:]]; from qlin_cli.cli import main; main()"
TIMEOUT_S = 600

# Files copied from the OLD tree's sample_models/ into each scratch folder's in/.
SAMPLE_FILES = (
    "digits_mlp.pt", "digits_mlp.safetensors", "encoder.safetensors", "digits_test.safetensors",
    "digits_test_labels.safetensors", "digits_calib.safetensors",
)
RECIPES = ("default", "per-tensor", "smoothquant", "w8a8-static", "weight-only")
CT = ["--format", "compressed-tensors"]

# The tiny Hugging Face model: BertModel, hidden 32, 2 layers, built under torch.manual_seed(0).
BERT_VOCAB, BERT_TOKENS = 100, 16


# --------------------------------------------------------------------------------------------
# models and cases


@dataclass(frozen=True)
class Model:
    key: str
    source: str  # relative to the scratch folder
    model_args: tuple[str, ...]  # --model for state dicts
    calib: str
    eval_args: tuple[str, ...]
    skip: tuple[str, ...]  # --skip regexes
    one_layer: str  # regex that matches exactly one Linear (per-layer rules)
    min_sqnr: float  # a --min-sqnr target that returns at least one layer (not all) to float


DIGITS_EVAL = ("--inputs", "in/digits_test.safetensors", "--labels", "in/digits_test_labels.safetensors")
MODELS = {
    m.key: m
    for m in (
        Model("mlp-pt", "in/digits_mlp.pt", (), "in/digits_calib.safetensors", DIGITS_EVAL,
              ("^4$",), "^2$", 56.0),
        Model("mlp-st", "in/digits_mlp.safetensors", ("--model", "sample_models.digits:build_digits_mlp"),
              "in/digits_calib.safetensors", DIGITS_EVAL, ("^4$",), "^2$", 56.0),
        Model("encoder", "in/encoder.safetensors", ("--model", "sample_models.encoder:build"),
              "in/digits_calib.safetensors", DIGITS_EVAL, (r"^blocks\.1\.", r"(^|\.)head$"),
              r"^blocks\.0\.fc1$", 53.0),
        Model("bert", "in/tiny-bert", (), "in/bert_calib_ids.safetensors",
              ("--inputs", "in/bert_eval_ids.safetensors"), ("pooler",),
              r"^encoder\.layer\.0\.intermediate\.dense$", 79.0),
    )
}


@dataclass
class Cmd:
    label: str  # "quantize", "inspect", "inspect model.safetensors", "eval"
    args: list[str]


@dataclass
class Case:
    name: str
    stem: str = ""  # "<model>.<variant>": the case's part of its file names
    source: str = ""
    quantize: Cmd | None = None
    output: str | None = None  # relative path of the qlin file or compressed-tensors folder
    report: str | None = None  # relative path of the --report JSON
    followups: list[Cmd] = field(default_factory=list)  # run only if the quantize succeeded
    commands: list[Cmd] = field(default_factory=list)  # standalone commands (no quantize)
    files: list[str] = field(default_factory=list)  # shipped files compared by bytes (no commands)


def rule_recipes(m: Model) -> dict[str, str]:
    """name -> TOML text of the per-layer-rule recipes written into the work dir for model m."""
    one = json.dumps(m.one_layer)  # a TOML basic string is a JSON string here
    return {
        f"{m.key}-rule-static.toml": (
            "# dynamic everywhere, one layer static (calibrated)\n"
            f'mode = "dynamic"\n\n[[layers]]\nmatch = {one}\nmode = "static"\nobserver = "minmax"\n'
        ),
        f"{m.key}-rule-smooth.toml": (
            "# SmoothQuant set only in a per-layer rule (no top-level smooth)\n"
            f'mode = "dynamic"\n\n[[layers]]\nmatch = {one}\nsmooth = 0.5\n'
        ),
    }


ALL = ("mlp-pt", "mlp-st", "encoder", "bert")
MLP_ENC = ("mlp-pt", "encoder")
CORE = ("mlp-pt", "encoder", "bert")


def variants(m: Model, quick: bool) -> list[tuple[str, list[str], str]]:
    """(name, extra quantize args, output format) for model m. The full flag set runs on the
    digits MLP (pickled module) and the encoder; the MLP's state-dict twin only checks its loading
    path; the BERT folder (whose quantize and eval also import transformers, +2 s each) gets the
    recipes (static calibration on dict inputs, rules on real module paths) and the flags that
    take another code path for a transformers model (fallback, rules, export)."""
    cal = ["--calib", m.calib]
    skips = [a for s in m.skip for a in ("--skip", s)]
    rs, rm = f"in/recipes/{m.key}-rule-static.toml", f"in/recipes/{m.key}-rule-smooth.toml"
    table: list[tuple[str, list[str], str, tuple[str, ...]]] = [("plain", [], "qlin", ALL)]
    for r in RECIPES:
        needs = cal if r in ("smoothquant", "w8a8-static") else []
        on = {"default": ("mlp-pt",), "w8a8-static": ALL}.get(r, CORE)  # default.toml = the defaults, spelled out
        table.append((f"recipe-{r}", ["--config", f"configs/{r}.toml", *needs], "qlin", on))
    table += [
        ("tensor-asym", ["--granularity", "tensor", "--asymmetric"], "qlin", MLP_ENC),
        ("mode-weight-only", ["--mode", "weight-only"], "qlin", MLP_ENC),
        ("static-percentile", ["--mode", "static", "--observer", "percentile", "--percentile", "99.9", *cal], "qlin", MLP_ENC),
        ("wobs-mse", ["--weight-observer", "mse"], "qlin", MLP_ENC),
        ("act-tensor", ["--act-granularity", "tensor"], "qlin", MLP_ENC),
        ("kernel-int_mm", ["--kernel", "int_mm"], "qlin", CORE),
        ("kernel-fbgemm-static", ["--kernel", "fbgemm", "--mode", "static", *cal], "qlin", ("mlp-pt",)),
        ("skip", skips, "qlin", CORE),
        ("smooth", ["--smooth", "0.5", *cal], "qlin", MLP_ENC),
        ("min-sqnr", ["--min-sqnr", f"{m.min_sqnr:g}", *cal], "qlin", CORE),
        ("calib-measure", [*cal, "--calib-samples", "100", "--batch-size", "16"], "qlin", ("mlp-pt",)),
        ("probe-inputs", ["--inputs", "in/digits_test.safetensors"], "qlin", ("encoder",)),  # the README's command
        ("rule-static", ["--config", rs, *cal], "qlin", MLP_ENC),
        ("rule-smooth", ["--config", rm, *cal], "qlin", CORE),
        ("ct-dynamic", [*CT], "ct", ALL),
        ("ct-static", [*CT, "--mode", "static", *cal], "ct", CORE),
        ("ct-weight-only-asym", [*CT, "--mode", "weight-only", "--asymmetric"], "ct", ("mlp-pt",)),
        ("ct-tensor-act-tensor", [*CT, "--granularity", "tensor", "--act-granularity", "tensor"], "ct", ("mlp-pt",)),
        ("ct-rule-static", [*CT, "--config", rs, *cal], "ct", ("mlp-pt", "bert")),
        ("ct-rule-smooth", [*CT, "--config", rm, *cal], "ct", CORE),
        # failures must fail the same way
        ("err-static-no-calib", ["--mode", "static"], "qlin", ("mlp-pt",)),
        ("err-ct-smooth", [*CT, "--smooth", "0.5", *cal], "ct", ("mlp-pt",)),
        ("err-min-sqnr-unreachable", ["--min-sqnr", "300", *cal], "qlin", ("mlp-pt",)),
        ("err-bad-percentile-recipe", ["--config", "in/recipes/bad.toml"], "qlin", ("mlp-pt",)),
    ]
    full = [(name, extra, fmt) for name, extra, fmt, on in table if m.key in on]
    if quick:
        keep = {
            "mlp-pt": {"plain", "recipe-w8a8-static", "min-sqnr", "ct-static", "err-static-no-calib"},
            "mlp-st": set(),
            "encoder": {"recipe-smoothquant"},
            "bert": {"plain"},
        }[m.key]
        full = [v for v in full if v[0] in keep]
    return full


def build_cases(quick: bool) -> list[Case]:
    cases: list[Case] = []
    cases.append(Case("shipped files: configs/*.toml, sample_models/*", files=[
        *(f"configs/{r}.toml" for r in RECIPES), *(f"sample_models/{f}" for f in SAMPLE_FILES),
        "sample_models/digits.py", "sample_models/encoder.py",
    ]))
    for m in MODELS.values():
        if not quick or m.key == "mlp-pt":
            cmds = [Cmd("inspect", ["inspect", m.source, "--json"])]
            if m.model_args:
                cmds.append(Cmd("inspect --model", ["inspect", m.source, *m.model_args, "--json"]))
            if m.key == "bert":
                cmds[0] = Cmd("inspect (folder)", ["inspect", m.source, "--json"])
                cmds.append(Cmd("inspect model.safetensors", ["inspect", f"{m.source}/model.safetensors", "--json"]))
            cases.append(Case(f"{m.key}/inspect-source", commands=cmds))
        for name, extra, fmt in variants(m, quick):
            stem = f"{m.key}.{name}"
            out = f"out/{stem}" + ("-ct" if fmt == "ct" else ".int8.safetensors")
            rep = f"rep/{stem}.json"
            q = Cmd("quantize", ["quantize", m.source, *m.model_args, *extra, "-o", out, "--report", rep, "--json"])
            case = Case(f"{m.key}/{name}", stem=stem, source=m.source, quantize=q, output=out, report=rep)
            if fmt == "ct":
                case.followups.append(Cmd("inspect model.safetensors", ["inspect", f"{out}/model.safetensors", "--json"]))
            else:
                case.followups.append(Cmd("inspect", ["inspect", out, "--json"]))
                case.followups.append(Cmd("eval", ["eval", m.source, out, *m.model_args, *m.eval_args,
                                                   "--repeats", "1", "--json"]))
            cases.append(case)
    return cases


# --------------------------------------------------------------------------------------------
# inputs


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_inputs(shared: Path, old_tree: Path) -> list[str]:
    """The inputs both trees get (under in/): the old tree's sample files, a tiny BERT folder
    and its token-id data (fixed seeds), and the per-layer-rule recipes. Returns notes."""
    shared.mkdir(parents=True)
    for f in SAMPLE_FILES:
        shutil.copy2(old_tree / "sample_models" / f, shared / f)
    recipes = shared / "recipes"
    recipes.mkdir()
    for m in MODELS.values():
        for name, text in rule_recipes(m).items():
            (recipes / name).write_text(text)
    (recipes / "bad.toml").write_text('mode = "static"\npercentile = 150.0\n')

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from safetensors.torch import save_file

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=32,
        )
        model = transformers.BertModel(config).eval()
    model.save_pretrained(shared / "tiny-bert", safe_serialization=True)
    for name, seed, n in (("bert_calib_ids.safetensors", 1, 32), ("bert_eval_ids.safetensors", 2, 24)):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, BERT_VOCAB, (n, BERT_TOKENS), generator=gen)
        mask = torch.ones_like(ids)
        mask[n // 2:, -4:] = 0  # some padded samples
        save_file({"input_ids": ids, "attention_mask": mask}, shared / name)
    digest = sha256_file(shared / "tiny-bert" / "model.safetensors")
    return [f"tiny BERT (transformers {transformers.__version__}, torch {torch.__version__}): "
            f"model.safetensors sha256 {digest[:16]}"]


def prepare_side(work: Path, side: str, tree: Path, shared: Path) -> Path:
    scratch = work / side
    scratch.mkdir()
    shutil.copytree(shared, scratch / "in")
    shutil.copytree(tree / "configs", scratch / "configs")
    (scratch / "out").mkdir()
    (scratch / "rep").mkdir()
    return scratch


# --------------------------------------------------------------------------------------------
# running


@dataclass
class Side:
    name: str  # "old" | "new"
    tree: Path
    scratch: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["CI"] = "true"
        return env

    def normalize(self, text: str) -> str:
        for path, mark in ((self.scratch, "<WORK>"), (self.tree, "<TREE>")):
            for p in {str(path), str(path.resolve())}:
                text = text.replace(p, mark)
        return text


@dataclass
class Result:
    code: int | str
    stdout: str
    stderr: str
    seconds: float


def run(side: Side, args: list[str]) -> Result:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=side.scratch, env=side.env(),
                           capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        code: int | str = p.returncode
        out, err = p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = "timeout", (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""), ""
    return Result(code, side.normalize(out), side.normalize(err), time.perf_counter() - t0)


@dataclass
class Observed:
    """What one side produced for one case."""

    results: dict[str, Result] = field(default_factory=dict)  # command label -> result
    output: dict[str, str] | None = None  # relative file name -> sha256 (None: no output)
    report_json: str | None = None
    report_md: str | None = None
    files: dict[str, str | None] = field(default_factory=dict)


def observe(side: Side, case: Case) -> Observed:
    obs = Observed()
    if case.files:
        for f in case.files:
            p = side.tree / f
            obs.files[f] = sha256_file(p) if p.is_file() else None
        return obs
    for cmd in case.commands:
        obs.results[cmd.label] = run(side, cmd.args)
    if case.quantize is None:
        return obs
    obs.results["quantize"] = q = run(side, case.quantize.args)
    out = side.scratch / case.output
    if out.is_file():
        obs.output = {".": sha256_file(out)}
    elif out.is_dir():
        obs.output = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    rep = side.scratch / case.report
    if rep.is_file():
        obs.report_json = side.normalize(rep.read_text())
    if rep.with_suffix(".md").is_file():
        obs.report_md = side.normalize(rep.with_suffix(".md").read_text())
    if q.code == 0:
        for cmd in case.followups:
            obs.results[cmd.label] = run(side, cmd.args)
    return obs


# --------------------------------------------------------------------------------------------
# comparing

IGNORED_PARTS = ("latency", "speedup")

# Key orders that are random per process in the OLD tree itself: `qlin inspect` builds its
# `metadata` object from safetensors' `safe_open(...).metadata()`, a dict made from a Rust
# HashMap whose iteration order changes from one process to the next (qlin writes the header's
# `__metadata__` sorted; the order is lost on reading). Compared as a set, counted, not warned.
RANDOM_ORDER = {"inspect": {"$.metadata"}}
random_order_seen: dict[str, list[int]] = {}  # "label path" -> [runs, runs whose order differed]


def ignored_key(key: str) -> bool:
    """Keys whose values legitimately differ between runs: timings."""
    low = key.lower()
    return any(p in low for p in IGNORED_PARTS) or "ms" in low.replace("-", "_").split("_")


def _same_scalar(a: Any, b: Any) -> bool:
    if type(a) is not type(b):  # 1 vs 1.0 vs True are different JSON to a reader
        return False
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def diff_json(a: Any, b: Any, path: str, diffs: list[str], orders: list[str],
              random_order: tuple[str, set[str]] = ("", set())) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        ka, kb = list(a), list(b)
        if set(ka) != set(kb):
            only_a, only_b = [k for k in ka if k not in b], [k for k in kb if k not in a]
            diffs.append(f"{path}: keys only in old {only_a}, only in new {only_b}")
        elif path in random_order[1]:
            seen = random_order_seen.setdefault(f"{random_order[0]} {path}", [0, 0])
            seen[0] += 1
            seen[1] += ka != kb
        elif ka != kb:
            orders.append(f"{path}: key order {ka} vs {kb}")
        for k in ka:
            if k in b and not ignored_key(k):
                diff_json(a[k], b[k], f"{path}.{k}", diffs, orders, random_order)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            diff_json(x, y, f"{path}[{i}]", diffs, orders, random_order)
    elif not _same_scalar(a, b):
        diffs.append(f"{path}: {_short(a)} vs {_short(b)}")


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def compare_text_json(what: str, a: str | None, b: str | None, diffs: list[str], warns: list[str]) -> None:
    """Compare two texts that should hold one JSON value each (or are both empty/absent)."""
    if a is None or b is None:
        if (a is None) != (b is None):
            diffs.append(f"{what}: {'absent' if a is None else 'present'} in old, {'absent' if b is None else 'present'} in new")
        return
    if not a.strip() and not b.strip():
        return
    try:
        ja, jb = json.loads(a), json.loads(b)
    except ValueError:
        if a != b:
            diffs.append(f"{what}: not JSON and the texts differ ({_short(a.strip()[:60])} vs {_short(b.strip()[:60])})")
        return
    d: list[str] = []
    o: list[str] = []
    cmd = what.split()[0]
    diff_json(ja, jb, "$", d, o, (cmd, RANDOM_ORDER.get(cmd, set())))
    if d:
        diffs.append(f"{what}: {len(d)} value difference(s): " + "; ".join(d[:4]) + (" ..." if len(d) > 4 else ""))
    if o:
        warns.append(f"{what}: key order differs: " + "; ".join(o[:3]) + (" ..." if len(o) > 3 else ""))


def first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def compare_result(label: str, a: Result | None, b: Result | None, diffs: list[str], warns: list[str]) -> None:
    if a is None or b is None:
        if (a is None) != (b is None):
            diffs.append(f"{label}: ran in {'new' if a is None else 'old'} only")
        return
    if a.code != b.code:
        diffs.append(f"{label}: exit {a.code} vs {b.code} ({_short(first_line(a.stderr), 70)} | {_short(first_line(b.stderr), 70)})")
        return
    if a.code != 0:
        if first_line(a.stderr) != first_line(b.stderr):
            diffs.append(f"{label}: stderr {_short(first_line(a.stderr), 90)} vs {_short(first_line(b.stderr), 90)}")
        elif a.stderr != b.stderr:
            warns.append(f"{label}: stderr differs after its first line")
    elif a.stderr != b.stderr:
        warns.append(f"{label}: stderr differs ({_short(first_line(a.stderr), 60)} vs {_short(first_line(b.stderr), 60)})")
    compare_text_json(f"{label} stdout", a.stdout, b.stdout, diffs, warns)


def compare(case: Case, a: Observed, b: Observed) -> tuple[list[str], list[str], str]:
    """(differences, warnings, a note on how it went) for one case."""
    diffs: list[str] = []
    warns: list[str] = []
    if case.files:
        for f in case.files:
            if a.files[f] != b.files[f]:
                diffs.append(f"{f}: " + ("missing in one tree" if None in (a.files[f], b.files[f]) else "bytes differ"))
        return diffs, warns, ""
    labels = list(dict.fromkeys([*a.results, *b.results]))
    for label in labels:
        compare_result(label, a.results.get(label), b.results.get(label), diffs, warns)
    note = ""
    if case.quantize is not None:
        qa, qb = a.results["quantize"], b.results["quantize"]
        if qa.code != 0 and qb.code != 0 and qa.code == qb.code and first_line(qa.stderr) == first_line(qb.stderr):
            note = f"both failed the same way: exit {qa.code}, {_short(first_line(qa.stderr), 100)}"
        if a.output != b.output:
            if a.output is None or b.output is None:
                diffs.append(f"output: {'absent' if a.output is None else 'written'} in old, {'absent' if b.output is None else 'written'} in new")
            else:
                names = sorted(set(a.output) | set(b.output))
                bad = [n for n in names if a.output.get(n) != b.output.get(n)]
                diffs.append("output bytes differ: " + ", ".join(bad))
        compare_text_json("report .json", a.report_json, b.report_json, diffs, warns)
        if case.name.endswith("/min-sqnr") and a.report_json:  # the case must exercise the fallback
            steps = (json.loads(a.report_json).get("fallback") or {}).get("steps")
            if not steps:
                warns.append("setup: the --min-sqnr target returned no layer to float in the old tree; pick a higher one")
        if a.report_md != b.report_md:
            if a.report_md is None or b.report_md is None:
                diffs.append(f"report .md: {'absent' if a.report_md is None else 'written'} in old, {'absent' if b.report_md is None else 'written'} in new")
            else:
                generic = lambda t: t.replace(case.stem, "<case>").replace(case.source, "<source>")  # noqa: E731
                la, lb = generic(a.report_md).splitlines(), generic(b.report_md).splitlines()
                i = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
                warns.append(f"report .md differs (allowed), first at line {i + 1}: "
                             f"{_short(la[i] if i < len(la) else '<end>', 60)} vs {_short(lb[i] if i < len(lb) else '<end>', 60)}")
    return diffs, warns, note


# --------------------------------------------------------------------------------------------
# main


def check_import(side: Side) -> str:
    p = subprocess.run([sys.executable, "-c", "import qlin_cli; print(qlin_cli.__file__)"], cwd=side.scratch,
                       env=side.env(), capture_output=True, text=True, timeout=120)
    where = p.stdout.strip()
    if p.returncode != 0:
        raise SystemExit(f"setup error: {side.name} tree {side.tree}: `import qlin_cli` failed: {first_line(p.stderr[-500:])}")
    if not Path(where).resolve().is_relative_to((side.tree / "qlin_cli").resolve()):
        raise SystemExit(f"setup error: {side.name} tree {side.tree}: qlin_cli imports from {where}, not from the tree")
    return where


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, default=DEFAULT_OLD, help="the reference code tree [%(default)s]")
    ap.add_argument("--new", type=Path, default=REPO, help="the code tree under test [%(default)s]")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (emptied first) [a new temp folder]")
    ap.add_argument("--quick", action="store_true", help="a subset of the cases (about a minute)")
    ap.add_argument("--jobs", type=int, default=2, help="commands run at once [%(default)s: a case's old and new]")
    ap.add_argument("--keep", action="store_true", help="keep the temp work folder even when everything is the same")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("--verbose", action="store_true", help="print each case's warnings under it (else grouped at the end)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    old_tree, new_tree = args.old.resolve(), args.new.resolve()
    for t in (old_tree, new_tree):
        if not (t / "qlin_cli" / "cli.py").is_file():
            print(f"setup error: {t} has no qlin_cli/cli.py", file=sys.stderr)
            return 2
    if args.work is None:
        work = Path(tempfile.mkdtemp(prefix="qlin-identity-"))
        temp = True
    else:
        work = args.work.resolve()
        temp = False
        for sub in ("old", "new", "inputs"):
            shutil.rmtree(work / sub, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)

    shared = work / "inputs"
    notes = build_inputs(shared, old_tree)
    sides = [Side("old", old_tree, prepare_side(work, "old", old_tree, shared)),
             Side("new", new_tree, prepare_side(work, "new", new_tree, shared))]
    for s in sides:
        print(f"{s.name}: {s.tree} (qlin_cli from {check_import(s)}; scratch {s.scratch})")
    for n in notes:
        print(n)
    print(f"python {sys.executable}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '<unset>')}, jobs {args.jobs}")

    cases = build_cases(args.quick)
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    print(f"{len(cases)} cases{' (--quick)' if args.quick else ''}", flush=True)

    n_same = n_differ = 0
    warned: dict[str, list[str]] = {}  # warning -> cases
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [(c, pool.submit(observe, sides[0], c), pool.submit(observe, sides[1], c)) for c in cases]
        width = max(len(c.name) for c in cases)
        for case, fa, fb in futures:
            a, b = fa.result(), fb.result()
            diffs, warns, note = compare(case, a, b)
            secs = sum(r.seconds for r in a.results.values())
            tail = f"  [{note}]" if note else ""
            tail += f"  ({len(warns)} warning{'s' * (len(warns) != 1)})" if warns else ""
            if diffs:
                n_differ += 1
                print(f"{case.name:<{width}}  DIFFERS: " + " | ".join(diffs) + tail, flush=True)
            else:
                n_same += 1
                print(f"{case.name:<{width}}  same  ({secs:.1f} s){tail}", flush=True)
            for w in warns:
                warned.setdefault(w, []).append(case.name)
                if args.verbose:
                    print(f"{'':<{width}}    warning: {w}", flush=True)

    for where, (runs, moved) in random_order_seen.items():
        print(f"known nondeterminism (old tree too): key order of `{where}` (safetensors metadata() is a hash map): "
              f"differed between old and new in {moved} of {runs} comparisons; compared as a set, not as an order")
    if warned:
        print(f"warnings (allowed changes, not failures; {len(warned)} distinct):")
        for w, names in warned.items():
            where = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            print(f"  {_short(w, 400) if not args.verbose else w}\n      in {len(names)} case(s): {where}")
    n_warn = sum(len(v) for v in warned.values())
    total = n_same + n_differ
    print(f"{total} cases: {n_same} same, {n_differ} differ"
          + (f" ({n_warn} warnings)" if n_warn else "") + f"; {time.perf_counter() - t_start:.0f} s wall, {_child_cpu():.0f} s CPU in qlin commands")
    if temp and not args.keep and n_differ == 0:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder kept: {work}")
    return 1 if n_differ else 0


if __name__ == "__main__":
    sys.exit(main())
