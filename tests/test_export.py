"""compressed-tensors export: `qlin quantize ... --format compressed-tensors -o DIR`.

The folder is checked against compressed-tensors itself where it is installed (the dev extra
installs it): its QuantizationConfig pydantic model validates the config, and transformers
loads the folder through compressed-tensors (CompressedTensorsHfQuantizer), both with
`dequantize=True` and in compressed form; the decompressed weights must equal qlin's own
dequantized weights exactly (float32 models), and the loaded model's outputs must agree with
qlin's int8 model. The layout (names, dtypes, shapes) is checked without the package too.

B-bit and group-wise weights go in the pack-quantized layout; their tests (at the end)
unpack `weight_packed` by hand and compare qlin's int values bit for bit, and check the loaded
weights against `dequantize(q, scale, zero_point, group_size)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import SAMPLES, cli, cli_json, load_digits_mlp
from qlin_cli import QuantConfig, quantize_model
from qlin_cli.errors import ConfigError, OutputError
from qlin_cli.export import check_exportable, export_tensors, quantization_config, save_compressed_tensors
from qlin_cli.primitives import dequantize
from qlin_cli.qlinear import QuantizedLinear

VOCAB, TOKENS = 128, 12
INT8 = ("--kernel", "int_mm")  # these models' layers are under the size `auto` quantizes


def _ct():
    return pytest.importorskip("compressed_tensors")


def _transformers():
    tf = pytest.importorskip("transformers")
    _ct()
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama-style causal LM (head tied to the embedding) saved with save_pretrained, with a
    tokenizer-ish extra file, and an inputs file (input_ids + attention_mask)."""
    tf = pytest.importorskip("transformers")
    tf.utils.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("ct")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "llama")
    (root / "llama" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    ids = torch.randint(0, VOCAB, (6, TOKENS), generator=torch.Generator().manual_seed(1))
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, root / "ids.safetensors")
    return root / "llama", root / "ids.safetensors"


def _quantized(folder, inputs, config: QuantConfig | None = None, **options):
    from qlin_cli.hf import load_hf_folder

    source = load_hf_folder(folder)
    if config is None and "kernel" not in options and QuantConfig(**options).mode != "weight-only":
        options["kernel"] = "int_mm"  # the tiny models' layers are under the size `auto` quantizes
    config = config or QuantConfig(**options)
    calib = load_file(inputs) if config.mode == "static" else None
    return quantize_model(source.model, config, calib=calib), source


def _qlin_weights(model) -> dict[str, torch.Tensor]:
    """qlin's own dequantized weight of every QuantizedLinear, by module path."""
    return {
        name: dequantize(m.weight, m.weight_scale, m.weight_zero_point, m.scheme.group_size)
        for name, m in model.named_modules() if isinstance(m, QuantizedLinear)
    }


def _load(folder, dequantize: bool):
    tf = _transformers()
    kw = {"quantization_config": tf.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kw).eval()


def _cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).min())


# ----------------------------------------------------------------------------- CLI and layout


def test_cli_writes_a_compressed_tensors_folder(llama, tmp_path, capsys):
    folder, inputs = llama
    out = tmp_path / "ct"
    report = cli_json(capsys, "quantize", folder, "--format", "compressed-tensors", "-o", out, "--inputs", inputs, *INT8,
                      "--no-smooth")  # the layout of the plain export: norms as in the source (folding: test_default_smooth.py)
    assert report["format"] == "compressed-tensors" and report["output"] == str(out)
    assert report["probe"]["cosine"] > 0.99
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json",
    ]
    assert (out / "tokenizer_config.json").read_bytes() == (folder / "tokenizer_config.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((folder / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source_config
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    assert list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == "int-quantized"
    assert group["weights"] == {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                "strategy": "channel", "dynamic": False, "observer": "minmax"}
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": False, "group_size": None,
                                          "strategy": "token", "dynamic": True}  # asymmetric, as qlin computes
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert "lm_head.weight" not in tensors  # tied to model.embed_tokens.weight, as save_pretrained writes it
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.weight"].dtype == torch.int8 and tensors[f"{name}.weight"].shape == (64, 64)
    assert tensors[f"{name}.weight_scale"].dtype == torch.float32 and tensors[f"{name}.weight_scale"].shape == (64, 1)
    for suffix in ("weight_zero_point", "input_scale", "input_zero_point"):
        assert f"{name}.{suffix}" not in tensors
    float_state = load_file(folder / "model.safetensors")
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(tensors[key], float_state[key])


@pytest.mark.parametrize("config, weights, acts, fmt", [
    (dict(mode="static"), dict(symmetric=True, strategy="channel"),
     dict(symmetric=False, strategy="tensor", dynamic=False, observer="static_minmax"), "int-quantized"),
    (dict(mode="dynamic", granularity="tensor", symmetric=False, act_granularity="tensor"),
     dict(symmetric=False, strategy="tensor"), dict(symmetric=False, strategy="tensor", dynamic=True), "int-quantized"),
    (dict(mode="weight-only", symmetric=False), dict(symmetric=False, strategy="channel"), None, "naive-quantized"),
])
def test_schemes_and_layout(llama, tmp_path, config, weights, acts, fmt):
    folder, inputs = llama
    result, source = _quantized(folder, inputs, **config)
    out = save_compressed_tensors(result, tmp_path / "ct", source_dir=folder, source_sha256=source.sha256)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == fmt == group["format"]
    assert {k: group["weights"][k] for k in weights} == weights
    if acts is None:
        assert group["input_activations"] is None
    else:
        assert {k: group["input_activations"][k] for k in acts} == acts
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"  # (64, 128)
    scale_shape = (64, 1) if weights["strategy"] == "channel" else (1,)
    assert tensors[f"{name}.weight_scale"].shape == scale_shape
    if weights["symmetric"]:
        assert f"{name}.weight_zero_point" not in tensors
    else:
        zp = tensors[f"{name}.weight_zero_point"]
        assert zp.dtype == torch.int8 and zp.shape == scale_shape
    if config["mode"] == "static":
        assert tensors[f"{name}.input_scale"].shape == (1,) and tensors[f"{name}.input_scale"].dtype == torch.float32
        assert tensors[f"{name}.input_zero_point"].shape == (1,) and tensors[f"{name}.input_zero_point"].dtype == torch.int8
    else:
        assert f"{name}.input_scale" not in tensors and f"{name}.input_zero_point" not in tensors


# ----------------------------------------------------------------------------- compressed-tensors loads it


def test_config_validates_with_compressed_tensors(llama, tmp_path):
    ct = _ct()
    from compressed_tensors.quantization import QuantizationConfig

    folder, inputs = llama
    for config in (dict(), dict(mode="static"), dict(mode="weight-only")):
        result, _ = _quantized(folder, inputs, **config)
        qc = quantization_config(result)
        parsed = QuantizationConfig.model_validate(qc)
        assert parsed.quantization_status == "compressed" and parsed.ignore == ["lm_head"]
        dumped = parsed.model_dump()
        # compressed-tensors writes back exactly what qlin wrote (no field added, dropped or changed)
        assert {k: dumped[k] for k in qc} == qc, ct.__version__


def test_default_scheme_is_compressed_tensors_w8a8_preset(llama):
    """qlin's defaults (dynamic, per channel, symmetric weights, per-token activations) are the W8A8
    int8 scheme that compressed-tensors ships as a preset, except that qlin's activations are
    asymmetric (a per-token zero point, which vLLM's int8 W8A8 path also runs)."""
    _ct()
    from compressed_tensors.quantization import preset_name_to_scheme

    folder, inputs = llama
    result, _ = _quantized(folder, inputs)
    ours = quantization_config(result)["config_groups"]["group_0"]
    preset = preset_name_to_scheme("W8A8", ["Linear"]).model_dump()
    for key in ("targets", "output_activations"):
        assert ours[key] == preset[key]
    assert {k: v for k, v in ours["weights"].items() if k != "observer"} == preset["weights"]
    assert ours["input_activations"] == {**preset["input_activations"], "symmetric": False}


def test_bfloat16_model_scales_in_bfloat16(tmp_path):
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    result, _ = _quantized(tmp_path / "bf16", None)
    out = save_compressed_tensors(result, tmp_path / "ct", source_dir=tmp_path / "bf16")
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    dense = _load(out, dequantize=True)
    assert dense.dtype == torch.bfloat16
    for name, ours in _qlin_weights(result.model).items():
        theirs = dense.get_submodule(name).weight.detach().float()
        # the bfloat16 scale and product round twice: within 2 bfloat16 ulps of qlin's float32 dequantization
        assert ((theirs - ours).abs() <= ours.abs() * 2**-7).all(), name


@pytest.mark.parametrize("config", [
    dict(), dict(mode="static", kernel="int_mm"), dict(mode="dynamic", granularity="tensor", symmetric=False),
    dict(mode="weight-only", symmetric=False),
])
def test_transformers_loads_it_and_weights_equal_qlins(llama, tmp_path, config):
    folder, inputs = llama
    ids = load_file(inputs)
    result, source = _quantized(folder, inputs, **config)
    with torch.no_grad():
        qlin_out = result.model(**ids).logits
    out = save_compressed_tensors(result, tmp_path / "ct", source_dir=folder)
    ours = _qlin_weights(result.model)
    # dequantized at load time: plain float Linear layers holding the decompressed weights
    dense = _load(out, dequantize=True)
    assert dense.lm_head.weight is dense.model.embed_tokens.weight  # the tie is restored
    for name, module in dense.named_modules():
        if name in ours:
            assert torch.equal(module.weight.detach(), ours[name]), name
    # compressed: compressed-tensors decompresses on the first forward and fake-quantizes activations
    compressed = _load(out, dequantize=False)
    with torch.no_grad():
        ct_out = compressed(**ids).logits
    for name, module in compressed.named_modules():
        if name in ours:
            assert torch.equal(module.weight.detach(), ours[name]), name
    assert _cosine(qlin_out, ct_out) > 0.999
    if config.get("mode") == "static":  # same activation scale/zero point convention: closer to qlin than to float
        # (an int8 kernel is requested: auto keeps this tiny model's layers in float on CPU)
        from qlin_cli.hf import load_hf_folder

        with torch.no_grad():
            float_out = load_hf_folder(folder).model(**ids).logits
        assert (ct_out - qlin_out).abs().max() < (float_out - qlin_out).abs().max() / 2


def test_mixed_schemes_get_one_group_each(llama, tmp_path):
    folder, inputs = llama
    # static attention, weight-only MLPs, one layer float
    recipe = QuantConfig(mode="static", kernel="int_mm", layers=({"match": r"\.mlp\.", "mode": "weight-only", "kernel": "auto"},
                                                {"match": r"layers\.0\.self_attn\.o_proj$", "skip": True}))
    result, _ = _quantized(folder, inputs, recipe)
    qc = quantization_config(result)
    assert qc["format"] == "mixed-precision"
    groups = qc["config_groups"]
    assert [g["format"] for g in groups.values()] == ["int-quantized", "naive-quantized"]
    attn, mlp = (g["targets"] for g in groups.values())
    assert "model.layers.0.self_attn.q_proj" in attn and "model.layers.0.mlp.up_proj" in mlp
    assert not set(attn) & set(mlp) and len(attn) + len(mlp) == 13
    assert qc["ignore"] == ["model.layers.0.self_attn.o_proj", "lm_head"]
    if _ct():
        from compressed_tensors.quantization import QuantizationConfig

        QuantizationConfig.model_validate(qc)
    out = save_compressed_tensors(result, tmp_path / "ct", source_dir=folder)
    dense = _load(out, dequantize=True)
    ours = _qlin_weights(result.model)
    for name, module in dense.named_modules():
        if name in ours:
            assert torch.equal(module.weight.detach(), ours[name]), name
    assert torch.equal(dense.model.layers[0].self_attn.o_proj.weight,
                       load_file(folder / "model.safetensors")["model.layers.0.self_attn.o_proj.weight"])


# ----------------------------------------------------------------------------- qlin reads its folders back


@pytest.fixture(scope="module")
def llama_both(llama, tmp_path_factory):
    """The tiny Llama (head tied) quantized once by the CLI into a qlin file and once into a
    compressed-tensors folder, with the same options: (folder, inputs, qlin file, export)."""
    import contextlib
    import io

    from qlin_cli.cli import main

    folder, inputs = llama
    root = tmp_path_factory.mktemp("both")
    for out, fmt in ((root / "q.safetensors", "qlin"), (root / "ct", "compressed-tensors")):
        with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(io.StringIO()):
            # --no-smooth: the export folds SmoothQuant into the norms, the qlin file divides in the
            # kernel, so only unsmoothed runs give the same numbers both ways
            main(["quantize", str(folder), "-o", str(out), "--format", fmt, "--kernel", "int_mm", "--no-smooth"])
        assert exc.value.code in (0, None)
    return folder, inputs, root / "q.safetensors", root / "ct"


def test_inspect_an_export_as_the_qlin_file_it_matches(llama_both, capsys):
    """`qlin inspect` on the folder, or on its model.safetensors (not taken for a float state
    dict), shows the same layers, scales and kernels as the qlin file."""
    _, _, qfile, ct = llama_both
    q = cli_json(capsys, "inspect", qfile)
    for path in (ct, ct / "model.safetensors"):
        r = cli_json(capsys, "inspect", path)
        assert r["kind"] == "compressed-tensors"
        assert r["layers"] == q["layers"] and r["config"] == q["config"]
        assert r["metadata"]["container"].startswith("compressed-tensors folder (qlin ")
        assert r["metadata"]["source_sha256"] == q["metadata"]["source_sha256"]
    assert [l["name"] for l in r["layers"] if l["status"] == "skipped"] == ["lm_head"]
    code, out, err = cli(capsys, "inspect", ct)
    assert code == 0 and "compressed-tensors folder qlin wrote" in out


def test_eval_an_export_gives_the_qlin_files_numbers(llama_both, capsys):
    folder, inputs, qfile, ct = llama_both
    q = cli_json(capsys, "eval", folder, qfile, "--inputs", inputs, "--repeats", "1")
    r = cli_json(capsys, "eval", folder, ct, "--inputs", inputs, "--repeats", "1")
    for key in ("sqnr_db", "cosine", "max_abs_err", "top1_agreement", "kernels", "source_matches"):
        assert r[key] == q[key], key  # float32 scales: the same int8 model, bit for bit
    assert r["source_matches"] is True and r["sqnr_db"] > 20
    assert r["size_int8_bytes"] == sum(f.stat().st_size for f in ct.iterdir())


def test_load_quantized_from_an_export_into_an_empty_skeleton(llama_both):
    """The export stores the tied head once (as save_pretrained does); loading keeps the tie."""
    from qlin_cli import empty_weights, load_quantized

    tf = _transformers()
    folder, inputs, qfile, ct = llama_both
    ids = load_file(inputs)
    config = tf.AutoConfig.from_pretrained(folder)
    models = []
    for path in (qfile, ct):
        with empty_weights():
            skeleton = tf.LlamaForCausalLM(config)
        models.append(load_quantized(skeleton, path).eval())
    assert models[1].lm_head.weight is models[1].model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(models[0](**ids).logits, models[1](**ids).logits)


def test_export_metadata_is_the_qlin_files(llama_both):
    """The export's qlin metadata is the qlin file's own: same format version, config, plan and
    ties (the tied head, stored once by both)."""
    from qlin_cli.export import QLIN_FORMAT_VERSION

    _, _, qfile, ct = llama_both
    assert QLIN_FORMAT_VERSION == 2  # version 3 only adds int8 embedding tables, which the export refuses
    with safe_open(qfile, "pt") as f, safe_open(ct / "model.safetensors", "pt") as g:
        q, c = f.metadata(), g.metadata()
    assert (c["qlin_format_version"], c["qlin_config"], c["qlin_plan"], c["qlin_ties"]) == (
        q["format_version"], q["config"], q["plan"], q["ties"])
    assert json.loads(c["qlin_ties"]) == {"lm_head.weight": "model.embed_tokens.weight"}


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, False), (2, None, False), (8, 16, False), (4, None, True)])
def test_pack_quantized_layers_read_back_as_the_qlin_file_stores_them(bits, group, symmetric):
    """`from_export` inverts the export's pack-quantized layout exactly: the weight's words are
    the qlin file's packed rows padded to whole words (int8 values at 8 bits), and asymmetric
    zero points, packed along the outputs, unpack to qlin's."""
    from qlin_cli.export import _layer_tensors, from_export, layer_format
    from qlin_cli.files import QLIN_PLAN
    from qlin_cli.plan import Plan, PlanEntry
    from qlin_cli.kernels.lowbit import pack_bits
    from qlin_cli.scheme import LayerScheme

    scheme = LayerScheme(mode="weight-only", bits=bits, group_size=group, symmetric=symmetric)
    assert layer_format(scheme) == "pack-quantized"
    out_f, in_f = 24, 64
    entry = PlanEntry("l", in_f, out_f, False, "float32", scheme=scheme)
    gen = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (out_f, in_f), generator=gen, dtype=torch.int8)
    shape = scheme.granularity.scale_shape((out_f, in_f))
    scale = torch.rand(shape, generator=gen) + 0.1
    zp = torch.zeros(shape, dtype=torch.int8) if symmetric else torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8)
    tensors = dict(pair for key, t in (("l.weight", q), ("l.weight_scale", scale), ("l.weight_zero_point", zp))
                   for pair in _layer_tensors(entry, key, t))
    assert "l.weight_packed" in tensors and "l.weight" not in tensors
    _, back = from_export(Path("x"), {QLIN_PLAN: Plan((entry,)).to_json()}, tensors)
    assert sorted(back) == ["l.weight", "l.weight_scale", "l.weight_zero_point"]
    assert torch.equal(back["l.weight"], pack_bits(q, bits) if bits < 8 else q)
    assert torch.equal(back["l.weight_zero_point"], zp) and torch.equal(back["l.weight_scale"], scale)


def test_a_pack_quantized_export_evaluates_as_its_qlin_file(llama, tmp_path, capsys):
    """4-bit weights in groups of 32: the folder (pack-quantized) and the qlin file give the same
    int8 model, so the same numbers."""
    folder, inputs = llama
    for out, fmt in ((tmp_path / "q.safetensors", "qlin"), (tmp_path / "ct", "compressed-tensors")):
        cli_json(capsys, "quantize", folder, "-o", out, "--format", fmt, "--bits", "4", "--group-size", "32")
    q = cli_json(capsys, "eval", folder, tmp_path / "q.safetensors", "--inputs", inputs, "--repeats", "1")
    r = cli_json(capsys, "eval", folder, tmp_path / "ct", "--inputs", inputs, "--repeats", "1")
    assert (r["sqnr_db"], r["max_abs_err"], r["kernels"]) == (q["sqnr_db"], q["max_abs_err"], q["kernels"])
    layer = cli_json(capsys, "inspect", tmp_path / "ct")["layers"][0]
    assert layer["weight_dtype"] == "int4 (packed in uint8)" and layer["scale_shape"] == [64, 2]


def test_folders_qlin_cannot_read_say_why(llama_both, tmp_path, capsys):
    folder, inputs, _, ct = llama_both
    other = tmp_path / "other-ct"  # written by another tool: no qlin plan in its weights' metadata
    shutil.copytree(ct, other)
    tensors = load_file(other / "model.safetensors")
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    msg = _error(capsys, "inspect", other)
    assert "a compressed-tensors folder that this qlin did not write" in msg and "transformers loads it" in msg
    assert "this qlin did not write" in _error(capsys, "eval", folder, other, "--inputs", inputs)
    msg = _error(capsys, "quantize", ct, "-o", tmp_path / "x.safetensors")
    assert msg == f"error: {ct} is already quantized (compressed-tensors); pass the float model folder"
    assert "records no payload sha256" in _error(capsys, "inspect", ct, "--verify")


# ----------------------------------------------------------------------------- other sources, files, errors


def test_non_hf_source_gets_a_minimal_config(tmp_path, capsys):
    out = tmp_path / "digits-ct"
    cli_json(capsys, "quantize", SAMPLES / "digits_mlp.pt", "--format", "compressed-tensors", "-o", out, *INT8)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert list(config) == ["quantization_config"]
    assert config["quantization_config"]["config_groups"]["group_0"]["targets"] == ["Linear"]
    tensors = load_file(out / "model.safetensors")
    assert sorted(tensors) == sorted(f"{i}.{s}" for i in "024" for s in ("weight", "weight_scale", "bias"))
    float_model = load_digits_mlp()
    ours = _qlin_weights(quantize_model(float_model, QuantConfig(kernel="int_mm")).model)
    for i in "024":
        w = tensors[f"{i}.weight"].float() * tensors[f"{i}.weight_scale"]
        assert torch.equal(w, ours[i])


def test_same_input_same_bytes(llama, tmp_path, capsys):
    folder, inputs = llama
    for name in ("a", "b"):
        cli_json(capsys, "quantize", folder, "--format", "compressed-tensors", "-o", tmp_path / name, *INT8)
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def test_default_output_folder(llama, tmp_path, capsys):
    folder, _ = llama
    copy = tmp_path / "tiny.llama"
    shutil.copytree(folder, copy)
    report = cli_json(capsys, "quantize", copy, "--format", "compressed-tensors", *INT8)
    assert report["output"] == str(tmp_path / "tiny.llama-int8-compressed-tensors")


def _error(capsys, *args) -> str:
    code, out, err = cli(capsys, *args)
    assert code == 1 and out == "", err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path, capsys):
    out = tmp_path / "ct"
    args = ("quantize", SAMPLES / "digits_mlp.pt", "--format", "compressed-tensors", "-o", out)
    cli_json(capsys, *args, *INT8)
    (out / "stale.txt").write_text("from before")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "exists; pass --force" in _error(capsys, *args, "--mode", "weight-only")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    cli_json(capsys, *args, "--mode", "weight-only", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "naive-quantized"
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]  # no temporary folder left behind


def test_refuses_to_replace_what_is_not_a_model_folder(tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    args = ("quantize", SAMPLES / "digits_mlp.pt", "--format", "compressed-tensors", "--force", "-o")
    assert "not a model folder" in _error(capsys, *args, keep)
    assert (keep / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    assert "is not a folder" in _error(capsys, *args, tmp_path / "afile")
    assert "does not exist" in _error(capsys, *args, tmp_path / "missing" / "ct")


def test_refuses_the_source_folder_as_output(llama, tmp_path, capsys):
    folder, _ = llama
    copy = tmp_path / "src"
    shutil.copytree(folder, copy)
    before = sorted(p.name for p in copy.iterdir())
    msg = _error(capsys, "quantize", copy, "--format", "compressed-tensors", "-o", copy, "--force")
    assert "holds the input" in msg
    assert "holds the input" in _error(capsys, "quantize", copy, "--format", "compressed-tensors", "-o", tmp_path, "--force")
    assert sorted(p.name for p in copy.iterdir()) == before


def test_smoothquant_without_a_norm_to_fold_into_is_left_out_and_said(tmp_path, capsys):
    """The format cannot divide by SmoothQuant's factors inside the kernel; the MLP has no norm to
    fold them into, so they are left out (tests/test_default_smooth.py folds them into a Llama's
    norms), and the report says so, per layer and in the summary."""
    code, out, err = cli(capsys, "quantize", SAMPLES / "digits_mlp.pt", "--format", "compressed-tensors", "-o",
                         tmp_path / "ct", "--smooth", "0.5", "--calib", SAMPLES / "digits_calib.safetensors", *INT8)
    assert code == 0, err
    assert "exported without SmoothQuant: its input does not come straight from a LayerNorm/RMSNorm" in out
    assert "compressed-tensors: folded into the norm before 0 of them, the other 3 exported without it" in out
    assert not [k for k in load_file(tmp_path / "ct" / "model.safetensors") if "smooth" in k]


def test_unknown_format_is_a_usage_error(tmp_path, capsys):
    code, out, err = cli(capsys, "quantize", SAMPLES / "digits_mlp.pt", "--format", "gguf", "-o", tmp_path / "x")
    assert code == 2 and out == ""


def test_api_refuses_nothing_quantized(tmp_path):
    result = quantize_model(load_digits_mlp(), QuantConfig(skip=[".*"]))
    with pytest.raises(ConfigError, match="nothing to export"):
        save_compressed_tensors(result, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    with pytest.raises(OutputError):
        save_compressed_tensors(result, tmp_path / "missing" / "ct")


# ----------------------------------------------------------------------------- B-bit and group-wise weights
#
# Weight-only layers of fewer than 8 bits, or per group, are written in compressed-tensors'
# pack-quantized layout (the W4A16 / W8A16 form vLLM serves). The tests unpack `weight_packed`
# by hand from the layout's definition (value k of a row in bits k*B .. k*B + B - 1 of the row's
# little-endian int32 words, offset by 2^(B-1)), and load the folder through transformers and
# compressed-tensors, whose decompressed weights must equal qlin's dequantized ones.


@pytest.fixture(scope="module")
def llama128(tmp_path_factory):
    """A tiny Llama (hidden 128, MLP 256, head tied) whose every Linear takes a multiple of 128
    inputs, so group sizes 32, 64 and 128 all apply, and an inputs file."""
    tf = pytest.importorskip("transformers")
    tf.utils.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("ct128")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "llama")
    ids = torch.randint(0, VOCAB, (4, TOKENS), generator=torch.Generator().manual_seed(2))
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, root / "ids.safetensors")
    return root / "llama", root / "ids.safetensors"


def _unpack_by_hand(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 `(N, W)` -> int8 `(N, count)`: value k of a row is bits k*B .. k*B + B - 1 of the row
    read as one little-endian bit string of its words, minus 2^(B-1). Also checks that the bits
    past the last value are zero."""
    words = packed.to(torch.int64) & 0xFFFFFFFF  # each word as its unsigned 32-bit number
    n, w = words.shape
    assert w == -(-count * bits // 32)
    row = torch.zeros(n, dtype=torch.int64)
    out = torch.empty(n, count, dtype=torch.int64)
    for k in range(count):
        word, shift = divmod(k * bits, 32)
        u = words[:, word] >> shift
        if shift + bits > 32:  # a value across two words (not at B = 2, 4, 8, which divide 32)
            u = u | (words[:, word + 1] << (32 - shift))
        out[:, k] = u & ((1 << bits) - 1)
    end_word, end_shift = divmod(count * bits, 32)
    if end_shift:
        row = words[:, end_word] >> end_shift
    assert not row.any(), "bits set past the last value of a row"
    return (out - (1 << (bits - 1))).to(torch.int8)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_int32_is_the_documented_layout(bits):
    from qlin_cli.export import pack_int32

    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (7, 45), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    q[0, :3] = torch.tensor([lo, hi, 0])
    packed = pack_int32(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, -(-45 * bits // 32))
    assert torch.equal(_unpack_by_hand(packed, bits, 45), q)
    if bits == 4:  # value k in bits 4(k % 8) .. of word k // 8: the first word of row 0 holds 8 values
        first = sum(((int(v) + 8) & 0xF) << (4 * k) for k, v in enumerate(q[0, :8]))
        assert int(packed[0, 0]) & 0xFFFFFFFF == first
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    assert torch.equal(pack_to_int32(q, bits), packed), ct.__version__


def _layer(model, name) -> QuantizedLinear:
    m = model.get_submodule(name)
    assert isinstance(m, QuantizedLinear)
    return m


LOWBIT = [  # (bits, group_size, symmetric); group_size None: per channel, weight-only
    (4, 32, True), (4, 64, False), (4, 128, True), (4, 128, False), (8, 64, True), (8, 32, False),
    (4, None, True), (2, 32, False),
]


@pytest.mark.parametrize("bits, group_size, symmetric", LOWBIT)
def test_lowbit_layout_unpacks_to_qlins_values(llama128, tmp_path, bits, group_size, symmetric):
    folder, inputs = llama128
    options = dict(bits=bits, symmetric=symmetric)
    options.update(group_size=group_size) if group_size else options.update(mode="weight-only")
    result, _ = _quantized(folder, inputs, **options)
    out = save_compressed_tensors(result, tmp_path / "ct", source_dir=folder)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    assert group["format"] == "pack-quantized" and group["input_activations"] is None
    assert group["weights"] == {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
        "strategy": "group" if group_size else "channel", "dynamic": False, "observer": "minmax",
    }
    tensors = load_file(out / "model.safetensors")
    quantized = [e.name for e in result.plan.quantized]
    assert len(quantized) == 14
    for name in quantized:  # every layer, its zero point included (none may be mistaken for a tie)
        m = _layer(result.model, name)
        out_f, in_f = m.weight.shape
        groups = in_f // group_size if group_size else 1
        assert f"{name}.weight" not in tensors
        packed = tensors[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (out_f, in_f * bits // 32)
        assert torch.equal(_unpack_by_hand(packed, bits, in_f), m.weight), name  # bit for bit
        assert tensors[f"{name}.weight_shape"].tolist() == [out_f, in_f]
        assert tensors[f"{name}.weight_shape"].dtype == torch.int64
        scale = tensors[f"{name}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (out_f, groups)
        assert torch.equal(scale, m.weight_scale.reshape(out_f, groups))
        if symmetric:
            assert f"{name}.weight_zero_point" not in tensors
        else:  # packed along the output channels: (ceil(out * B / 32), groups)
            zp = tensors[f"{name}.weight_zero_point"]
            assert zp.dtype == torch.int32 and zp.shape == (-(-out_f * bits // 32), groups), name
            assert torch.equal(_unpack_by_hand(zp.t().contiguous(), bits, out_f).t(), m.weight_zero_point.reshape(out_f, groups))
    assert "lm_head.weight" not in tensors and "lm_head.weight_packed" not in tensors  # float, tied


def test_lowbit_config_validates_with_compressed_tensors(llama128):
    _ct()
    from compressed_tensors.quantization import QuantizationConfig

    folder, inputs = llama128
    for bits, group_size, symmetric in LOWBIT:
        options = dict(bits=bits, symmetric=symmetric)
        options.update(group_size=group_size) if group_size else options.update(mode="weight-only")
        result, _ = _quantized(folder, inputs, **options)
        qc = quantization_config(result)
        parsed = QuantizationConfig.model_validate(qc)
        assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
        scheme = parsed.config_groups["group_0"]
        assert scheme.format == "pack-quantized" and scheme.input_activations is None
        w = scheme.weights
        assert (w.num_bits, w.group_size, w.symmetric, w.type) == (bits, group_size, symmetric, "int")
        assert w.strategy == ("group" if group_size else "channel")
        dumped = parsed.model_dump()
        assert {k: dumped[k] for k in qc} == qc  # written back unchanged


def test_compressed_tensors_own_compressor_writes_the_same_tensors(llama128, tmp_path):
    """compressed-tensors' PackedQuantizationCompressor, given qlin's dequantized weight, scale and
    zero point, writes exactly the tensors qlin exported (packed weight and packed zero point)."""
    _ct()
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    folder, inputs = llama128
    result, _ = _quantized(folder, inputs, bits=4, group_size=32, symmetric=False)
    out = save_compressed_tensors(result, tmp_path / "ct", source_dir=folder)
    tensors = load_file(out / "model.safetensors")
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        m = _layer(result.model, name)
        theirs = compressor.compress({
            "weight": dequantize(m.weight, m.weight_scale, m.weight_zero_point, 32),
            "weight_scale": m.weight_scale, "weight_zero_point": m.weight_zero_point,
        }, scheme)
        assert sorted(theirs) == ["weight_packed", "weight_scale", "weight_shape", "weight_zero_point"]
        for key, t in theirs.items():
            assert torch.equal(t, tensors[f"{name}.{key}"]), (name, key)


@pytest.mark.parametrize("bits, group_size, symmetric", LOWBIT)
def test_transformers_loads_lowbit_and_weights_equal_qlins(llama128, tmp_path, bits, group_size, symmetric):
    folder, inputs = llama128
    ids = load_file(inputs)
    options = dict(bits=bits, symmetric=symmetric)
    options.update(group_size=group_size) if group_size else options.update(mode="weight-only")
    result, _ = _quantized(folder, inputs, **options)
    with torch.no_grad():
        qlin_out = result.model(**ids).logits
    out = save_compressed_tensors(result, tmp_path / "ct", source_dir=folder)
    ours = _qlin_weights(result.model)
    assert len(ours) == 14
    dense = _load(out, dequantize=True)
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    for name, w in ours.items():
        assert torch.equal(dense.get_submodule(name).weight.detach(), w), name
    with torch.no_grad():
        assert _cosine(qlin_out, dense(**ids).logits) > 0.9999
    try:
        compressed = _load(out, dequantize=False)
    except RuntimeError:
        if symmetric:
            raise
        pytest.xfail("transformers 5.24 + compressed-tensors 0.20 build the compressed model with an unpacked zero "
                     "point, while compressed-tensors' compressor writes it packed (as qlin does): dequantize=True only")
    with torch.no_grad():
        ct_out = compressed(**ids).logits  # decompresses on the first forward
    for name, w in ours.items():
        assert torch.equal(compressed.get_submodule(name).weight.detach(), w), name
    assert _cosine(qlin_out, ct_out) > 0.9999


def test_bfloat16_grouped_weights_round_once(tmp_path):
    """A bfloat16 model: the scales are stored in bfloat16 and compressed-tensors computes
    (q - z) * s in bfloat16, which is qlin's dequantization with the bfloat16 scale, rounded once."""
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    result, _ = _quantized(tmp_path / "bf16", None, bits=4, group_size=32, symmetric=False)
    out = save_compressed_tensors(result, tmp_path / "ct", source_dir=tmp_path / "bf16")
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    dense = _load(out, dequantize=True)
    assert dense.dtype == torch.bfloat16
    for name, m in result.model.named_modules():
        if isinstance(m, QuantizedLinear):
            ours = dequantize(m.weight, m.weight_scale.to(torch.bfloat16), m.weight_zero_point, 32).to(torch.bfloat16)
            assert torch.equal(dense.get_submodule(name).weight.detach(), ours), name


def test_mixed_int8_and_grouped_layers(llama128, tmp_path):
    """Dynamic int8 attention (int-quantized) beside 4-bit G=32 MLPs (pack-quantized): one config
    group each with its own format, "mixed-precision" at the top. compressed-tensors' route applies
    each group's scheme (transformers' dequantize=True reads every layer with the first group's
    scheme, so a mixed model loads compressed)."""
    folder, inputs = llama128
    recipe = QuantConfig(kernel="int_mm", layers=({"match": r"\.mlp\.", "bits": 4, "group_size": 32, "kernel": "auto"},))
    result, _ = _quantized(folder, inputs, recipe)
    qc = quantization_config(result)
    assert qc["format"] == "mixed-precision"
    attn, mlp = qc["config_groups"].values()
    assert (attn["format"], mlp["format"]) == ("int-quantized", "pack-quantized")
    assert attn["weights"]["num_bits"] == 8 and attn["input_activations"]["dynamic"] is True
    assert mlp["weights"]["group_size"] == 32 and mlp["input_activations"] is None
    assert "model.layers.0.mlp.up_proj" in mlp["targets"] and "model.layers.0.self_attn.q_proj" in attn["targets"]
    if _ct():
        from compressed_tensors.quantization import QuantizationConfig

        QuantizationConfig.model_validate(qc)
    out = save_compressed_tensors(result, tmp_path / "ct", source_dir=folder)
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32
    compressed = _load(out, dequantize=False)
    with torch.no_grad():
        compressed(**load_file(inputs))
    for name, w in _qlin_weights(result.model).items():
        assert torch.equal(compressed.get_submodule(name).weight.detach(), w), name


def test_lowbit_with_activations_stays_int_quantized(llama128):
    """Dynamic 4-bit (and 3-bit) layers: int-quantized (int8 storage, num_bits B), the format
    compressed-tensors infers when activations are quantized; no packing, so any width."""
    folder, inputs = llama128
    for bits in (4, 3):
        result, _ = _quantized(folder, inputs, bits=bits, mode="dynamic")
        group = quantization_config(result)["config_groups"]["group_0"]
        assert group["format"] == "int-quantized" and group["weights"]["num_bits"] == bits
        assert export_tensors(result)["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8


def test_lowbit_same_input_same_bytes(llama128, tmp_path, capsys):
    folder, _ = llama128
    for name in ("a", "b"):
        cli_json(capsys, "quantize", folder, "--format", "compressed-tensors", "-o", tmp_path / name,
                 "--bits", "4", "--group-size", "64", "--asymmetric")
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"


def test_group_that_does_not_divide_the_input_is_refused(tmp_path, capsys):
    # digits_mlp: layer '0' has 64 inputs; 48 does not divide them (a shorter last group)
    msg = _error(capsys, "quantize", SAMPLES / "digits_mlp.pt", "--format", "compressed-tensors", "-o", tmp_path / "ct",
                 "--bits", "4", "--group-size", "48")
    assert "'0'" in msg and "64 inputs" in msg and "--group-size 48" in msg
    assert not (tmp_path / "ct").exists()
    cli_json(capsys, "quantize", SAMPLES / "digits_mlp.pt", "-o", tmp_path / "d.safetensors", "--bits", "4",
             "--group-size", "48")  # the qlin format takes it


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_odd_width_packing_is_refused(tmp_path, capsys, bits):
    msg = _error(capsys, "quantize", SAMPLES / "digits_mlp.pt", "--format", "compressed-tensors", "-o", tmp_path / "ct",
                 "--bits", str(bits), "--group-size", "32")
    assert f"{bits}-bit" in msg and "--bits 2, 4 or 8" in msg
    assert not (tmp_path / "ct").exists()
    with pytest.raises(ConfigError, match="0.18"):
        check_exportable(quantize_model(load_digits_mlp(), QuantConfig(bits=bits, mode="weight-only")).plan)


def test_drop_tied_keeps_fresh_tensors_that_reuse_a_freed_address():
    """`file_tensors(drop_tied=True)` with tensors made on the fly and dropped after their
    contiguous copy (as the export's packed zero points are): a later tensor allocated at a freed
    one's address must not look tied to it (it dropped 8 of these 12 before)."""
    from qlin_cli.files import file_tensors

    def items():
        for i in range(12):
            yield f"k{i}", torch.full((1000, 3), i, dtype=torch.int32).t()  # a view, copied by file_tensors

    kept = file_tensors(items(), drop_tied=True)
    assert sorted(kept, key=lambda k: int(k[1:])) == [f"k{i}" for i in range(12)]
    assert all(int(t[0, 0]) == int(k[1:]) for k, t in kept.items())


def test_conv1d_layers_are_refused():
    """GPT-2's Conv1D layers (weight stored (in, out)) are not nn.Linear, which is what
    compressed-tensors quantizes: refused before any work, as the README says."""
    tf = _transformers()
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=1, n_head=4)
    torch.manual_seed(0)
    result = quantize_model(tf.GPT2LMHeadModel(cfg).eval(), QuantConfig(kernel="int_mm"))
    with pytest.raises(ConfigError, match="layer 'transformer.h.0.attn.c_attn' is a transformers Conv1D"):
        check_exportable(result.plan)


def test_lowbit_per_tensor_weight_only(llama128, tmp_path):
    """4-bit per tensor, asymmetric: pack-quantized with strategy "tensor"; its zero point stays
    an int8 `(1,)` (compressed-tensors packs zero points per group and per channel only)."""
    folder, inputs = llama128
    result, _ = _quantized(folder, inputs, bits=4, mode="weight-only", granularity="tensor", symmetric=False)
    group = quantization_config(result)["config_groups"]["group_0"]
    assert group["format"] == "pack-quantized" and group["weights"]["strategy"] == "tensor"
    out = save_compressed_tensors(result, tmp_path / "ct", source_dir=folder)
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"  # (128, 256)
    m = _layer(result.model, name)
    assert torch.equal(_unpack_by_hand(tensors[f"{name}.weight_packed"], 4, 256), m.weight)
    assert tensors[f"{name}.weight_scale"].shape == (1,)
    zp = tensors[f"{name}.weight_zero_point"]
    assert zp.dtype == torch.int8 and zp.shape == (1,) and int(zp) == int(m.weight_zero_point)
    ours = _qlin_weights(result.model)
    for dequantized in (True, False):
        model = _load(out, dequantize=dequantized)
        with torch.no_grad():
            model(**load_file(inputs))
        for name, w in ours.items():
            assert torch.equal(model.get_submodule(name).weight.detach(), w), (name, dequantized)
