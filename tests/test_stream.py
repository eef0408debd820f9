"""`qlin quantize --stream`: the model is built without its weights (meta
device) and each layer is read, quantized, written and dropped in turn.

- the file is byte-identical to the whole-model run for the same options: Hugging Face folders
  (a bf16 Llama with a tied head in shards, GPT-2's Conv1D, BERT) and a safetensors state dict
  with --model;
- what streaming cannot do (anything that runs the model; pickles; compressed-tensors) is one
  line, exit 1, nothing written; a source larger than memory gets a warning;
- the peak memory, measured in a subprocess on a ~170 MB float32 model: the whole-model run
  peaks above the float size, the streamed one far below it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, cli, cli_json

transformers = pytest.importorskip("transformers")

from qlin_cli import QuantConfig  # noqa: E402
from qlin_cli.api import QuantizeOptions, quantize_checkpoint  # noqa: E402
from qlin_cli.errors import InputError  # noqa: E402
from qlin_cli.qfile import load_quantized, read_qfile  # noqa: E402
from qlin_cli.sources import load_source_lazily  # noqa: E402


def _quiet():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    _quiet()
    root = tmp_path_factory.mktemp("stream")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )).to(torch.bfloat16)
    llama.save_pretrained(root / "llama", max_shard_size="100KB")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    gpt2.save_pretrained(root / "gpt2")
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64,
    ))
    bert.save_pretrained(root / "bert")
    torch.save(bert.state_dict(), root / "bert.pt")
    return root


CONFIGS = {"dynamic": QuantConfig(), "weight-only 4-bit tensor": QuantConfig(mode="weight-only", bits=4, granularity="tensor")}


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_streamed_file_is_byte_identical(folders, tmp_path, name, config):
    whole, streamed = tmp_path / "whole.safetensors", tmp_path / "streamed.safetensors"
    a = quantize_checkpoint(folders / name, config, QuantizeOptions(output=whole))
    b = quantize_checkpoint(folders / name, config, QuantizeOptions(output=streamed, stream=True))
    assert whole.read_bytes() == streamed.read_bytes()
    assert b.source_kind.endswith("streamed one layer at a time") and "streamed" not in a.source_kind
    # the same layers, and the same measured weight SQNR for each (the output's needs the forward)
    assert [(r.name, r.status, r.weight_sqnr_db) for r in a.layers] == [(r.name, r.status, r.weight_sqnr_db) for r in b.layers]
    assert b.probe.compared is None and "not measured with --stream" in b.probe.note
    assert a.probe.metrics["cosine"] > 0.9


def test_tied_head_is_read_once_and_written_once(folders, tmp_path):
    source = load_source_lazily(folders / "llama")
    model = source.model
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.is_meta
    assert model.lm_head.weight.dtype == torch.bfloat16  # the dtype from_pretrained picks ("auto")
    out = tmp_path / "q.safetensors"
    quantize_checkpoint(folders / "llama", QuantConfig(), QuantizeOptions(output=out, stream=True))
    qf = read_qfile(out)
    assert json.loads(qf.metadata["ties"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    # and it loads into the model transformers builds, tied again
    fresh = transformers.LlamaForCausalLM.from_pretrained(folders / "llama")
    loaded = load_quantized(fresh, out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_state_dict_with_model(tmp_path, isolate_imports):
    (tmp_path / "arch.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def build():
            return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10))
    """))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    spec = f"{tmp_path / 'arch.py'}:build"
    outs = []
    for stream in (False, True):
        out = tmp_path / f"q{stream}.safetensors"
        quantize_checkpoint(tmp_path / "m.safetensors", QuantConfig(), QuantizeOptions(output=out, model=spec, stream=stream))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    # a checkpoint that does not fit the architecture: one line, before anything is read
    save_file({"0.weight": torch.zeros(64, 32)}, tmp_path / "short.safetensors")
    with pytest.raises(InputError, match="does not fit `model`.*missing"):
        load_source_lazily(tmp_path / "short.safetensors", model=spec)


@pytest.mark.parametrize("extra, words", [
    (["--calib", "{inputs}"], "cannot run it: --calib needs the model's forward"),
    (["--mode", "static", "--calib", "{inputs}"], "needs the model's forward"),
    (["--inputs", "{inputs}"], "--inputs needs the model's forward"),
    (["--calib-text", "{text}"], "--calib-text needs the model's forward"),
    (["--format", "compressed-tensors"], "--stream writes the qlin format only"),
])
def test_what_streaming_refuses(folders, tmp_path, capsys, extra, words):
    save_file({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, tmp_path / "ids.safetensors")
    out = tmp_path / "q.safetensors"
    (tmp_path / "t.txt").write_text("some text\n")
    args = [a.format(inputs=tmp_path / "ids.safetensors", text=tmp_path / "t.txt") for a in extra]
    code, stdout, err = cli(capsys, "quantize", folders / "bert", "-o", out, "--stream", *args)
    assert code == 1 and stdout == ""
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_pickles_cannot_be_streamed(folders, tmp_path, capsys):
    code, _, err = cli(capsys, "quantize", folders / "bert.pt", "-o", tmp_path / "q.safetensors", "--stream",
                       "--model", "x:y")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "is a pickle, which loads whole and cannot be read a layer at a time; convert it to safetensors" in err


def test_a_source_larger_than_memory_is_warned_about(folders, tmp_path, capsys, monkeypatch):
    import qlin_cli.jobs.options as options

    monkeypatch.setattr(options, "_available_memory", lambda: 1000)  # bytes
    code, _, err = cli(capsys, "quantize", folders / "bert", "-o", tmp_path / "a.safetensors")
    assert code == 0
    assert "warning: " in err and "more than the 0.0 GB of memory available: pass --stream" in err
    (tmp_path / "arch.py").write_text("")
    code, _, err = cli(capsys, "quantize", folders / "bert.pt", "-o", tmp_path / "b.safetensors", "--model", "x:y")
    assert code == 1  # (x:y does not import) but the warning came first, before loading
    assert "is a pickle, which loads whole, so it cannot be streamed: convert it to safetensors and pass --stream" in err


MEASURE = """
import json, sys, transformers
from transformers import LlamaForCausalLM  # its import alone is ~90 MB: part of the baseline, not the model
from qlin_cli.api import QuantizeOptions, quantize_checkpoint
from qlin_cli.sources import load_source
from qlin_cli import QuantConfig

def hwm():  # peak RSS so far, bytes
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

before = hwm()
quantize_checkpoint(sys.argv[1], QuantConfig(), QuantizeOptions(output=sys.argv[2], stream=True))
streamed = hwm()
model = load_source(sys.argv[1]).model  # the float model, whole: what streaming avoids
total = sum(float(p.sum()) for p in model.parameters())  # touched (transformers may map the files lazily)
print(json.dumps({"before": before, "streamed": streamed, "whole": hwm()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_streaming_peak_memory(tmp_path):
    """A Llama-style model of ~165 MB float32 in 4 shards, most of it in 84 small layers (the
    largest 2.9 MB), quantized with --stream in a fresh process: its peak RSS above the process's
    peak after its imports is a few layers and the allocator's slack (~0.18x the float size
    here, where that slack is most of it). Then the same process loads the float model whole,
    which must show as > 0.9x: the measurement sees a whole model when there is one."""
    _quiet()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=12,
                                   num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    folder = tmp_path / "llama"
    model.save_pretrained(folder, max_shard_size="50MB")
    del model
    float_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert float_bytes > 160e6 and len(list(folder.glob("*.safetensors"))) >= 4
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(tmp_path / "q.safetensors")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    streamed, whole = ((m[k] - m["before"]) / float_bytes for k in ("streamed", "whole"))
    print(f"peak above imports: streamed {streamed:.2f}x, then the whole float model {whole:.2f}x ({float_bytes / 1e6:.0f} MB)")
    assert streamed < 0.3, (streamed, whole)
    assert whole > 0.9, (streamed, whole)
