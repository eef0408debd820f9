"""Hugging Face model folders: `qlin quantize DIR`, `qlin eval DIR FILE` with
dict inputs, the reload into a fresh model from the folder, tied weights, and the errors.

The models are tiny ones built from a config here (random weights, no download) and saved with
`save_pretrained`: a BertModel (model.safetensors), a Llama-style causal LM with its head tied to
the embedding (sharded safetensors + index) and an untied one as pytorch_model.bin.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import cli, cli_json

transformers = pytest.importorskip("transformers")

from qlin_cli import QuantConfig, empty_weights, load_quantized, quantize_model, save_quantized  # noqa: E402
from qlin_cli.errors import ConfigError, FormatError, InputError  # noqa: E402
from qlin_cli.hf import load_hf_folder  # noqa: E402
from qlin_cli.sources import load_source  # noqa: E402

VOCAB, TOKENS = 128, 12


def _llama(tied: bool):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(cfg)


def _quiet():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> folder: bert (model.safetensors), llama-tied (sharded safetensors + index),
    llama-bin (pytorch_model.bin); and 'inputs': a safetensors file of input_ids + attention_mask."""
    _quiet()
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64,
    ))
    bert.save_pretrained(root / "bert")
    _llama(tied=True).save_pretrained(root / "llama-tied", max_shard_size="100KB")
    untied = _llama(tied=False)
    untied.config.architectures = ["LlamaForCausalLM"]
    untied.config.save_pretrained(root / "llama-bin")
    torch.save(untied.state_dict(), root / "llama-bin" / "pytorch_model.bin")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (6, TOKENS), generator=gen)
    mask = torch.ones_like(ids)
    mask[3:, -3:] = 0  # some padded samples
    save_file({"input_ids": ids, "attention_mask": mask}, root / "ids.safetensors")
    return {"bert": root / "bert", "llama-tied": root / "llama-tied", "llama-bin": root / "llama-bin",
            "inputs": root / "ids.safetensors"}


def test_folders_are_what_the_tests_say(folders):
    assert (folders["bert"] / "model.safetensors").is_file()
    shards = sorted(p.name for p in folders["llama-tied"].glob("model-*.safetensors"))
    assert len(shards) > 1 and (folders["llama-tied"] / "model.safetensors.index.json").is_file()
    assert (folders["llama-bin"] / "pytorch_model.bin").is_file()
    assert not list(folders["llama-bin"].glob("*.safetensors"))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).min())


@pytest.mark.parametrize("name, compared", [
    ("bert", "output['last_hidden_state']"), ("llama-tied", "output['logits']"), ("llama-bin", "output['logits']"),
])
def test_cli_quantize_and_eval_a_folder(folders, tmp_path, capsys, name, compared):
    out = tmp_path / "m.int8.safetensors"
    report = cli_json(capsys, "quantize", folders[name], "-o", out, "--inputs", folders["inputs"], "--kernel", "fbgemm")
    assert report["source_kind"].startswith("Hugging Face folder")
    assert report["probe"]["compared"] == compared
    assert report["probe"]["cosine"] > 0.99
    assert report["totals"]["layers_quantized"] >= 13  # bert: 2 x 6 + pooler; llama: 2 x 7 (+ an untied head)
    ev = cli_json(capsys, "eval", folders[name], out, "--inputs", folders["inputs"], "--repeats", "1")
    assert ev["compared"] == compared and ev["samples"] == 6
    assert ev["cosine"] > 0.99 and ev["sqnr_db"] > 20
    assert ev["source_matches"] is True


def test_default_probe_is_random_token_ids(folders, tmp_path, capsys):
    report = cli_json(capsys, "quantize", folders["bert"], "-o", tmp_path / "b.safetensors")
    assert "random token ids (32, 16)" in report["probe"]["description"]
    assert report["probe"]["cosine"] > 0.99


def test_default_output_is_beside_the_folder(folders, tmp_path, capsys):
    import shutil

    folder = tmp_path / "my.model"  # a dot in a folder's name is not a suffix
    shutil.copytree(folders["bert"], folder)
    report = cli_json(capsys, "quantize", folder)
    assert report["output"] == str(tmp_path / "my.model.int8.safetensors")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("name", ["bert", "llama-tied", "llama-bin"])
def test_api_reload_into_a_fresh_model_is_bit_identical(folders, tmp_path, name):
    inputs = load_file(folders["inputs"])
    source = load_source(folders[name])
    with torch.no_grad():
        reference = source.model(**inputs)[0]
    result = quantize_model(source.model, QuantConfig(kernel="fbgemm"))
    path = save_quantized(result, tmp_path / "q.safetensors", source_sha256=source.sha256)
    with torch.no_grad():
        quantized = result.model(**inputs)[0]
    assert _cosine(reference, quantized) > 0.99
    fresh = load_hf_folder(folders[name]).model
    reloaded = load_quantized(fresh, path)
    with torch.no_grad():
        again = reloaded(**inputs)[0]
    assert torch.equal(quantized, again)
    # the same input gives the same bytes
    source2 = load_source(folders[name])
    path2 = save_quantized(quantize_model(source2.model, QuantConfig(kernel="fbgemm")), tmp_path / "q2.safetensors",
                           source_sha256=source2.sha256)
    assert path.read_bytes() == path2.read_bytes()


def test_inspect_a_folder_lists_its_linear_layers(folders, capsys):
    """`qlin inspect DIR` on a float model folder lists its Linear layers (not 'is a directory')."""
    r = cli_json(capsys, "inspect", folders["llama-tied"])
    assert r["kind"] == "float (Hugging Face folder (LlamaForCausalLM, sharded safetensors))"
    names = [layer["name"] for layer in r["layers"]]
    assert len(names) == 15 and names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "lm_head"
    assert r["layers"][0]["weight_shape"] == [64, 64] and r["layers"][0]["scale_shape_per_channel"] == [64]
    weights = sorted(folders["llama-tied"].glob("model-*.safetensors"))
    assert r["size_bytes"] == sum(f.stat().st_size for f in weights) + (folders["llama-tied"] / "model.safetensors.index.json").stat().st_size


@pytest.mark.parametrize("name", ["bert", "llama-tied"])
def test_load_into_a_skeleton_without_weights(folders, tmp_path, name):
    """A skeleton built under empty_weights() holds no float weights (every
    parameter on the meta device, buffers real); load_quantized materialises the rest from the
    file, ties kept, and gives the outputs of a full float skeleton bit for bit."""
    inputs = load_file(folders["inputs"])
    source = load_source(folders[name])
    result = quantize_model(source.model, QuantConfig())
    path = save_quantized(result, tmp_path / "q.safetensors")
    with torch.no_grad():
        expected = result.model(**inputs)[0]
    config = transformers.AutoConfig.from_pretrained(folders[name])
    with empty_weights():
        skeleton = transformers.AutoModel.from_config(config) if name == "bert" else _llama(tied=True)
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(b.is_meta for b in skeleton.buffers())
    model = load_quantized(skeleton, path)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    if name == "llama-tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], expected)


def test_meta_skeleton_errors_are_one_line(folders, tmp_path):
    """torch.device('meta') puts BERT's computed position ids on meta too: the error says what
    to use instead. A skeleton of another size is refused as before."""
    source = load_source(folders["bert"])
    path = save_quantized(quantize_model(source.model, QuantConfig()), tmp_path / "q.safetensors")
    config = transformers.AutoConfig.from_pretrained(folders["bert"])
    with torch.device("meta"):
        skeleton = transformers.AutoModel.from_config(config)
    with pytest.raises(InputError) as exc:
        load_quantized(skeleton, path)
    msg = str(exc.value)
    assert msg.startswith("the model's 'embeddings.position_ids' is on the meta device and not in the file")
    assert "qlin_cli.empty_weights()" in msg and "\n" not in msg
    config.intermediate_size = 96
    with empty_weights():
        other = transformers.AutoModel.from_config(config)
    with pytest.raises(FormatError, match=r"the model has no nn.Linear 'encoder.layer.0.intermediate.dense' of shape \(128, 64\)"
                       r"|does not fit the model: size mismatch for encoder.layer.0.intermediate.dense.weight"):
        load_quantized(other, path)


def test_tied_head_stays_float_and_tied(folders, tmp_path):
    source = load_source(folders["llama-tied"])
    model = source.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    result = quantize_model(model, QuantConfig(kernel="fbgemm"))
    head = next(r for r in result.layers if r.name == "lm_head")
    assert head.status == "skipped" and head.plan.reason == "weight tied to model.embed_tokens"
    assert len(result.quantized) == 14  # every other Linear
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    path = save_quantized(result, tmp_path / "t.safetensors")
    reloaded = load_quantized(load_hf_folder(folders["llama-tied"]).model, path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.model.embed_tokens.weight, embedding)


def test_untied_head_is_quantized(folders):
    result = quantize_model(load_source(folders["llama-bin"]).model, QuantConfig(kernel="fbgemm"))
    assert len(result.quantized) == 15 and not [r for r in result.layers if r.status != "quantized"]


def test_tied_linear_without_transformers_is_skipped_too():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.body = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.body(self.emb(ids)))

    result = quantize_model(Tiny(), QuantConfig(kernel="fbgemm"))
    assert {r.name: r.plan.reason for r in result.layers} == {"body": "", "head": "weight tied to emb"}


def test_loading_is_offline(folders, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_hf_folder(folders["bert"])
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_calibration_and_static_mode_with_dict_inputs(folders, tmp_path, capsys):
    report = cli_json(capsys, "quantize", folders["llama-bin"], "-o", tmp_path / "s.safetensors", "--mode", "static",
                      "--calib", folders["inputs"], "--inputs", folders["inputs"])
    assert report["probe"]["cosine"] > 0.99
    assert all(r["input_scale"] for r in report["layers"] if r["status"] == "quantized")


# ----------------------------------------------------------------------------- errors


def _error(capsys, *args) -> str:
    code, out, err = cli(capsys, *args)
    assert code == 1 and out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_folder_without_config_is_still_an_error(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert "is a folder but not a model folder (it has no config.json)" in _error(capsys, "quantize", tmp_path / "plain")
    assert "is a folder but not a model folder" in _error(capsys, "inspect", tmp_path / "plain")


def test_folder_without_weights(tmp_path, capsys):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    msg = _error(capsys, "quantize", folder)
    assert "no weights" in msg and "model.safetensors" in msg


def test_shard_index_naming_a_missing_shard(folders, tmp_path, capsys):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(folders["llama-tied"], folder)
    next(folder.glob("model-*.safetensors")).unlink()
    assert "which is not a file" in _error(capsys, "quantize", folder)


def test_unknown_architecture(folders, tmp_path, capsys):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(folders["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MyOwnModelWithRemoteCode"]
    (folder / "config.json").write_text(json.dumps(config))
    msg = _error(capsys, "quantize", folder)
    assert "MyOwnModelWithRemoteCode" in msg and "no remote code" in msg


def test_weights_that_do_not_fit_the_config(folders, tmp_path, capsys):
    import shutil

    folder = tmp_path / "misfit"
    shutil.copytree(folders["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights hold 2 layers
    (folder / "config.json").write_text(json.dumps(config))
    msg = _error(capsys, "quantize", folder)
    assert "do not fit BertModel" in msg and "missing" in msg


def test_model_option_with_a_folder(folders, capsys):
    with pytest.raises(ConfigError, match="`model` applies to state dicts"):
        load_source(folders["bert"], model="sample_models.encoder:build")


def test_without_transformers_the_error_names_the_extra(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(InputError, match=r"needs transformers: pip install -e \.\[hf\]"):
        load_hf_folder(folders["bert"])
    assert "pip install -e .[hf]" in _error(capsys, "quantize", folders["bert"], "-o", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_a_bin_shard_is_scanned_before_transformers_loads_it(folders, tmp_path, capsys):
    """transformers' torch.load(weights_only=True) calls what the pickle asks of torch's allowlist
    (bytearray(n) with the file's n): qlin refuses it first."""
    import shutil

    folder = tmp_path / "hostile"
    shutil.copytree(folders["llama-bin"], folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "x": _Call(bytearray, 10**6)}, folder / "pytorch_model.bin")
    msg = _error(capsys, "quantize", folder)
    assert "cannot be loaded safely (it calls builtins.bytearray(1000000) while it loads" in msg


def test_a_folder_over_max_memory(folders, capsys):
    msg = _error(capsys, "quantize", folders["bert"], "--max-memory", "1kB")
    assert "of tensors, more than --max-memory 1.0 kB" in msg


def test_a_float16_folder_stays_float16_and_runs_qlins_kernel(folders, tmp_path, capsys):
    """transformers' `from_pretrained` (dtype="auto") and qlin load a float16 checkpoint as float16;
    its int8 layers run qlin's per-token kernel on float16 rows, not torch's plain-loop CPU
    `_int_mm` (where they fell until this release), and the file reloads into a float16 model."""
    from qlin_cli.kernels import pertoken

    folder = tmp_path / "llama-f16"
    torch.manual_seed(0)
    model = _llama(tied=False).half()
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder)
    assert load_hf_folder(folder).model.dtype == torch.float16
    out = tmp_path / "f16.int8.safetensors"
    report = cli_json(capsys, "quantize", folder, "-o", out, "--inputs", folders["inputs"], "--kernel", "pertoken")
    expect = "pertoken" if pertoken.missing(torch.device("cpu"), torch.float32) is None else "int_mm"  # C++ built
    assert report["totals"]["kernels"] == {expect: 15}  # 2 x 7 and the untied head
    assert report["probe"]["cosine"] > 0.99
    ev = cli_json(capsys, "eval", folder, out, "--inputs", folders["inputs"], "--repeats", "1")
    assert ev["sqnr_db"] > 20
