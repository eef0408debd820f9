"""Text in: `qlin eval DIR Q --text FILE` and `qlin quantize DIR --calib-text
FILE`, tokenized with the folder's own tokenizer.

References by hand: the windows and the targets each scores; a GPT-2 whose blocks are all zero,
so that its logits are the Gram matrix of its token embedding (a bigram model whose perplexity
is a sum of logs written out here); pooled embeddings, cosines and nearest neighbours of small
fake encoders. Independent of qlin: transformers' own loss on a text of exactly one window.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import SAMPLES, cli, cli_json

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402  (comes with transformers)

from qlin_cli.text import TextInputs, embedding_scores, first_scored, window_starts  # noqa: E402

transformers.utils.logging.set_verbosity_error()


def word_tokenizer(words: list[str], **special: str):
    """A whitespace word-level tokenizer: word i has id i (the first word stands for unknowns)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0], **special)


# Token embeddings of the bigram GPT-2: rows of mean 0 and variance 1, so LayerNorm (eps 1e-5)
# leaves each row / sqrt(1 + 1e-5) and the logits are GRAM[i] / sqrt(1 + 1e-5).
ROWS = [[1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1], [-1, 1, -1, 1]]
GRAM = [[4, 0, 0, -4], [0, 4, 0, 0], [0, 0, 4, 0], [-4, 0, 0, 4]]  # ROWS @ ROWS.T, by hand
WORDS = ["a", "b", "c", "d"]


def bigram_gpt2():
    cfg = transformers.GPT2Config(vocab_size=4, n_positions=8, n_embd=4, n_layer=1, n_head=1, layer_norm_epsilon=1e-5)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "transformer.ln_f.weight":
                p.fill_(1.0)
            else:
                p.zero_()  # attention and MLP add nothing: the hidden state is the token's embedding
        model.transformer.wte.weight.copy_(torch.tensor(ROWS, dtype=torch.float32))  # the head is tied to it
    return model


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text") / "bigram"
    bigram_gpt2().save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm_q(lm_dir):
    out = lm_dir.parent / "bigram.int8.safetensors"
    from qlin_cli import QuantConfig
    from qlin_cli.api import QuantizeOptions, quantize_checkpoint

    # a kernel named: `auto` keeps layers this small float, and the test wants int8 kernels at work
    quantize_checkpoint(lm_dir, QuantConfig(kernel="fbgemm"), QuantizeOptions(output=out))
    return out


def _text(tmp_path, content: str, name: str = "t.txt"):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- windows


def test_windows_and_the_targets_each_scores_by_hand():
    # 10 tokens, windows of 4 every 2: [0,4) [2,6) [4,8) [6,10); scored 1-3, 4-5, 6-7, 8-9
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert first_scored([0, 2, 4, 6], 4) == [1, 2, 2, 2]
    # 7 tokens: the last window ends at the text's end, overlapping more: [3,7) scores only token 6
    assert window_starts(7, 4, 2) == [0, 2, 3]
    assert first_scored([0, 2, 3], 4) == [1, 2, 3]
    # stride == max_length: [0,4) [4,8) [5,9); token 4 starts a window and has no context there
    assert window_starts(9, 4, 4) == [0, 4, 5]
    assert first_scored([0, 4, 5], 4) == [1, 1, 3]
    assert window_starts(4, 4, 1) == [0] and first_scored([0], 4) == [1]  # exactly one window


# ----------------------------------------------------------------------------- causal LM


def test_perplexity_of_a_bigram_gpt2_against_the_hand_computed_sum(lm_dir, lm_q, tmp_path, capsys):
    text = _text(tmp_path, "a b b c d a c b\n")  # ids 0 1 1 2 3 0 2 1
    ev = cli_json(capsys, "eval", lm_dir, lm_q, "--text", text, "--max-length", "4", "--stride", "2")
    # windows [0,4) [2,6) [4,8): 3 + 2 + 2 targets, each token after the first once
    assert (ev["model_kind"], ev["tokens"], ev["windows"], ev["scored_tokens"]) == ("causal-lm", 8, 3, 7)
    c = 1 / math.sqrt(1 + 1e-5)
    ids = [0, 1, 1, 2, 3, 0, 2, 1]
    nll = [math.log(sum(math.exp(g * c) for g in GRAM[i])) - GRAM[i][j] * c for i, j in zip(ids, ids[1:])]
    expected = math.exp(sum(nll) / 7)  # = 57.174...
    assert ev["perplexity_float"] == pytest.approx(expected, rel=1e-6)
    # the blocks are all zero (their int8 weights too) and the head is tied, so float: int8 is exact
    assert ev["perplexity_int8"] == pytest.approx(expected, rel=1e-6)
    assert ev["perplexity_ratio"] == pytest.approx(1.0, abs=1e-6) and ev["next_token_agreement"] == 1.0
    assert ev["source_matches"] is True and ev["kernels"]


def test_tokens_are_the_folders_own(lm_dir):
    from qlin_cli.hf import load_tokenizer
    from qlin_cli.sources import load_source
    from qlin_cli.text import text_inputs

    model = load_source(lm_dir).model
    t = text_inputs(model, load_tokenizer(lm_dir), "a b b c d a c b", "t.txt", max_length=4, stride=2)
    assert t.inputs["input_ids"].tolist() == [[0, 1, 1, 2], [1, 2, 3, 0], [3, 0, 2, 1]]
    assert t.inputs["attention_mask"].eq(1).all() and t.first == (1, 2, 2)
    default = text_inputs(model, load_tokenizer(lm_dir), "a b b c d a c b d", "t.txt")
    assert (default.max_length, default.stride) == (8, 4)  # the model's 8 positions, half of it


def test_one_window_is_transformers_own_loss(tmp_path, capsys):
    """A random GPT-2 on a text of exactly max_length tokens: the perplexity is exp of the
    mean cross-entropy transformers computes for labels=input_ids."""
    torch.manual_seed(0)
    words = [f"w{i}" for i in range(20)]
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=32,
                                                                  n_layer=1, n_head=2)).eval()
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    word_tokenizer(words).save_pretrained(folder)
    ids = torch.randint(0, 20, (12,), generator=torch.Generator().manual_seed(3))
    text = _text(tmp_path, " ".join(words[i] for i in ids.tolist()))
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    q = tmp_path / "q.safetensors"
    cli_json(capsys, "quantize", folder, "-o", q)
    ev = cli_json(capsys, "eval", folder, q, "--text", text, "--max-length", "12")
    assert (ev["windows"], ev["scored_tokens"]) == (1, 11)
    assert ev["perplexity_float"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert ev["perplexity_int8"] == pytest.approx(ev["perplexity_float"], rel=0.05)
    assert ev["perplexity_ratio"] == pytest.approx(ev["perplexity_int8"] / ev["perplexity_float"])


def test_calibration_text_gives_the_windows_of_static_mode(lm_dir, tmp_path, capsys):
    text = _text(tmp_path, "a b c d " * 5)  # 20 tokens: windows of 8 every 4 start at 0 4 8 12
    report = cli_json(capsys, "quantize", lm_dir, "-o", tmp_path / "s.safetensors", "--mode", "static",
                      "--calib-text", text, "--max-length", "8", "--stride", "4")
    assert report["calibration"]["samples"] == 4 and report["calibration"]["file"] == str(text)
    assert "windows of 8 tokens, stride 4" in report["calibration"]["text"]
    assert all(r["input_scale"] is not None for r in report["layers"] if r["status"] == "quantized")
    few = cli_json(capsys, "quantize", lm_dir, "-o", tmp_path / "s2.safetensors", "--mode", "static",
                   "--calib-text", text, "--max-length", "8", "--calib-samples", "2")
    assert few["calibration"]["samples"] == 2


# ----------------------------------------------------------------------------- encoders


class FakeEncoder(nn.Module):
    """Hidden state of a token = a row of `table`; no config (so none is changed)."""

    main_input_name = "input_ids"

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(last_hidden_state=self.table[input_ids])  # (B, L, 2)


@pytest.mark.parametrize("rows", [1024, 2])  # nearest neighbours in blocks of rows (NEAREST_ROWS)
def test_embedding_cosine_and_neighbours_by_hand(rows, monkeypatch):
    monkeypatch.setattr("qlin_cli.text.NEAREST_ROWS", rows)
    # token 0 pads (a huge row: any pooling over padding would show); lines [1], [3], [2, 4]
    float_rows = [[1e6, 1e6], [1, 0], [0, 1], [1, 1], [-1, 0]]
    int8_rows = [[1e6, 1e6], [1, 0], [0, 1], [1, 1], [1, -1.2]]
    ids = torch.tensor([[1, 0], [3, 0], [2, 4]])
    text = TextInputs("t.txt", {"input_ids": ids, "attention_mask": (ids != 0).long()}, "encoder", 4, 8, None)
    got = embedding_scores({"float": FakeEncoder(float_rows), "int8": FakeEncoder(int8_rows)}, text, 2,
                           torch.device("cpu"))
    # float lines [1, 0], [1, 1], [-0.5, 0.5]; int8 [1, 0], [1, 1], [0.5, -0.1]
    cos2 = (-0.5 * 0.5 + 0.5 * -0.1) / (math.sqrt(0.5) * math.sqrt(0.26))  # -0.83205
    assert got["embedding_cosine_min"] == pytest.approx(cos2)
    assert got["embedding_cosine_mean"] == pytest.approx((1 + 1 + cos2) / 3)
    # nearest other line, float: 0 -> 1, 1 -> 0, 2 -> 1; int8: 0 -> 2 (cos .98 > .71), 1 -> 0, 2 -> 0
    assert got["neighbour_agreement"] == pytest.approx(1 / 3)


def test_cli_eval_text_on_a_bert_folder(tmp_path, capsys):
    torch.manual_seed(0)
    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(30)]
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16,
    ))
    folder = tmp_path / "bert"
    bert.save_pretrained(folder)
    word_tokenizer(words, pad_token="[PAD]").save_pretrained(folder)
    text = _text(tmp_path, "w1 w2 w3\n\n  \nw4 w5\nw9 w8 w7 w6 w5 w4 w3 w2 w1 w0 w10 w11 w12 w13 w14 w15 w16 w17\n")
    q = tmp_path / "q.safetensors"
    cli_json(capsys, "quantize", folder, "-o", q)
    ev = cli_json(capsys, "eval", folder, q, "--text", text)
    assert (ev["model_kind"], ev["lines"]) == ("encoder", 3)
    assert (ev["max_length"], ev["truncated_lines"], ev["tokens"]) == (16, 1, 3 + 2 + 16)  # the long line is cut
    assert 0.99 < ev["embedding_cosine_min"] <= ev["embedding_cosine_mean"] <= 1.0 + 1e-9
    assert ev["neighbour_agreement"] == 1.0
    code, out, err = cli(capsys, "eval", folder, q, "--text", text)  # human mode: the note on stderr
    assert code == 0 and "nearest-neighbour agreement" in out and "note: 1 of 3 lines cut to 16 tokens" in err
    assert "--stride moves the windows of a causal LM; BertModel is an encoder" in _error(
        capsys, "eval", folder, q, "--text", text, "--stride", "4")


# ----------------------------------------------------------------------------- errors


def _error(capsys, *args) -> str:
    code, out, err = cli(capsys, *args)
    assert code == 1 and out == "", (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_folder_without_a_tokenizer(lm_dir, lm_q, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(lm_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    text = _text(tmp_path, "a b c d a b")
    msg = _error(capsys, "eval", bare, lm_q, "--text", text)
    assert f"{bare} has no tokenizer (none of tokenizer.json, tokenizer_config.json" in msg
    assert "tokenizer.save_pretrained" in msg
    msg = _error(capsys, "quantize", bare, "-o", tmp_path / "x.safetensors", "--calib-text", text)
    assert f"{bare} has no tokenizer" in msg and not (tmp_path / "x.safetensors").exists()


def test_an_empty_text_file(lm_dir, lm_q, tmp_path, capsys):
    empty = _text(tmp_path, "", "empty.txt")
    assert _error(capsys, "eval", lm_dir, lm_q, "--text", empty) == f"error: text {empty} is empty"
    blank = _text(tmp_path, " \n\n\t\n", "blank.txt")
    assert _error(capsys, "eval", lm_dir, lm_q, "--text", blank) == f"error: text {blank} holds no text (only white space)"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    assert "is not UTF-8 text (byte 3" in _error(capsys, "eval", lm_dir, lm_q, "--text", latin1)


def test_a_text_shorter_than_one_window(lm_dir, lm_q, tmp_path, capsys):
    short = _text(tmp_path, "a b c")
    assert _error(capsys, "eval", lm_dir, lm_q, "--text", short, "--max-length", "4") == (
        f"error: text {short} is 3 tokens, shorter than one window of --max-length 4: "
        "give a longer text or a smaller --max-length"
    )
    msg = _error(capsys, "quantize", lm_dir, "-o", tmp_path / "x.safetensors", "--mode", "static",
                 "--calib-text", short)  # the default window is the model's 8 positions
    assert msg.startswith(f"error: calibration text {short} is 3 tokens, shorter than one window of --max-length 8")


@pytest.mark.parametrize("args", [(), ("--inputs", "X", "--text", "X")])
def test_eval_takes_inputs_or_text(lm_dir, lm_q, tmp_path, capsys, args):
    text = _text(tmp_path, "a b c d a b c d")
    code, out, err = cli(capsys, "eval", lm_dir, lm_q, *[text if a == "X" else a for a in args])
    assert code == 2 and out == ""  # a usage error, as a missing option is
    says = "give one of them, not both" if args else "give one of them"
    assert err.strip() == f"error: Invalid value for '--inputs' / '--text': {says} (see 'qlin eval --help')"


@pytest.mark.parametrize("args, says", [
    (("--inputs", "X", "--max-length", "4"), "--max-length and --stride cut --text into windows"),
    (("--text", "X", "--labels", "X"), "--labels applies to --inputs, not to --text"),
    (("--text", "X", "--max-length", "9"), "--max-length 9 is more than the model's 8 positions"),
    (("--text", "X", "--max-length", "1"), "--max-length 1: a window needs at least 2 tokens"),
    (("--text", "X", "--max-length", "4", "--stride", "5"), "--stride 5: give 1 to --max-length (4) tokens"),
])
def test_eval_option_errors(lm_dir, lm_q, tmp_path, capsys, args, says):
    text = _text(tmp_path, "a b c d a b c d")
    args = [text if a == "X" else a for a in args]
    assert says in _error(capsys, "eval", lm_dir, lm_q, *args)


def test_quantize_option_errors(lm_dir, tmp_path, capsys):
    text = _text(tmp_path, "a b c d a b c d")
    out = tmp_path / "x.safetensors"
    assert "pass --calib or --calib-text, not both" in _error(
        capsys, "quantize", lm_dir, "-o", out, "--calib", text, "--calib-text", text)
    assert "--max-length and --stride cut --calib-text into windows" in _error(
        capsys, "quantize", lm_dir, "-o", out, "--stride", "2")
    digits = SAMPLES / "digits_mlp.pt"
    assert "is not a Hugging Face folder: pass --calib FILE" in _error(
        capsys, "quantize", digits, "-o", out, "--calib-text", text)
    assert "static mode needs calibration data" in _error(capsys, "quantize", lm_dir, "-o", out, "--mode", "static")
    assert not out.exists()


def test_text_on_a_checkpoint_is_an_error(digits_q, tmp_path, capsys):
    text = _text(tmp_path, "a b c d")
    assert "is not a Hugging Face folder: pass --inputs FILE" in _error(
        capsys, "eval", SAMPLES / "digits_mlp.pt", digits_q, "--text", text)


# ----------------------------------------------------------------------------- the sample LM


PERPLEXITY_BOUND = 300  # docs_lm gives 221.7 float, 221.6 int8 here; a model that knows nothing, 2048


def test_the_sample_lm_has_learned_and_int8_keeps_it(docs_lm_int8, tmp_path, capsys):
    """sample_models/docs_lm (a GPT-2 trained on docstrings) on the first held-out docstrings:
    far below the 2048 of a model that knows nothing, and int8 close to it."""
    lm = SAMPLES / "docs_lm"
    held = (SAMPLES / "docs_heldout.txt").read_text(encoding="utf-8")
    text = _text(tmp_path, held[:4000])  # 1546 tokens
    q, report = docs_lm_int8  # quantize docs_lm --kernel fbgemm: int8 activations too
    assert report["totals"]["layers_quantized"] == 12  # 3 blocks x 4 Conv1D; the tied head stays float
    ev = cli_json(capsys, "eval", lm, q, "--text", text, "--max-length", "128", "--stride", "64")
    assert ev["model_kind"] == "causal-lm" and ev["scored_tokens"] == ev["tokens"] - 1
    assert ev["perplexity_float"] < PERPLEXITY_BOUND
    assert 0.99 < ev["perplexity_ratio"] < 1.05 and ev["next_token_agreement"] > 0.9
