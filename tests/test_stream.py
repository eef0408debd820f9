"""`qlin quantize --stream`: the model is built without its weights (meta
device) and each layer is read, quantized, written and dropped in turn; where the plan runs
the model (calibration data, SmoothQuant, static mode, GPTQ, AWQ), each block (sequential.py).

- the file is byte-identical to the whole-model run for the same options: Hugging Face folders
  (a bf16 Llama with a tied head in shards, GPT-2's Conv1D, BERT) and a safetensors state dict
  with --model, also with calibration (dynamic with SmoothQuant, static, AWQ) block by block,
  where the probe's error is measured too; GPTQ block by block is fed the quantized outputs of
  the blocks before (its first block's layers are the whole-model run's, the next ones differ);
- a model without a list of blocks falls back to the whole-model run with a note; what streaming
  cannot do (what runs the whole model per layer; pickles; compressed-tensors) is one line,
  exit 1, nothing written; a source larger than memory is streamed (a pickle gets a warning);
- the peak memory, measured in a subprocess on a ~170 MB float32 model, calibrated block by
  block: far below the float size, while the whole float model shows above it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, cli

transformers = pytest.importorskip("transformers")

from qlin_cli import QuantConfig  # noqa: E402
from qlin_cli.api import QuantizeOptions, quantize_checkpoint  # noqa: E402
from qlin_cli.errors import InputError  # noqa: E402
from qlin_cli.qfile import load_quantized, read_qfile  # noqa: E402
from qlin_cli.report import to_markdown  # noqa: E402
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
    assert "streamed" not in a.source_kind
    # the same layers, and the same measured weight SQNR for each
    assert [(r.name, r.status, r.weight_sqnr_db) for r in a.layers] == [(r.name, r.status, r.weight_sqnr_db) for r in b.layers]
    assert a.probe.metrics["cosine"] > 0.9
    # nothing runs the model (the dynamic layers too small for int8 stay float, so the default
    # SmoothQuant has nothing to smooth): one layer at a time, and the model's error is not measured
    assert a.smoothing is None and b.source_kind.endswith("streamed one layer at a time")
    assert b.probe.compared is None and "not measured with --stream without calibration data" in b.probe.note


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids") / "ids.safetensors"
    save_file({"input_ids": torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(1))}, path)
    return path


def _same_error(whole, streamed):
    """The probe's error block by block, in batches of --batch-size (batch-invariant kernels),
    is the whole-model run's (one batch) to float rounding, and the very numbers where the probe
    is one batch."""
    assert streamed.compared == whole.compared and streamed.metrics.keys() == whole.metrics.keys()
    for key, value in whole.metrics.items():
        assert streamed.metrics[key] == (value if value is None else pytest.approx(value, rel=1e-5, abs=1e-9)), key


GROUPED = dict(mode="weight-only", bits=4, group_size=32)
CALIBRATED = {  # (folder, config, with the calibration file): quantizing the tiny layers (explicit kernels)
    "llama dynamic, SmoothQuant from --calib": ("llama", QuantConfig(kernel="pertoken"), True),
    "gpt2 static": ("gpt2", QuantConfig(mode="static", kernel="int_mm"), True),
    "bert dynamic, SmoothQuant from token ids": ("bert", QuantConfig(kernel="pertoken"), False),
    "gpt2 awq 4-bit g32": ("gpt2", QuantConfig(rounding="awq", **GROUPED), True),
}


@pytest.mark.parametrize("name, config, calibrated", CALIBRATED.values(), ids=CALIBRATED.keys())
def test_streamed_with_calibration_is_byte_identical(folders, ids, tmp_path, name, config, calibrated):
    whole, streamed = tmp_path / "whole.safetensors", tmp_path / "streamed.safetensors"
    data = {"calib": ids, "batch_size": 4} if calibrated else {}  # batches of 4 and 2
    a = quantize_checkpoint(folders / name, config, QuantizeOptions(output=whole, **data))
    b = quantize_checkpoint(folders / name, config, QuantizeOptions(output=streamed, stream=True, **data))
    assert whole.read_bytes() == streamed.read_bytes()
    assert "streamed block by block (2 blocks of " in b.source_kind and "each calibrated on the float outputs of the ones before" in b.source_kind
    _same_error(a.probe, b.probe)
    assert b.probe.metrics["sqnr_db"] > 15
    assert b.calibration == a.calibration and b.smoothing == a.smoothing
    assert [r.plan for r in b.layers] == [r.plan for r in a.layers]
    assert [r.weight_sqnr_db for r in b.layers] == [r.weight_sqnr_db for r in a.layers]
    # on its samples (the inputs of the first batch): AWQ's folds change the float activations
    # the whole-model run calibrates the next layers on by float rounding
    assert [r.output_sqnr_db for r in b.layers] == pytest.approx([r.output_sqnr_db for r in a.layers], abs=0.01)
    assert sum(r.status == "quantized" for r in b.layers) >= 8


@pytest.mark.parametrize("name, config", [
    ("llama", QuantConfig(kernel="pertoken")),  # SmoothQuant from --calib
    ("gpt2", QuantConfig(mode="static", kernel="int_mm")),
    ("llama", QuantConfig(rounding="gptq", **GROUPED)),  # fed quantized outputs
], ids=["llama dynamic", "gpt2 static", "llama gptq"])
def test_activations_past_keep_bytes_wait_in_files(folders, ids, tmp_path, monkeypatch, name, config):
    """Activations kept between blocks beyond KEEP_BYTES wait in temporary files, a batch in
    memory at a time: the same file and the same probe error as kept in memory; every file
    closed at the end."""
    import qlin_cli.sequential as sequential

    data = dict(calib=ids, batch_size=4, stream=True)
    a = quantize_checkpoint(folders / name, config, QuantizeOptions(output=tmp_path / "a.safetensors", **data))
    stashes = []
    init = sequential._Stash.__init__
    monkeypatch.setattr(sequential._Stash, "__init__", lambda self, folder: stashes.append(self) or init(self, folder))
    monkeypatch.setattr(sequential, "KEEP_BYTES", 0)
    b = quantize_checkpoint(folders / name, config, QuantizeOptions(output=tmp_path / "b.safetensors", **data))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert b.probe.metrics == a.probe.metrics
    assert len(stashes) > 6 and all(s.spill.f.closed for s in stashes)
    assert all(isinstance(x, sequential._Parked) for s in stashes for x in _leaves(s.items))


def _leaves(value):
    """The tensors (or what stands for them) in a stash's items."""
    from qlin_cli.sequential import _Call, _Parked

    if isinstance(value, _Parked) or isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, _Call):
        yield from _leaves(value.args)
        yield from _leaves(value.kwargs)
    elif isinstance(value, (tuple, list)):
        for x in value:
            yield from _leaves(x)
    elif isinstance(value, dict):
        for x in value.values():
            yield from _leaves(x)


def test_gptq_block_by_block_is_fed_quantized_outputs(folders, ids, tmp_path):
    """GPTQ's statistic for a block comes from the quantized blocks before it: the first block
    sees what the whole-model run sees (the embeddings), so its layers are the same bytes; the
    second block's inputs differ by the first one's error, and so do its layers."""
    config = QuantConfig(rounding="gptq", **GROUPED)
    whole, streamed = tmp_path / "whole.safetensors", tmp_path / "streamed.safetensors"
    a = quantize_checkpoint(folders / "llama", config, QuantizeOptions(output=whole, calib=ids))
    b = quantize_checkpoint(folders / "llama", config, QuantizeOptions(output=streamed, stream=True, calib=ids))
    assert "each calibrated on the quantized outputs of the ones before" in b.source_kind
    assert "quantized outputs of the blocks before (block by block, with GPTQ layers" in to_markdown(b)
    x, y = read_qfile(whole).tensors, read_qfile(streamed).tensors
    block0 = [k for k in x if k.startswith("model.layers.0.") and k.endswith(".weight") and "proj" in k]
    block1 = [k.replace(".0.", ".1.", 1) for k in block0]
    assert len(block0) == 7 and all(torch.equal(x[k], y[k]) for k in block0)
    assert sum(not torch.equal(x[k], y[k]) for k in block1) >= 5
    assert abs(b.probe.metrics["sqnr_db"] - a.probe.metrics["sqnr_db"]) < 3
    assert all(r.rtn_output_sqnr_db is not None for r in b.layers if r.status == "quantized")


def test_the_tail_calibrates_the_head_without_its_logits(tmp_path, ids):
    """The head's calibration needs its inputs: the tail's forward over a calibration batch ends
    at the head's input (a language model's logits of the calibration windows were 5x the
    model's size); only the probe's float and int8 runs compute logits. The same file as the
    whole run, head quantized."""
    _quiet()
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(tmp_path / "untied")
    config, data = QuantConfig(kernel="pertoken"), dict(calib=ids, batch_size=4)
    logits = []

    def count(module, args, output):
        if isinstance(output, torch.Tensor) and output.shape[-1] == 160 and output.dim() == 3:
            logits.append(type(module).__name__)

    a = quantize_checkpoint(tmp_path / "untied", config, QuantizeOptions(output=tmp_path / "a.safetensors", **data))
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        b = quantize_checkpoint(tmp_path / "untied", config, QuantizeOptions(output=tmp_path / "b.safetensors",
                                                                             stream=True, **data))
    finally:
        handle.remove()
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert next(r for r in b.layers if r.name == "lm_head").status == "quantized"
    # the probe's first sample (what its output weighs), the probe's two batches (4 + 2) float,
    # then int8; no calibration batch (the probe is the calibration data)
    assert logits == ["Linear", "Linear", "Linear", "QuantizedLinear", "QuantizedLinear"]
    _same_error(a.probe, b.probe)


def test_state_dict_model_with_blocks_and_a_layer_before_them(tmp_path):
    """The sample encoder (state dict + `model`): a Linear before its blocks and a parameter of
    the root module; calibrated (static) block by block, the same file as the whole run."""
    src = ROOT / "sample_models" / "encoder.safetensors"
    calib, spec = ROOT / "sample_models" / "digits_calib.safetensors", "sample_models.encoder:build"
    config = QuantConfig(mode="static", kernel="int_mm")
    a = quantize_checkpoint(src, config, QuantizeOptions(output=tmp_path / "a.safetensors", model=spec, calib=calib))
    b = quantize_checkpoint(src, config, QuantizeOptions(output=tmp_path / "b.safetensors", model=spec, calib=calib,
                                                         stream=True))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert "streamed block by block" in b.source_kind
    _same_error(a.probe, b.probe)


def test_without_a_list_of_blocks_the_whole_model_is_used(tmp_path, capsys):
    src, calib = ROOT / "sample_models" / "digits_mlp.safetensors", ROOT / "sample_models" / "digits_calib.safetensors"
    out = tmp_path / "q.safetensors"
    code, stdout, err = cli(capsys, "quantize", src, "-o", out, "--model", "sample_models.digits:build_digits_mlp",
                            "--mode", "static", "--calib", calib, "--stream")
    assert code == 0
    assert "its Linear layers do not sit in a repeated list of blocks, so the whole model was loaded" in err
    whole = tmp_path / "w.safetensors"
    assert cli(capsys, "quantize", src, "-o", whole, "--model", "sample_models.digits:build_digits_mlp",
               "--mode", "static", "--calib", calib)[0] == 0
    assert out.read_bytes() == whole.read_bytes()


def test_block_lists_found_and_refused():
    from qlin_cli.plan import make_plan
    from qlin_cli.sequential import block_problem, find_blocks

    _quiet()
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                          num_attention_heads=2, intermediate_size=64))
    blocks = find_blocks(bert)
    assert blocks.path == "encoder.layer" and len(blocks.modules) == 3
    assert blocks.index_of("encoder.layer.2.output.dense") == 2 and blocks.index_of("pooler.dense") is None
    assert block_problem(bert, blocks, make_plan(bert, QuantConfig())) is None
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2))
    assert "two lists of blocks" in block_problem(t5, find_blocks(t5), make_plan(t5, QuantConfig()))
    bert.config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    assert "different attention masks" in block_problem(bert, blocks, make_plan(bert, QuantConfig()))
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    assert find_blocks(mlp) is None and "repeated list of blocks" in block_problem(mlp, None, make_plan(mlp, QuantConfig()))


def test_spill_gives_back_each_tensor(tmp_path):
    from qlin_cli.files import Spill

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int8), "c": torch.randn(4).to(torch.bfloat16),
               "empty": torch.empty(0, 3), "view": torch.randn(6, 4)[:, 1]}
    with Spill(tmp_path) as spill:
        for k, t in tensors.items():
            spill.put(k, t)
        assert "a" in spill and "z" not in spill
        for k in reversed(list(tensors)):
            got = spill.get(k)
            assert got.dtype == tensors[k].dtype and torch.equal(got, tensors[k])
    assert list(tmp_path.iterdir()) == []  # an unnamed file: nothing left behind


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


def test_a_source_larger_than_memory_is_streamed(folders, tmp_path, capsys, monkeypatch):
    """Float weights larger than the available memory: a folder of safetensors is streamed (the
    same file), a pickle gets a warning that it cannot be, before anything is loaded."""
    import qlin_cli.jobs.options as options

    code, _, err = cli(capsys, "quantize", folders / "bert", "-o", tmp_path / "whole.safetensors")
    assert code == 0 and "streamed" not in err
    monkeypatch.setattr(options, "_available_memory", lambda: 1000)  # bytes
    code, _, err = cli(capsys, "quantize", folders / "bert", "-o", tmp_path / "a.safetensors")
    assert code == 0
    assert "note: " in err and "more than the 0.0 GB of memory available: streamed (--stream)" in err
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    code, _, err = cli(capsys, "quantize", folders / "bert", "-o", tmp_path / "b.safetensors", "--embeddings")
    assert code == 0 and "warning: " in err
    assert "cannot be streamed: --stream quantizes the Linear layers one at a time, not embedding tables" in err
    (tmp_path / "arch.py").write_text("")
    code, _, err = cli(capsys, "quantize", folders / "bert.pt", "-o", tmp_path / "c.safetensors", "--model", "x:y")
    assert code == 1  # (x:y does not import) but the warning came first, before loading
    assert "is a pickle, which loads whole, so it cannot be streamed: convert it to safetensors and pass --stream" in err


MEASURE = """
import ctypes, json, sys, transformers
from transformers import LlamaForCausalLM  # its import alone is ~90 MB: part of the baseline, not the model
from qlin_cli.api import QuantizeOptions, quantize_checkpoint
from qlin_cli.sources import load_source
from qlin_cli import QuantConfig

def status(key):  # bytes
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def hwm():  # peak RSS so far
    return status("VmHWM")

# the same run on 2 blocks of the same shapes first: the code and buffers a first forward touches
# (tens of MB of libtorch pages, whatever the model's size) are then part of the baseline
quantize_checkpoint(sys.argv[1], QuantConfig(), QuantizeOptions(output=sys.argv[3], stream=True))
before = hwm()
report = quantize_checkpoint(sys.argv[2], QuantConfig(), QuantizeOptions(output=sys.argv[3], stream=True, force=True))
streamed = hwm()
ctypes.CDLL(None).malloc_trim(0)  # the heap the runs freed back to the system: the load cannot reuse it unseen
resident = status("VmRSS")  # what the whole model's load starts from (the peaks above are past)
model = load_source(sys.argv[2]).model  # the float model, whole: what streaming avoids
total = sum(float(p.sum()) for p in model.parameters())  # touched (transformers may map the files lazily)
print(json.dumps({"before": before, "streamed": streamed, "resident": resident, "whole": hwm(), "kind": report.source_kind}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_streaming_peak_memory(tmp_path):
    """A Llama-style model of ~165 MB float32 in 4 shards, most of it in 12 blocks of 7 small
    layers (the largest 2.9 MB), quantized with --stream and qlin's defaults (SmoothQuant from
    token ids: calibrated block by block) in a fresh process: its peak RSS above the peak of the
    same run on 2 blocks of the same shapes is what grows with the model, and must stay far
    below it (< 0.3x: a block or two and the allocator's slack). Then the same process loads
    the float model whole, which must show as > 0.9x: the measurement sees a whole model when
    there is one (above the resident memory before its load: the peaks before are past)."""
    _quiet()
    torch.manual_seed(0)
    for name, layers in (("warm", 2), ("llama", 12)):
        cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                                       num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / name, max_shard_size="50MB")
    folder = tmp_path / "llama"
    float_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert float_bytes > 160e6 and len(list(folder.glob("*.safetensors"))) >= 4
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "warm"), str(folder), str(tmp_path / "q.safetensors")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "streamed block by block (12 blocks of model.layers" in m["kind"]
    streamed, whole = (m["streamed"] - m["before"]) / float_bytes, (m["whole"] - m["resident"]) / float_bytes
    print(f"peak above the 2-block run: streamed {streamed:.2f}x; the whole float model then {whole:.2f}x above "
          f"the resident memory before it ({float_bytes / 1e6:.0f} MB)")
    assert streamed < 0.3, (streamed, whole)
    assert whole > 0.9, (streamed, whole)


def test_a_probe_cut_from_all_the_calibration_data_is_the_same_data():
    """The probe made of the first samples of the calibration data, when those are all of it, is
    run once with it block by block (its float outputs are the calibration batch's)."""
    from qlin_cli.data import batches
    from qlin_cli.sequential import _same

    calib = {"input_ids": torch.arange(24).reshape(4, 6), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    assert _same(next(batches(calib, 4)), calib) and _same(calib, calib)
    assert not _same(next(batches(calib, 3)), calib)  # fewer samples
    assert not _same({k: v.clone() for k, v in calib.items()}, calib)  # equal values, other tensors
    assert not _same(None, calib) and not _same(calib["input_ids"], calib)


def test_a_large_probe_is_compared_a_few_samples_at_a_time(folders, ids, tmp_path, monkeypatch):
    """A probe whose output is large (a language model's logits of long windows) is run and
    compared in parts, its float part spilled to disk until the int8 one is there: the error of
    the whole output, to float rounding."""
    import qlin_cli.sequential as sequential

    config, data = QuantConfig(kernel="pertoken"), dict(calib=ids, batch_size=4)
    a = quantize_checkpoint(folders / "llama", config, QuantizeOptions(output=tmp_path / "a.safetensors", **data))
    monkeypatch.setattr(sequential, "PROBE_VALUES", 2 * 12 * 128)  # 2 samples of 12 tokens x 128 logits
    parts, put = [], sequential.Spill.put
    monkeypatch.setattr(sequential.Spill, "put", lambda self, key, t: (key.startswith("\0probe") and parts.append(
        (key, t.shape[0]))) or put(self, key, t))
    b = quantize_checkpoint(folders / "llama", config, QuantizeOptions(output=tmp_path / "b.safetensors", stream=True,
                                                                       **data))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    # the float outputs of the 6 probe samples, spilled: the batches of 4 and 2 (--batch-size),
    # the first in parts of 2 samples
    assert parts == [("\0probe 0", 2), ("\0probe 1", 2), ("\0probe 2", 2)]
    assert b.probe.compared == a.probe.compared and b.probe.metrics.keys() == a.probe.metrics.keys()
    for key in ("sqnr_db", "cosine", "mse", "max_abs_err"):
        assert b.probe.metrics[key] == pytest.approx(a.probe.metrics[key], rel=1e-3), key
