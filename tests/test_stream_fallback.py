"""`--min-sqnr` and `--sensitivity` under `--stream` (sequential_fallback.py): the accuracy
fallback measured block by block, on a model whose weights stay on disk.

- the same steps (layer, width), the same file, and the whole-model run's SQNRs to float rounding:
  a Llama folder at 4 bits (widened to 8 bits), int8 put back in float, the sample encoder
  (a layer before its blocks, static mode);
- the sensitivities of every layer in one pass over the blocks, sets that agree up to a block
  sharing its run; split into several passes where the activations outgrow a block, with the
  same numbers;
- a layer used at two paths of a block, a kernel that is not batch-invariant (the probe then
  runs as one batch, as in the whole-model run), no calibration (the same report);
- AWQ with them is refused in one line before any work (and not streamed by itself).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, cli

transformers = pytest.importorskip("transformers")

from qlin_cli import QuantConfig  # noqa: E402
from qlin_cli.api import QuantizeOptions, quantize_checkpoint  # noqa: E402
from qlin_cli.plan import make_plan  # noqa: E402
from qlin_cli.sources import load_source  # noqa: E402
import qlin_cli.sequential_fallback as sequential_fallback  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    transformers.utils.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("stream_fallback")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )).save_pretrained(root / "llama", max_shard_size="100KB")
    save_file({"input_ids": torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(1))},
              root / "ids.safetensors")
    return root


def _both(src, config, tmp_path, **options):
    """The whole-model run and the block-by-block one, and whether their files are the same."""
    a = quantize_checkpoint(src, config, QuantizeOptions(output=tmp_path / "a.safetensors", **options))
    b = quantize_checkpoint(src, config, QuantizeOptions(output=tmp_path / "b.safetensors", stream=True, **options))
    assert "streamed block by block" in b.source_kind
    return a, b, (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def _same_fallback(a, b):
    fa, fb = a.fallback, b.fallback
    assert [(s.layer, s.to, s.from_bits) for s in fb.steps] == [(s.layer, s.to, s.from_bits) for s in fa.steps]
    assert fb.initial_sqnr_db == pytest.approx(fa.initial_sqnr_db, abs=1e-3)
    assert fb.final_sqnr_db == pytest.approx(fa.final_sqnr_db, abs=1e-3)
    assert [s.sqnr_db_after for s in fb.steps] == pytest.approx([s.sqnr_db_after for s in fa.steps], abs=1e-3)
    assert b.sensitivity.by_layer() == pytest.approx(a.sensitivity.by_layer(), abs=1e-3)
    assert [r.plan for r in b.layers] == [r.plan for r in a.layers]
    assert b.probe.metrics["sqnr_db"] == pytest.approx(a.probe.metrics["sqnr_db"], abs=1e-3)


CASES = {  # (config, dB above the all-quantized output SQNR to ask for, the steps' width)
    "4-bit g32 widened to 8 bits": (QuantConfig(mode="weight-only", bits=4, group_size=32, kernel="lowbit"), 4.0, "8-bit"),
    "int8 back to float": (QuantConfig(kernel="pertoken"), 6.0, "float"),
}


@pytest.mark.parametrize("config, above, to", CASES.values(), ids=CASES.keys())
def test_min_sqnr_block_by_block_takes_the_whole_model_steps(llama, tmp_path, config, above, to):
    data = dict(calib=llama / "ids.safetensors", batch_size=4)  # batches of 4 and 2
    first = quantize_checkpoint(llama / "llama", config, QuantizeOptions(output=tmp_path / "0.safetensors",
                                                                         sensitivity=True, **data))
    target = first.sensitivity.all_int8_sqnr_db + above
    a, b, same = _both(llama / "llama", config, tmp_path, min_sqnr=target, **data)
    assert same
    assert b.fallback.steps and b.fallback.final_sqnr_db >= target and {s.to for s in b.fallback.steps} >= {to}
    _same_fallback(a, b)


def test_min_sqnr_with_gptq_block_by_block_is_what_the_file_gives(llama, tmp_path):
    """GPTQ block by block (fed quantized outputs: its own file) widened to the target: the final
    output SQNR the fallback reports is the written file's, loaded and run on the eval data."""
    from safetensors.torch import load_file
    from qlin_cli.data import model_output
    from qlin_cli.primitives import sqnr_db
    from qlin_cli.qfile import load_quantized
    from qlin_cli.sources import load_source

    config = QuantConfig(mode="weight-only", bits=3, group_size=32, rounding="gptq", kernel="lowbit")
    data = dict(calib=llama / "ids.safetensors", batch_size=4)
    first = quantize_checkpoint(llama / "llama", config, QuantizeOptions(output=tmp_path / "0.safetensors", stream=True,
                                                                         sensitivity=True, **data))
    target = first.sensitivity.all_int8_sqnr_db + 5
    b = quantize_checkpoint(llama / "llama", config, QuantizeOptions(output=tmp_path / "b.safetensors", stream=True,
                                                                     min_sqnr=target, **data))
    steps = b.fallback.steps
    assert steps and b.fallback.final_sqnr_db >= target and {s.to for s in steps} == {"8-bit"}
    widened = {s.layer for s in steps}
    for r in b.layers:
        assert r.plan.scheme.bits == (8 if r.name in widened else 3)
        assert r.plan.scheme.rounding == ("rtn" if r.name in widened else "gptq")
    ids = load_file(llama / "ids.safetensors")
    float_model = load_source(llama / "llama").model
    loaded = load_quantized(load_source(llama / "llama").model, tmp_path / "b.safetensors")
    got = sqnr_db(model_output(float_model, ids, 4), model_output(loaded, ids, 4))
    assert got == pytest.approx(b.fallback.final_sqnr_db, abs=1e-3)


def test_sensitivity_block_by_block_in_one_pass(llama, tmp_path, monkeypatch):
    """Without data (the probe's token ids, no SmoothQuant): every layer's sensitivity in one
    pass, whose block runs are shared up to each layer's block: block i runs once float, once
    per layer in it, once per layer before it (the whole-model path: every block per layer)."""
    runs = []
    run_block = sequential_fallback._run_block
    monkeypatch.setattr(sequential_fallback, "_run_block", lambda block, calls, what: runs.append(what) or run_block(block, calls, what))
    config = QuantConfig(kernel="pertoken")
    a, b, same = _both(llama / "llama", config, tmp_path, sensitivity=True, default_smooth=False)
    assert same and b.fallback is None
    ranking = [(s.layer, s.alone_sqnr_db) for s in b.sensitivity.ranking]
    assert [n for n, _ in ranking] == [s.layer for s in a.sensitivity.ranking]
    assert [db for _, db in ranking] == pytest.approx([s.alone_sqnr_db for s in a.sensitivity.ranking], abs=1e-3)
    assert b.sensitivity.all_int8_sqnr_db == pytest.approx(a.sensitivity.all_int8_sqnr_db, abs=1e-3)
    assert b.sensitivity.data == a.sensitivity.data
    per_block = 7  # q k v o gate up down
    # passes: the float reference, all int8 (`measure`), the sensitivities
    reference, measure = runs[:3], runs[3:6]
    sens = runs[6:]
    assert reference == measure == [f"block model.layers.{i}" for i in range(3)]
    assert [sens.count(f"block model.layers.{i}") for i in range(3)] == [1 + per_block + i * per_block for i in range(3)]
    assert len(sens) < 3 * (3 * per_block + 1)  # the whole-model path's block runs


def test_passes_split_where_the_activations_outgrow_a_block(llama, tmp_path, monkeypatch):
    """Sets measured in several passes (the activations of more than two sets do not fit in a
    block's size, here forced) give the numbers of one pass."""
    config, data = QuantConfig(kernel="pertoken"), dict(calib=llama / "ids.safetensors", sensitivity=True)
    one = quantize_checkpoint(llama / "llama", config, QuantizeOptions(output=tmp_path / "1.safetensors", stream=True,
                                                                       **data))
    monkeypatch.setattr(sequential_fallback._Passes, "_per_pass", lambda self, calls: 2)
    passes = []
    real = sequential_fallback._Passes._pass
    monkeypatch.setattr(sequential_fallback._Passes, "_pass", lambda self, sets: passes.append(len(sets)) or real(self, sets))
    split = quantize_checkpoint(llama / "llama", config, QuantizeOptions(output=tmp_path / "2.safetensors", stream=True,
                                                                         **data))
    layers = len(one.sensitivity.ranking)
    # the reference and `measure` one set each (the first before the activations' size is known)
    assert passes == [1, 1, *[2] * (layers // 2), *([1] if layers % 2 else [])]
    assert split.sensitivity == one.sensitivity
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_sample_encoder_with_a_layer_before_its_blocks(tmp_path):
    """The sample encoder (state dict + `model`, static mode): its input projection runs before
    the blocks, its sensitivity measured from the capture on."""
    src = ROOT / "sample_models" / "encoder.safetensors"
    data = dict(model="sample_models.encoder:build", calib=ROOT / "sample_models" / "digits_calib.safetensors")
    config = QuantConfig(mode="static", kernel="pertoken")  # a named kernel quantizes these small layers
    first = quantize_checkpoint(src, config, QuantizeOptions(output=tmp_path / "0.safetensors", sensitivity=True, **data))
    assert first.sensitivity.ranking[0].layer  # measured
    a, b, same = _both(src, config, tmp_path, min_sqnr=first.sensitivity.all_int8_sqnr_db + 3, sensitivity=True, **data)
    assert same and b.fallback.steps
    _same_fallback(a, b)
    assert {"embed", "head"} <= {s.layer for s in b.sensitivity.ranking}  # before and after the blocks


def test_awq_with_min_sqnr_under_stream_is_refused(llama, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    code, stdout, err = cli(capsys, "quantize", llama / "llama", "-o", out, "--stream", "--bits", "4",
                            "--group-size", "32", "--mode", "weight-only", "--rounding", "awq", "--min-sqnr", "30",
                            "--calib", llama / "ids.safetensors")
    assert code == 1 and stdout == "" and len(err.strip().splitlines()) == 1, err
    assert "--stream cannot measure --min-sqnr with AWQ" in err
    assert not out.exists()


SHARED = """
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.proj = nn.Linear(d, d)
        self.proj_again = self.proj  # one layer, two paths

    def forward(self, x):
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))
        return x + self.proj_again(torch.tanh(self.proj(x)))

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)

def build():
    torch.manual_seed(0)
    return M()
"""


def test_a_layer_at_two_paths_of_a_block(tmp_path, isolate_imports):
    """A Linear called at two paths of its block (`proj`, `proj_again`) is float at both for the
    float reference and the sets without it: the whole-model run's steps and file."""
    (tmp_path / "shared.py").write_text(textwrap.dedent(SHARED))
    spec = f"{tmp_path / 'shared.py'}:build"
    import importlib.util
    spec_ = importlib.util.spec_from_file_location("shared_arch", tmp_path / "shared.py")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    save_file({k: v.clone().contiguous() for k, v in module.build().state_dict().items()}, tmp_path / "m.safetensors")
    save_file({"x": torch.randn(12, 6, 16, generator=torch.Generator().manual_seed(2))}, tmp_path / "calib.safetensors")
    config, data = QuantConfig(kernel="pertoken"), dict(model=spec, calib=tmp_path / "calib.safetensors", batch_size=4)
    first = quantize_checkpoint(tmp_path / "m.safetensors", config,
                                QuantizeOptions(output=tmp_path / "0.safetensors", sensitivity=True, **data))
    assert [r.plan.paths for r in first.layers if r.name == "blocks.0.proj"] == [["blocks.0.proj", "blocks.0.proj_again"]]
    a, b, same = _both(tmp_path / "m.safetensors", config, tmp_path, min_sqnr=first.sensitivity.all_int8_sqnr_db + 6,
                       sensitivity=True, **data)
    assert same and b.fallback.steps
    _same_fallback(a, b)


def test_a_kernel_that_is_not_batch_invariant_gets_the_probe_in_one_batch(llama, tmp_path):
    """Per-tensor activation scales (one per batch): the probe runs block by block as one batch,
    as the whole-model run runs it, and the error is the very same numbers."""
    from qlin_cli.sequential import probe_batch_size

    config = QuantConfig(act_granularity="tensor", kernel="int_mm")
    data = dict(calib=llama / "ids.safetensors", batch_size=4)
    a, b, same = _both(llama / "llama", config, tmp_path, **data)
    assert same and b.probe.metrics == a.probe.metrics
    plan = make_plan(load_source(llama / "llama").model, config)
    assert probe_batch_size(plan, torch.zeros(6, 3), 4) == 6
    assert probe_batch_size(make_plan(load_source(llama / "llama").model, QuantConfig(kernel="pertoken")),
                            torch.zeros(6, 3), 4) == 4


def test_without_calibration_the_report_is_the_whole_model_runs(llama, tmp_path):
    """--sensitivity alone on a plan that calibrates nothing: the blocks are quantized without a
    forward, so the report has no calibration and no per-layer output SQNR, as the whole run."""
    a, b, same = _both(llama / "llama", QuantConfig(kernel="pertoken"), tmp_path, sensitivity=True,
                       default_smooth=False)
    assert same and a.calibration is None and b.calibration is None
    assert [r.output_sqnr_db for r in b.layers] == [r.output_sqnr_db for r in a.layers]


def test_awq_with_sensitivity_is_not_streamed_by_itself(llama, monkeypatch, caplog):
    """A source larger than memory with AWQ and --sensitivity: a warning says why it cannot be
    streamed, and the whole model is used (no error for a --stream the user never gave)."""
    import logging
    from qlin_cli.jobs import options
    from qlin_cli.jobs.options import check_options

    monkeypatch.setattr(options, "_available_memory", lambda: 100)
    config = QuantConfig(mode="weight-only", bits=4, group_size=32, rounding="awq")
    with caplog.at_level(logging.WARNING, logger="qlin"):
        assert not check_options(llama / "llama", config, QuantizeOptions(sensitivity=True)).stream
    assert "cannot be streamed: `stream` cannot measure `sensitivity` with AWQ" in caplog.text
