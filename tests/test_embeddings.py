"""`--embeddings`: nn.Embedding tables int8 per row, weight-only. What the file saves on a BERT
built from a config, the reload, the tables that stay float (tied, shared) and the errors (the
table itself: test_qembedding.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from conftest import cli, cli_json

from qlin_cli import QuantConfig, load_quantized, quantize_model, save_quantized
from qlin_cli.errors import FormatError
from qlin_cli.primitives import sqnr_db
from qlin_cli.qembedding import QuantizedEmbedding
from qlin_cli.qfile import read_qfile

transformers = pytest.importorskip("transformers")


def _bert(vocab=1000, hidden=64):
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64)).eval()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    transformers.utils.logging.set_verbosity_error()
    folder = tmp_path_factory.mktemp("bert") / "bert"
    _bert().save_pretrained(folder)
    return folder


def test_embeddings_shrink_the_file_by_what_the_tables_save(bert_dir, tmp_path, capsys):
    """A BERT whose tables dominate (vocab 1000 x 64): the file with --embeddings is smaller by
    the tables' float bytes minus their int8 bytes and scales (to the header's few hundred
    bytes), and the model still computes what the float one does."""
    plain = cli_json(capsys, "quantize", bert_dir, "-o", tmp_path / "plain.safetensors")
    emb = cli_json(capsys, "quantize", bert_dir, "-o", tmp_path / "emb.safetensors", "--embeddings")
    tables = {e["name"]: e for e in emb["embeddings"]}
    assert set(tables) == {"embeddings.word_embeddings", "embeddings.position_embeddings",
                           "embeddings.token_type_embeddings"}
    assert all(e["status"] == "quantized" and e["weight_sqnr_db"] > 38 for e in tables.values())
    shapes = [(1000, 64), (64, 64), (2, 64)]
    saved = sum(4 * n * d - (n * d + 4 * n) for n, d in shapes)  # float32 -> int8 + a float32 scale per row
    assert emb["totals"]["embedding_bytes_float"] - emb["totals"]["embedding_bytes_int8"] == saved
    shrink = plain["totals"]["size_int8_bytes"] - emb["totals"]["size_int8_bytes"]
    assert abs(shrink - saved) < 1024, (shrink, saved)
    assert emb["probe"]["cosine"] > 0.999
    assert plain["embeddings"] == [] and plain["totals"]["embedding_bytes_float"] == 0
    with safe_open(tmp_path / "emb.safetensors", "pt") as f:
        meta = f.metadata()
        assert f.get_slice("embeddings.word_embeddings.weight").get_dtype() == "I8"
    with safe_open(tmp_path / "plain.safetensors", "pt") as f:
        assert f.metadata()["format_version"] == "2" and "embeddings" not in f.metadata()
    assert meta["format_version"] == "3" and json.loads(meta["config"])["embeddings"] is True

    # reload into a fresh model: the tables are int8 modules that gather what quantize_model made
    model = load_quantized(_bert(), tmp_path / "emb.safetensors")
    word = model.embeddings.word_embeddings
    assert isinstance(word, QuantizedEmbedding) and word.padding_idx == 0
    fresh = quantize_model(_bert(), QuantConfig(embeddings=True)).model
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, fresh(input_ids=ids).last_hidden_state)
        ref = _bert()(input_ids=ids).last_hidden_state
        assert sqnr_db(ref, model(input_ids=ids).last_hidden_state) > 30

    shown = cli_json(capsys, "inspect", tmp_path / "emb.safetensors")
    rows = {r["name"]: r for r in shown["layers"] if r.get("kind") == "embedding"}
    assert rows["embeddings.word_embeddings"]["scale_shape"] == [1000] and rows["embeddings.word_embeddings"]["kernel"] == "gather"
    code, out, _ = cli(capsys, "inspect", tmp_path / "emb.safetensors")
    assert code == 0 and "13 Linear layers, 3 embeddings" in out and "nn.Embedding, int8 per row" in out


def test_tied_and_shared_tables_stay_float_with_the_reason():
    """A language-model head tied to its embedding keeps both float; a table used at two paths
    stays float; --skip applies to tables too."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    res = quantize_model(transformers.LlamaForCausalLM(cfg), QuantConfig(embeddings=True))
    (entry,) = [e.entry for e in res.embeddings]
    assert (entry.name, entry.quantized, entry.reason) == ("model.embed_tokens", False, "weight tied to lm_head")
    shared = nn.Embedding(10, 4)
    model = nn.ModuleDict({"a": shared, "b": shared, "c": nn.Embedding(10, 4), "lin": nn.Linear(4, 4)})
    res = quantize_model(model, QuantConfig(embeddings=True, skip=["^c$"]))
    assert [(e.entry.name, e.entry.quantized, e.entry.reason) for e in res.embeddings] == [
        ("a", False, "used at 2 paths (a, b)"), ("c", False, "matches --skip '^c$'")]


def test_embedding_errors(bert_dir, tmp_path, capsys):
    code, out, err = cli(capsys, "quantize", bert_dir, "--embeddings", "--format", "compressed-tensors",
                         "-o", tmp_path / "ct")
    assert (code, out) == (1, "") and err.strip() == (
        "error: --format compressed-tensors describes Linear layers only: drop --embeddings")
    assert not (tmp_path / "ct").exists()
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4))
    path = save_quantized(quantize_model(model, QuantConfig(embeddings=True)), tmp_path / "q.safetensors")
    from conftest import tamper

    bad = tamper(path, tmp_path / "bad.safetensors", tensors={"0.weight_scale": torch.ones(19)})
    with pytest.raises(FormatError, match=r"0.weight_scale is torch.float32 \(19,\), the plan says torch.float32 \(20,\)"):
        read_qfile(bad)
    zero = tamper(path, tmp_path / "zero.safetensors", tensors={"0.weight_scale": torch.zeros(20)})
    with pytest.raises(FormatError, match="0.weight_scale has values that are not finite and positive"):
        read_qfile(zero)
    with pytest.raises(FormatError, match=r"no nn.Embedding '0' of shape \(20, 8\)"):
        load_quantized(nn.Sequential(nn.Embedding(21, 8), nn.Linear(8, 4)), path)
