"""Hostile input, round 3 (issue 26 items 5-10): files whose sizes and strings lie, through
the real CLI. A plan that claims a 77000 x 77000 layer with no tensor for it, a config.json
that declares a 40 GB model beside 16 kB of weights, an LM's logits on many token ids, a text
of megabytes, a metadata string of megabytes, a signal while the main thread is inside a long
call, and a Hugging Face batch that holds `labels`. Each ends in one line (or a short
answer), in memory that the input's real size bounds; where memory is the point, the peak
resident memory of the qlin process is checked (test_hostile_input.run_measured: its address
space is capped, so a regression fails on its message instead of taking the machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_one_error_line, cli, cli_json, qlin_env
from test_hostile_input import DIGITS_PT, DIGITS_TEST, SAMPLES, baseline_mb, run_measured  # noqa: F401  (a fixture)

DOCS_LM = SAMPLES / "docs_lm"

pytestmark = pytest.mark.usefixtures("isolate_imports")


# ----------------------------------------------------------------------------- 5: plans that claim sizes

CONFIG = {"act_granularity": "token", "bits": 8, "embeddings": False, "granularity": "channel", "group_size": None,
          "kernel": "auto", "layers": [], "mode": "dynamic", "observer": "minmax", "percentile": 99.99, "skip": [],
          "smooth": None, "symmetric": True, "weight_observer": "minmax"}


def claiming_folder(folder: Path, n: int, tensors: dict[str, torch.Tensor] | None = None, bits: int = 8) -> Path:
    """A compressed-tensors-looking folder of under 1 kB whose qlin plan claims one n x n
    weight-only layer 'x' in groups of 1 (scales and zero points of n x n), with `tensors`."""
    folder.mkdir()
    entry = {"act_granularity": None, "aliases": [], "bits": bits, "dtype": "float32", "granularity": "group",
             "group_size": 1, "has_bias": False, "in_features": n, "kernel_request": "auto", "mode": "weight-only",
             "module": "Linear", "name": "x", "observer": None, "out_features": n, "reason": "", "smooth": None,
             "status": "quantized", "symmetric": True, "weight_observer": "minmax"}
    save_file(tensors or {"y": torch.zeros(1)}, folder / "model.safetensors", metadata={
        "format": "pt", "qlin_format_version": "2", "qlin_config": json.dumps(CONFIG), "qlin_plan": json.dumps([entry]),
        "qlin_ties": "{}"})
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    return folder


PLANS = [
    ("77000 x 77000, no tensor", lambda f: claiming_folder(f, 77000), ["inspect"], "layer 'x' has no tensor x.weight_packed"),
    ("200k x 200k, no tensor", lambda f: claiming_folder(f, 200_000), ["inspect"], "layer 'x' has no tensor x.weight_packed"),
    ("77000 x 77000, no tensor", lambda f: claiming_folder(f, 77000), ["eval", DIGITS_PT, "F", "--inputs", DIGITS_TEST],
     "layer 'x' has no tensor x.weight_packed"),
    ("77000 x 77000, a 1 x 1 weight", lambda f: claiming_folder(f, 77000, {"x.weight_packed": torch.zeros(1, 1, dtype=torch.int32)}),
     ["inspect"], "x.weight_packed is torch.int32 (1, 1), the plan says torch.int32 (77000, 19250)"),
]


@pytest.mark.parametrize("name, build, args, phrase", PLANS, ids=[f"{p[0]}-{p[2][0]}" for p in PLANS])
def test_a_plan_is_checked_against_the_tensors_before_anything_is_allocated(name, build, args, phrase, tmp_path,
                                                                            baseline_mb):
    """Was: 6.0 GB for 30 s before "has no tensor" (from_export made the zero points the plan
    claims), and an internal error allocating 40 GB for 200k x 200k."""
    folder = build(tmp_path / "ct")
    assert sum(f.stat().st_size for f in folder.iterdir()) < 2000
    args = [folder if a == "F" else a for a in args] + ([folder] if args == ["inspect"] else [])
    code, out, err, peak = run_measured(*args, cwd=tmp_path)
    assert code == 1 and out == "", err
    assert phrase in assert_one_error_line(err)
    assert peak < baseline_mb + 64, f"peak {peak:.0f} MB, baseline {baseline_mb:.0f} MB"


def test_unpacking_a_plans_low_bit_weights_is_budgeted(tmp_path, capsys):
    """A 2-bit layer unpacks to 4 times its bytes in the file: `max_memory` counts what reading
    makes, not only what the file holds."""
    q = tmp_path / "q2.safetensors"
    code, _, err = cli(capsys, "quantize", DIGITS_PT, "-o", q, "--bits", "2", "--kernel", "fbgemm")
    assert code == 0, err
    code, _, err = cli(capsys, "inspect", q, "--max-memory", "100kB")  # the file holds ~40 kB of tensors
    assert code == 1
    assert "more than --max-memory 100.0 kB" in assert_one_error_line(err)
    code, _, err = cli(capsys, "inspect", q, "--max-memory", "1MB")
    assert code == 0, err


# ----------------------------------------------------------------------------- 6: config.json that declares a model

def llama_folder(folder: Path, hidden: int, inter: int, layers: int, tensors: dict[str, torch.Tensor]) -> Path:
    """A 0.3 kB config.json declaring a LlamaForCausalLM of 32000 tokens, beside `tensors`."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
        "max_position_embeddings": 2048, "torch_dtype": "float32", "tie_word_embeddings": False}))
    save_file(tensors, folder / "model.safetensors")
    return folder


DECLARED = [
    # 4.4 GB of float32 parameters (TinyLlama's shape) beside 16 kB: was 4.7 GB and 45 s
    ("4.4 GB beside 16 kB", lambda f: llama_folder(f, 2048, 5632, 22, {"x": torch.zeros(64, 64)}), [],
     "the weights do not fit LlamaForCausalLM: tensors 201 missing (e.g. 'model.embed_tokens.weight'): its config.json "
     "declares 1,100,048,384 parameters, the weight files hold 4,096 values"),
    ("4.4 GB, a mis-shaped embedding", lambda f: llama_folder(f, 2048, 5632, 22, {"model.embed_tokens.weight": torch.zeros(64, 64)}),
     [], "tensors 1 mis-shaped (e.g. 'model.embed_tokens.weight' is (64, 64) in the weights, (32000, 2048) in config.json)"),
    # 8.9 GB (a 40 GB one was OOM-killed at 21 GB, --max-memory or not)
    ("8.9 GB, --max-memory 1GB", lambda f: llama_folder(f, 8192, 28672, 2, {"x": torch.zeros(64, 64)}),
     ["--max-memory", "1GB"], "the LlamaForCausalLM it declares holds 8.9 GB of tensors, more than --max-memory 1.0 GB"),
]


@pytest.mark.parametrize("command", ["quantize", "inspect"])
@pytest.mark.parametrize("name, build, more, phrase", DECLARED, ids=[d[0] for d in DECLARED])
def test_a_declared_model_is_checked_on_the_meta_device_before_it_is_made(name, build, more, phrase, command, tmp_path):
    pytest.importorskip("transformers")
    folder = build(tmp_path / "llama")
    args = ["quantize", folder, "-o", tmp_path / "q.safetensors"] if command == "quantize" else ["inspect", folder]
    code, out, err, peak = run_measured(*args, *more, cwd=tmp_path, timeout=180)
    assert code == 1 and out == "", err
    assert phrase in assert_one_error_line(err)
    assert peak < 800, f"peak {peak:.0f} MB"  # starting qlin with transformers: ~360 MB
    assert not (tmp_path / "q.safetensors").exists()


@pytest.mark.parametrize("command", ["inspect", "quantize"])
def test_a_huge_config_json_is_refused_unread(command, tmp_path, baseline_mb):
    """A sparse 2 GB config.json: qlin and transformers read config.json whole."""
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"x": torch.zeros(2)}, folder / "model.safetensors")
    with (folder / "config.json").open("wb") as f:
        f.write(b'{"model_type": "llama", "x": "')
        f.truncate(2 * 10**9)
    args = ["inspect", folder] if command == "inspect" else ["quantize", folder, "-o", tmp_path / "q.safetensors"]
    code, out, err, peak = run_measured(*args, cwd=tmp_path)
    assert code == 1 and out == ""
    assert "config.json is 2.0 GB; a model's config.json is a few kB, qlin reads at most 16.8 MB" in assert_one_error_line(err)
    assert peak < baseline_mb + 64


# ----------------------------------------------------------------------------- 7: eval of a language model

@pytest.fixture
def docs_lm_q(docs_lm_int8) -> Path:
    return docs_lm_int8[0]


def test_eval_of_a_language_model_keeps_no_logits(docs_lm_q, tmp_path):
    """48 sequences of 256 ids: both models' logits are 48 x 256 x 2048 float32 (200 MB), and
    comparing them whole in float64 took 3 times more (256 sequences: 6.9 GB). In batches of 4
    they are compared and dropped."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2048, (48, 256), generator=gen)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "ids.safetensors")
    code, out, err, peak = run_measured("eval", DOCS_LM, docs_lm_q, "--inputs", tmp_path / "ids.safetensors",
                                        "--batch-size", "4", "--repeats", "1", "--json", cwd=tmp_path, timeout=300)
    assert code == 0, err
    report = json.loads(out)
    assert report["output_shape"] == [48, 256, 2048] and report["compared"] == "output['logits']"
    assert 20 < report["sqnr_db"] < 80 and report["cosine"] > 0.99
    assert peak < 600, f"peak {peak:.0f} MB"  # ~450 MB: qlin, transformers, two 5 MB models, one batch


def test_eval_numbers_do_not_depend_on_the_batch_size(digits_q, capsys):
    """The metrics gathered batch by batch are those of the whole outputs (to float rounding);
    tests/test_report.py checks them against the whole-output formulas. The float model's rows
    change in their last bits with the batch size (F.linear: up to 3.8e-6 here), and an error
    metric of a ~30 dB difference magnifies that ~30x (mse: 1.0e-6 relative between these two
    runs), so the bound is 1e-4: a batch miscounted or averaged twice is off by far more."""
    runs = [cli_json(capsys, "eval", DIGITS_PT, digits_q, "--inputs", DIGITS_TEST, "--batch-size", b, "--repeats", "1")
            for b in ("7", "1000")]
    for key in ("sqnr_db", "cosine", "max_abs_err", "mse", "top1_agreement"):
        assert runs[0][key] == pytest.approx(runs[1][key], rel=1e-4), key


# ----------------------------------------------------------------------------- 8: text of megabytes

def test_a_text_is_budgeted_before_it_is_read(docs_lm_q, tmp_path, baseline_mb):
    """13 bytes a byte of text (the bytes, the string, the token ids): a 2 MB text under
    --max-memory 10MB is refused unread (a 50 MB one aborted in the tokenizer at 6.5 GB)."""
    text = tmp_path / "big.txt"
    text.write_text((SAMPLES / "docs_calib.txt").read_text() * 100)
    code, out, err, peak = run_measured("eval", DOCS_LM, docs_lm_q, "--text", text, "--max-memory", "10MB", cwd=tmp_path)
    assert code == 1 and out == ""
    assert f"text {text} (read and tokenized) holds 25.9 MB of tensors, more than --max-memory 10.0 MB" in assert_one_error_line(err)


def test_a_long_text_is_tokenized_in_chunks_as_in_one_call(monkeypatch):
    """Chunks end between words (on a line break where there is one), so the byte-level BPE of
    the sample LM gives the same ids as one call, for a text of many lines and for one line."""
    pytest.importorskip("transformers")
    from qlin_cli import text as qtext
    from qlin_cli.hf import encode, load_tokenizer

    tokenizer = load_tokenizer(DOCS_LM)
    content = (SAMPLES / "docs_calib.txt").read_text()
    monkeypatch.setattr(qtext, "CHUNK", 3000)
    seen = []
    for body in (content, content.replace("\n", " ")):
        ids = qtext._encode_text(tokenizer, body, lambda done, total, what: seen.append((done, total)))
        assert ids.tolist() == encode(tokenizer, body)
    assert seen[-1] == (len(content), len(content)) and len(seen) > 12  # progress, chunk by chunk
    line = content.replace("\n", " ")  # an encoder's line: tokenized only as far as its window needs
    assert qtext._encode_line(tokenizer, line, 16)[:16] == encode(tokenizer, line)[:16]
    assert len(qtext._encode_line(tokenizer, line, 16)) < 300


def test_calibration_text_of_one_long_line_is_tokenized_in_chunks(tmp_path, baseline_mb):
    """A 1.2 MB text on one line (more than one chunk: a 20 MB line took 3.4 GB)."""
    pytest.importorskip("transformers")
    text = tmp_path / "line.txt"
    line = (SAMPLES / "docs_calib.txt").read_text().replace("\n", " ")
    text.write_text((line * (1_200_000 // len(line) + 1))[:1_200_000])
    code, out, err, peak = run_measured("quantize", DOCS_LM, "-o", tmp_path / "q.safetensors", "--calib-text", text,
                                        "--calib-samples", "2", "--json", cwd=tmp_path, timeout=300)
    assert code == 0, err
    assert "windows of 256 tokens" in json.loads(out)["calibration"]["text"]
    assert peak < 900, f"peak {peak:.0f} MB"


# ----------------------------------------------------------------------------- 9: long strings, signals

@pytest.fixture
def long_strings(tmp_path, capsys) -> Path:
    """The digits MLP quantized but its layer '2', with a 5 MB source_name and a 2 MB reason why
    layer '2' is kept float."""
    q = tmp_path / "q.safetensors"
    code, _, err = cli(capsys, "quantize", DIGITS_PT, "-o", q, "--kernel", "fbgemm", "--skip", "^2$")
    assert code == 0, err
    with safe_open(q, "pt") as f:
        meta = dict(f.metadata())
    plan = json.loads(meta["plan"])
    assert plan[1]["name"] == "2" and plan[1]["status"] == "skipped"
    plan[1]["reason"] = "r" * 2_000_000
    path = tmp_path / "long.safetensors"
    save_file(load_file(q), path, metadata={**meta, "source_name": "x" * 5_000_000, "plan": json.dumps(plan)})
    q.unlink()
    return path


def test_long_strings_are_cut_for_a_person_and_kept_in_json(long_strings, tmp_path, baseline_mb):
    """A 50 MB source_name took inspect 179 s and more and printed 93 MB."""
    code, out, err, peak = run_measured("inspect", long_strings, cwd=tmp_path)
    assert code == 0 and err == "", err
    assert len(out) < 20_000 and peak < baseline_mb + 200, f"peak {peak:.0f} MB"
    flat = out.replace("\n", "")  # rich wraps lines at 200 characters, and a table's cells in their column
    assert "source_name: " + "x" * 300 + "... (5,000,000 characters; --json shows all)" in flat
    assert "(2,000,007" in out and out.count("r" * 60) <= 6  # 'float: ' and the reason, cut to 300
    code, out, err, _ = run_measured("inspect", long_strings, "--json", cwd=tmp_path)
    report = json.loads(out)
    assert report["metadata"]["source_name"] == "x" * 5_000_000 and report["layers"][1]["reason"] == "r" * 2_000_000


STUCK = """
import signal, sys, time
from pathlib import Path
import qlin_cli.cli, qlin_cli.files as files
def stuck(*args, **kwargs):
    Path(files.temporary_name(Path("out.safetensors")) + ".tmp").write_bytes(b"partial")
    # the main thread no longer sees SIGTERM, as inside a call that does not return for minutes;
    # its Python handler does nothing either, for the signal may trip it (from another thread)
    # between READY and the sleep, which a main thread stuck in C would never run
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGTERM, lambda *args: None)
    sys.stderr.write("READY\\n"); sys.stderr.flush()
    time.sleep(600)
qlin_cli.cli.inspect_path = stuck
sys.argv = ["qlin", "inspect", "x.safetensors"]
from qlin_cli.entry import main
main()
"""


def test_sigterm_ends_a_command_stuck_in_a_long_call(tmp_path):
    """The watchdog (entry.py) ends the process GRACE seconds after SIGTERM when the main thread
    cannot: the temporary removed, one line, exit 143 (a 50 MB source_name: still running 12
    minutes after `timeout 60` sent SIGTERM)."""
    proc = subprocess.Popen([sys.executable, "-c", STUCK], cwd=tmp_path, env=qlin_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline() == "READY\n"
        assert len(list(tmp_path.glob(".out.safetensors.*.tmp"))) == 1
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)  # the stuck call sleeps 600 s
    finally:
        proc.kill()
    assert code == 143
    assert proc.stderr.read().strip() == "interrupted (SIGTERM)"
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- 10: labels in a batch

@pytest.mark.parametrize("command", ["eval", "quantize"])
def test_a_batch_with_labels_compares_the_logits(command, docs_lm_q, tmp_path):
    """With `labels` a transformers model puts its loss first and logs a line about its loss
    type: was an internal error (eval) or an IndexError (quantize), plus that line."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2048, (8, 32), generator=gen)
    batch = tmp_path / "batch.safetensors"
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, batch)
    if command == "eval":
        args = ["eval", DOCS_LM, docs_lm_q, "--inputs", batch, "--repeats", "1", "--json"]
    else:
        args = ["quantize", DOCS_LM, "-o", tmp_path / "q.safetensors", "--inputs", batch, "--kernel", "fbgemm", "--json"]
    code, out, err, _ = run_measured(*args, cwd=tmp_path, timeout=300)
    assert code == 0, err
    assert "transformers" not in err and "loss" not in err, err
    report = json.loads(out)
    compared = report["compared"] if command == "eval" else report["probe"]["compared"]
    assert compared == "output['logits']"

