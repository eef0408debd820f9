"""The `qlin` command line: quantize, inspect and eval end to end
on the sample models, exit codes, one-line errors, and the files written (or not written).

Most cases call `qlin_cli.cli.main([...])` in-process (it ends in sys.exit); a few run the real
entry point (`python -m qlin_cli`) to prove the exit code and that no traceback reaches stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from conftest import cli, cli_json, fbgemm_fallback
from warm_qlin import warm_subprocess_qlin
from qlin_cli.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
DIGITS_PT = SAMPLES / "digits_mlp.pt"
DIGITS_SD = SAMPLES / "digits_mlp.safetensors"
ENCODER_SD = SAMPLES / "encoder.safetensors"
TEST_INPUTS = SAMPLES / "digits_test.safetensors"
TEST_LABELS = SAMPLES / "digits_test_labels.safetensors"
CONFIGS = REPO / "configs"

DIGITS_LAYERS = ["0", "2", "4"]
DIGITS_SHAPES = [[256, 64], [256, 256], [10, 256]]

QUANTIZE_KEYS = {"source", "output", "config", "layers", "totals", "probe"}
INT8 = ("--kernel", "fbgemm")  # the sample models' layers are under the size `auto` quantizes
EVAL_KEYS = {
    "sqnr_db", "cosine", "max_abs_err", "mse", "top1_agreement", "accuracy_float", "accuracy_int8",
    "latency_float_ms", "latency_int8_ms", "speedup", "size_float_bytes", "size_int8_bytes",
}
INSPECT_QLIN_KEYS = {"name", "weight_shape", "scale_shape", "zero_point_shape", "granularity", "symmetric", "kernel"}


# ----------------------------------------------------------------------------- helpers


def subprocess_qlin(*args, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """A fresh `python -m qlin_cli`: where its imports are part of what is checked (nothing on
    stderr, --help, a traceback with --debug); the other entry-point tests fork a warm one."""
    return subprocess.run(
        [sys.executable, "-m", "qlin_cli", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def assert_one_error_line(err: str) -> str:
    """stderr is exactly one non-empty line starting with 'error:' and no traceback."""
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: "), err
    return lines[0]


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden temporaries included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.fixture(autouse=True)
def _isolate(isolate_imports):
    """Every test here may import factories: undo that afterwards."""


@pytest.fixture(scope="module")
def digits_q(tmp_path_factory) -> Path:
    """digits_mlp.pt quantized as the quick start does (the default options, the int8 kernel
    named), written once for the module."""
    out = tmp_path_factory.mktemp("digits_q") / "digits_mlp.int8.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(DIGITS_PT), "-o", str(out), *INT8])
    assert exc.value.code in (0, None)
    assert out.is_file()
    return out


# ----------------------------------------------------------------------------- quantize


def test_auto_keeps_layers_too_small_for_int8_float_and_says_so(tmp_path, capsys):
    """`auto` keeps a dynamic layer under 131,072 weights float, decided when
    quantizing (the file records it), so the table shows what runs: float, with the reason and
    the shape as (out, in); the summary counts them and a note says how to quantize them."""
    out = tmp_path / "q.safetensors"
    r = cli_json(capsys, "quantize", DIGITS_PT, "-o", out)
    assert [(l["status"], l["kernel"]) for l in r["layers"]] == [("skipped", None)] * 3
    for layer, shape in zip(r["layers"], ("(256, 64)", "(256, 256)", "(10, 256)")):
        assert layer["reason"] == (f"kept float for speed: a dynamic int8 layer under 131,072 weights is slower than "
                                   f"float on CPU {shape}; an explicit --kernel (e.g. fbgemm) quantizes it anyway")
    assert r["probe"]["sqnr_db"] == "inf"  # all float: the output is the float one
    plan = json.loads(metadata(out)["plan"])
    assert [e["status"] for e in plan] == ["skipped"] * 3 and plan[0]["reason"].startswith("kept float for speed")
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", out, "--force")
    assert code == 0 and "layers: 0 of 3 quantized, 3 kept float" in stdout and "dequant" not in stdout
    assert stderr.strip() == ("note: 3 of 3 Linear layers are too small for int8 to be faster than float and were kept "
                              "float (kernel auto); an explicit --kernel (e.g. fbgemm) quantizes every layer")


def test_quantize_pickled_module_json(tmp_path, capsys):
    """The quick start: the int8 kernel named, so the sample model's small layers are quantized."""
    out = tmp_path / "q.safetensors"
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", out, "--json", *INT8)
    assert code == 0, stderr
    r = json.loads(stdout)
    assert QUANTIZE_KEYS <= set(r)
    assert r["source"] == str(DIGITS_PT)
    assert r["output"] == str(out)
    assert r["source_kind"] == "pickled module"
    assert r["config"] == {
        "mode": "dynamic", "granularity": "channel", "bits": 8, "group_size": None, "symmetric": True,
        "act_granularity": "token", "kernel": "fbgemm", "skip": [], "observer": "minmax", "weight_observer": "minmax",
        "percentile": 99.99, "smooth": None, "layers": [], "embeddings": False,
    }
    assert [l["name"] for l in r["layers"]] == DIGITS_LAYERS
    assert [l["weight_shape"] for l in r["layers"]] == DIGITS_SHAPES
    assert [l["scale_shape"] for l in r["layers"]] == [[256], [256], [10]]
    for layer in r["layers"]:
        assert layer["status"] == "quantized"
        assert layer["granularity"] == "channel" and layer["symmetric"] is True
        assert layer["kernel"] in (fbgemm_fallback(), "fbgemm")  # fbgemm's fallback without VNNI
        assert layer["weight_sqnr_db"] > 30
        assert layer["bytes_int8"] < layer["bytes_float"] / 3
    t = r["totals"]
    assert t["layers_total"] == 3 and t["layers_quantized"] == 3 and t["layers_skipped"] == 0
    assert t["size_float_bytes"] == DIGITS_PT.stat().st_size
    assert t["size_int8_bytes"] == out.stat().st_size
    assert t["compression"] == pytest.approx(t["size_float_bytes"] / t["size_int8_bytes"])
    assert t["compression"] > 3
    assert t["kernels"] == {r["layers"][0]["kernel"]: 3}
    # the probe ran (a random batch: no --inputs) and the int8 model is close to the float one
    assert r["probe"]["sqnr_db"] > 25 and r["probe"]["cosine"] > 0.99
    # the file is a qlin file of format version 1 recording its source
    meta = metadata(out)
    assert meta["format"] == "qlin" and meta["format_version"] == "2"
    assert meta["source_name"] == "digits_mlp.pt" and meta["source_sha256"] == sha256(DIGITS_PT)
    ts = tensors(out)
    for name, shape in zip(DIGITS_LAYERS, DIGITS_SHAPES):
        assert ts[f"{name}.weight"].dtype == torch.int8 and list(ts[f"{name}.weight"].shape) == shape
        assert ts[f"{name}.weight_scale"].dtype == torch.float32
        assert tuple(ts[f"{name}.weight_scale"].shape) == (shape[0],)
        assert ts[f"{name}.weight_zero_point"].dtype == torch.int8
        assert ts[f"{name}.bias"].dtype == torch.float32
    assert not any(ts[f"{n}.weight_zero_point"].any() for n in DIGITS_LAYERS)  # symmetric: z = 0


def test_quantize_without_json_prints_table_and_writes_file(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, *INT8, "-o", out)
    assert code == 0, stderr
    assert out.is_file()
    for phrase in ("weight shape", "scale shape", "(256, 64)", "(10,)", "smaller", f"wrote {out}"):
        assert phrase in stdout


def test_quantize_granularity_tensor(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    r = cli_json(capsys, "quantize", DIGITS_PT, *INT8, "-o", out, "--granularity", "tensor")
    assert r["config"]["granularity"] == "tensor"
    assert [l["scale_shape"] for l in r["layers"]] == [[], [], []]
    assert [l["granularity"] for l in r["layers"]] == ["tensor"] * 3
    ts = tensors(out)
    for name in DIGITS_LAYERS:
        assert tuple(ts[f"{name}.weight_scale"].shape) == ()
        assert tuple(ts[f"{name}.weight_zero_point"].shape) == ()


def test_quantize_default_output_beside_input(tmp_path, capsys):
    src = tmp_path / "model.pt"
    shutil.copyfile(DIGITS_PT, src)
    code, stdout, stderr = cli(capsys, "quantize", src, "--json")
    assert code == 0, stderr
    expected = tmp_path / "model.int8.safetensors"
    assert json.loads(stdout)["output"] == str(expected)
    assert metadata(expected)["format"] == "qlin"
    # nothing else: no temporary file left behind by the atomic write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.safetensors", "model.pt"]


def test_quantize_state_dict_with_module_factory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "enc.safetensors"
    r = cli_json(
        capsys, "quantize", "sample_models/encoder.safetensors", "--model", "sample_models.encoder:build",
        "--inputs", "sample_models/digits_test.safetensors", "-o", out, *INT8,
    )
    assert r["source_kind"] == "safetensors state dict"
    assert r["totals"]["layers_quantized"] == 10 == len(r["layers"])
    assert r["probe"]["description"] == "64 samples of digits_test.safetensors"
    assert r["probe"]["sqnr_db"] > 30
    assert r["probe"]["cosine"] > 0.999
    assert r["totals"]["compression"] > 3
    assert metadata(out)["source_sha256"] == sha256(ENCODER_SD)


def test_quantize_state_dict_with_file_factory(tmp_path, capsys, monkeypatch):
    (tmp_path / "qlin_test_file_factory.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
    )
    torch.save(small_mlp().state_dict(), tmp_path / "sd.pt")
    monkeypatch.chdir(tmp_path)
    r = cli_json(capsys, "quantize", "sd.pt", "--model", "qlin_test_file_factory.py:build", "-o", "out.safetensors")
    assert r["source_kind"] == "state dict"
    assert [l["name"] for l in r["layers"]] == ["0", "2"]
    assert [l["weight_shape"] for l in r["layers"]] == [[16, 8], [4, 16]]
    assert metadata(tmp_path / "out.safetensors")["format"] == "qlin"


def test_quantize_digits_state_dict_matches_pickled_module(tmp_path, capsys, monkeypatch):
    """The same weights through the two source kinds give the same int8 tensors."""
    monkeypatch.chdir(REPO)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    cli_json(capsys, "quantize", DIGITS_PT, "-o", a)
    cli_json(capsys, "quantize", "sample_models/digits_mlp.safetensors",
             "--model", "sample_models.digits:build_digits_mlp", "-o", b)
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def test_quantize_weight_only(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    r = cli_json(capsys, "quantize", DIGITS_PT, "-o", out, "--mode", "weight-only")
    assert r["config"]["mode"] == "weight-only"
    assert r["config"]["act_granularity"] is None
    assert [l["kernel"] for l in r["layers"]] == ["weight_only"] * 3
    assert [l["mode"] for l in r["layers"]] == ["weight-only"] * 3
    assert r["totals"]["kernels"] == {"weight_only": 3}
    assert json.loads(metadata(out)["config"])["mode"] == "weight-only"


def test_quantize_asymmetric_has_nonzero_zero_points(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    r = cli_json(capsys, "quantize", DIGITS_PT, *INT8, "-o", out, "--asymmetric")
    assert r["config"]["symmetric"] is False
    assert [l["symmetric"] for l in r["layers"]] == [False] * 3
    ts = tensors(out)
    for name in DIGITS_LAYERS:
        zp = ts[f"{name}.weight_zero_point"]
        assert zp.dtype == torch.int8 and tuple(zp.shape) == (ts[f"{name}.weight"].shape[0],)
        assert zp.any(), f"{name}: all zero points are 0 with --asymmetric"
    assert r["probe"]["sqnr_db"] > 25


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm engine")
def test_quantize_kernel_fbgemm(tmp_path, capsys):
    from qlin_cli.kernels.common import reduce_range

    r = cli_json(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--kernel", "fbgemm")
    assert r["config"]["kernel"] == "fbgemm"
    assert r["config"]["act_granularity"] == "token"  # fbgemm runs per-token activations too
    if reduce_range():  # no VNNI: fbgemm's per-token codes would saturate; the request falls back, saying why
        assert {(l["kernel"], l["kernel_reason"]) for l in r["layers"]} == {
            (fbgemm_fallback(), "fallback: full-range uint8 activations can saturate fbgemm without VNNI")}
    else:
        assert [l["kernel"] for l in r["layers"]] == ["fbgemm"] * 3
    assert [l["act_granularity"] for l in r["layers"]] == ["token"] * 3
    assert all(l["batch_invariant"] for l in r["layers"])
    assert r["probe"]["sqnr_db"] > 25


def test_quantize_skip_regex(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    r = cli_json(capsys, "quantize", DIGITS_PT, *INT8, "-o", out, "--skip", "^2$")
    by_name = {l["name"]: l for l in r["layers"]}
    assert by_name["2"]["status"] == "skipped"
    assert "^2$" in by_name["2"]["reason"]
    assert by_name["2"]["kernel"] is None and by_name["2"]["scale_shape"] is None
    assert by_name["0"]["status"] == by_name["4"]["status"] == "quantized"
    assert r["config"]["skip"] == ["^2$"]
    assert r["totals"]["layers_skipped"] == 1 and r["totals"]["layers_quantized"] == 2
    ts = tensors(out)
    assert ts["2.weight"].dtype == torch.float32 and list(ts["2.weight"].shape) == [256, 256]
    assert "2.weight_scale" not in ts and "0.weight_scale" in ts


def test_quantize_skip_is_repeatable(tmp_path, capsys):
    r = cli_json(capsys, "quantize", DIGITS_PT, *INT8, "-o", tmp_path / "q.safetensors", "--skip", "^0$", "--skip", "^4$")
    assert [l["status"] for l in r["layers"]] == ["skipped", "quantized", "skipped"]
    assert r["config"]["skip"] == ["^0$", "^4$"]


def test_quantize_config_recipe(tmp_path, capsys):
    r = cli_json(capsys, "quantize", DIGITS_PT, *INT8, "-o", tmp_path / "q.safetensors",
                 "--config", CONFIGS / "per-tensor.toml")
    assert r["config"]["granularity"] == "tensor"
    assert r["config"]["act_granularity"] == "tensor"
    assert [l["scale_shape"] for l in r["layers"]] == [[], [], []]


def test_quantize_flag_overrides_recipe(tmp_path, capsys):
    r = cli_json(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "a.safetensors",
                 "--config", CONFIGS / "weight-only.toml")
    assert r["config"]["mode"] == "weight-only"
    r = cli_json(capsys, "quantize", DIGITS_PT, *INT8, "-o", tmp_path / "b.safetensors",
                 "--config", CONFIGS / "weight-only.toml", "--mode", "dynamic")
    assert r["config"]["mode"] == "dynamic"
    assert r["config"]["granularity"] == "channel"  # from the recipe
    assert all(l["mode"] == "dynamic" and l["kernel"] != "weight_only" for l in r["layers"])


def test_quantize_recipe_with_unknown_key(tmp_path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('mode = "dynamic"\ngranularity = "channel"\nbogus = 3\n')
    out = tmp_path / "q.safetensors"
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, *INT8, "-o", out, "--config", recipe)
    assert code == 1
    line = assert_one_error_line(stderr)
    assert f"{recipe}:3" in line and "'bogus'" in line
    assert stdout == ""
    assert not out.exists()


def test_quantize_report_json_and_markdown(tmp_path, capsys):
    report = tmp_path / "report.json"
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, *INT8, "-o", tmp_path / "q.safetensors",
                               "--report", report, "--json")
    assert code == 0, stderr
    data = json.loads(report.read_text())
    assert data == json.loads(stdout)  # the report file is the --json object
    assert [l["name"] for l in data["layers"]] == DIGITS_LAYERS
    md = (tmp_path / "report.md").read_text()
    assert md.startswith(f"# qlin quantize {DIGITS_PT} -> ")
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| layer |")]
    assert [r.split("|")[1].strip() for r in rows] == DIGITS_LAYERS
    assert "| (256, 64) | (256,) |" in md


def test_quantize_report_with_md_suffix_is_not_half_done(tmp_path, capsys):
    out, report = tmp_path / "q.safetensors", tmp_path / "r.md"
    code, _, stderr = cli(capsys, "quantize", DIGITS_PT, *INT8, "-o", out, "--report", report)
    if code == 0:  # accepted: then the twin is real Markdown and the JSON went somewhere else
        assert report.read_text().startswith("# qlin quantize report")
    else:  # refused: one line, before anything was written
        assert code == 1
        assert_one_error_line(stderr)
        assert not out.exists() and not report.exists()


def test_quantize_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for out in (a, b):
        cli_json(capsys, "quantize", DIGITS_PT, *INT8, "-o", out, "--asymmetric", "--skip", "^4$")
    assert a.read_bytes() == b.read_bytes()


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"keep me")
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", out)
    assert code == 1
    line = assert_one_error_line(stderr)
    assert str(out) in line and "--force" in line
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]

    code, _, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", out, "--force")
    assert code == 0, stderr
    assert metadata(out)["format"] == "qlin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]


def test_existing_report_without_force_writes_nothing(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    (tmp_path / "r.md").write_text("old")
    code, _, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", out, "--report", tmp_path / "r.json")
    assert code == 1
    assert "--force" in assert_one_error_line(stderr)
    assert not out.exists() and not (tmp_path / "r.json").exists()
    assert (tmp_path / "r.md").read_text() == "old"


def test_input_is_never_modified(tmp_path, capsys):
    src = tmp_path / "m.pt"
    shutil.copyfile(DIGITS_PT, src)
    os.utime(src, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = (src.read_bytes(), src.stat().st_mtime_ns, src.stat().st_mode)
    code, _, stderr = cli(capsys, "quantize", src)  # output beside the input
    assert code == 0, stderr
    code, _, stderr = cli(capsys, "quantize", src, "--force", "--asymmetric")
    assert code == 0, stderr
    assert (src.read_bytes(), src.stat().st_mtime_ns, src.stat().st_mode) == before
    assert (tmp_path / "m.int8.safetensors").is_file()


def write_net_module(tmp_path: Path, module: str, cls: str) -> Path:
    """Write `module.py` defining nn.Module class `cls` (one Linear(8, 4)) into tmp_path/helpers;
    returns that folder (to put on sys.path while pickling the class)."""
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / f"{module}.py").write_text(
        "from torch import nn\n\n"
        f"class {cls}(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(8, 4)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(x)\n"
    )
    return helpers


def test_trust_pickle_loads_module_of_own_class(tmp_path, capsys, monkeypatch):
    helpers = write_net_module(tmp_path, "qlin_test_trusted_net", "TrustedNet")
    monkeypatch.syspath_prepend(str(helpers))
    import qlin_test_trusted_net

    torch.save(qlin_test_trusted_net.TrustedNet(), tmp_path / "net.pt")
    r = cli_json(capsys, "quantize", tmp_path / "net.pt", "-o", tmp_path / "q.safetensors", "--trust-pickle")
    assert [l["name"] for l in r["layers"]] == ["fc"]
    assert r["source_kind"] == "pickled module"


# ----------------------------------------------------------------------------- inspect


def test_inspect_qlin_file(digits_q, capsys):
    info = cli_json(capsys, "inspect", digits_q)
    assert info["kind"] == "qlin"
    assert info["metadata"]["format"] == "qlin"
    assert info["metadata"]["format_version"] == "2"
    assert info["metadata"]["source_name"] == "digits_mlp.pt"
    assert info["metadata"]["source_sha256"] == sha256(DIGITS_PT)
    assert info["config"]["mode"] == "dynamic"
    layers = info["layers"]
    assert [l["name"] for l in layers] == DIGITS_LAYERS
    for layer, shape in zip(layers, DIGITS_SHAPES):
        assert INSPECT_QLIN_KEYS <= set(layer)
        assert layer["weight_shape"] == shape
        assert layer["weight_dtype"] == "int8"
        assert layer["scale_shape"] == layer["zero_point_shape"] == [shape[0]]
        assert layer["granularity"] == "channel"
        assert layer["symmetric"] is True
        assert isinstance(layer["kernel"], str) and layer["kernel"]
        assert 0 < layer["scale_min"] <= layer["scale_max"]


def test_inspect_qlin_file_table(digits_q, capsys):
    code, stdout, stderr = cli(capsys, "inspect", digits_q)
    assert code == 0, stderr
    assert "format_version: 2" in stdout and "3 Linear layers" in stdout and "int8 (256, 64)" in stdout


def test_inspect_shows_skipped_layers(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    cli_json(capsys, "quantize", DIGITS_PT, *INT8, "-o", out, "--skip", "^4$", "--granularity", "tensor")
    layers = {l["name"]: l for l in cli_json(capsys, "inspect", out)["layers"]}
    assert layers["4"]["status"] == "skipped" and "^4$" in layers["4"]["reason"]
    assert layers["0"]["scale_shape"] == layers["0"]["zero_point_shape"] == []
    assert layers["0"]["granularity"] == "tensor"


def test_inspect_float_checkpoint(capsys):
    info = cli_json(capsys, "inspect", DIGITS_PT)
    assert info["kind"].startswith("float")
    assert [l["name"] for l in info["layers"]] == DIGITS_LAYERS
    assert [l["weight_shape"] for l in info["layers"]] == DIGITS_SHAPES
    assert [l["scale_shape_per_tensor"] for l in info["layers"]] == [[], [], []]
    assert [l["scale_shape_per_channel"] for l in info["layers"]] == [[256], [256], [10]]


def test_inspect_shows_a_linear_512_1024s_scale_shape_per_tensor_and_per_channel(tmp_path, capsys):
    """A Linear(512, 1024) has weight (1024, 512); per tensor its scale shape
    is (), per channel (1024,)."""
    torch.manual_seed(0)
    src = tmp_path / "wide.pt"
    torch.save(nn.Sequential(nn.Linear(512, 1024)), src)
    (layer,) = cli_json(capsys, "inspect", src)["layers"]
    assert layer["name"] == "0"
    assert layer["weight_shape"] == [1024, 512]
    assert layer["scale_shape_per_tensor"] == []
    assert layer["scale_shape_per_channel"] == [1024]

    per_channel, per_tensor = tmp_path / "c.safetensors", tmp_path / "t.safetensors"
    cli_json(capsys, "quantize", src, "-o", per_channel)
    cli_json(capsys, "quantize", src, "-o", per_tensor, "--granularity", "tensor")
    (qc,) = cli_json(capsys, "inspect", per_channel)["layers"]
    (qt,) = cli_json(capsys, "inspect", per_tensor)["layers"]
    assert qc["weight_shape"] == qt["weight_shape"] == [1024, 512]
    assert qc["scale_shape"] == qc["zero_point_shape"] == [1024]
    assert qt["scale_shape"] == qt["zero_point_shape"] == []
    assert tuple(tensors(per_channel)["0.weight_scale"].shape) == (1024,)
    assert tuple(tensors(per_tensor)["0.weight_scale"].shape) == ()


# ----------------------------------------------------------------------------- eval


def test_eval_digits_accuracy(digits_q, capsys):
    r = cli_json(capsys, "eval", DIGITS_PT, digits_q, "--inputs", TEST_INPUTS, "--labels", TEST_LABELS,
                 "--repeats", "1")
    assert EVAL_KEYS <= set(r)
    assert r["samples"] == 450 and r["output_shape"] == [450, 10]
    assert r["accuracy_float"] > 0.95
    assert r["accuracy_float"] == pytest.approx(440 / 450)  # sample_models/README.md: 0.9778
    assert abs(r["accuracy_int8"] - r["accuracy_float"]) <= 0.01  # "within 1 point"
    assert r["top1_agreement"] > 0.98
    assert r["sqnr_db"] > 25 and r["cosine"] > 0.999
    assert 0 < r["max_abs_err"] and 0 < r["mse"] < r["max_abs_err"] ** 2
    assert r["latency_float_ms"] > 0 and r["latency_int8_ms"] > 0
    assert r["speedup"] == pytest.approx(r["latency_float_ms"] / r["latency_int8_ms"])
    assert r["size_float_bytes"] == DIGITS_PT.stat().st_size
    assert r["size_int8_bytes"] == digits_q.stat().st_size
    assert r["source_matches"] is True


def test_eval_without_labels(digits_q, capsys):
    r = cli_json(capsys, "eval", DIGITS_PT, digits_q, "--inputs", TEST_INPUTS, "--repeats", "1",
                 "--batch-size", "100")
    assert EVAL_KEYS <= set(r)
    assert r["accuracy_float"] is None and r["accuracy_int8"] is None
    assert r["top1_agreement"] is not None and r["top1_agreement"] > 0.98
    assert r["batch_size"] == 100


def test_eval_state_dict_source(digits_q, capsys, monkeypatch):
    """SOURCE takes --model as in quantize; the file then records another source file."""
    monkeypatch.chdir(REPO)
    r = cli_json(capsys, "eval", "sample_models/digits_mlp.safetensors", digits_q, "--model",
                 "sample_models.digits:build_digits_mlp", "--inputs", TEST_INPUTS, "--labels", TEST_LABELS,
                 "--repeats", "1")
    assert abs(r["accuracy_int8"] - r["accuracy_float"]) <= 0.01
    assert r["source_matches"] is False


def test_eval_labels_of_wrong_length(digits_q, tmp_path, capsys):
    labels = tmp_path / "labels.safetensors"
    save_file({"labels": torch.zeros(449, dtype=torch.int64)}, labels)
    code, stdout, stderr = cli(capsys, "eval", DIGITS_PT, digits_q, "--inputs", TEST_INPUTS, "--labels", labels)
    assert code == 1
    line = assert_one_error_line(stderr)
    assert "449" in line and "450" in line
    assert stdout == ""


def test_eval_inputs_of_wrong_shape(digits_q, tmp_path, capsys):
    inputs = tmp_path / "inputs.safetensors"
    save_file({"inputs": torch.zeros(10, 7)}, inputs)
    code, stdout, stderr = cli(capsys, "eval", DIGITS_PT, digits_q, "--inputs", inputs)
    assert code == 1
    line = assert_one_error_line(stderr)
    assert "(10, 7)" in line and "do not fit" in line
    assert stdout == ""


# ----------------------------------------------------------------------------- errors


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _state_dict_pt(tmp: Path) -> Path:
    torch.save(small_mlp().state_dict(), tmp / "sd.pt")
    return tmp / "sd.pt"


def _factory_file(tmp: Path) -> str:
    (tmp / "qlin_test_bad_factories.py").write_text(
        "def boom():\n    raise RuntimeError('kaboom')\n\n"
        "def not_a_module():\n    return 42\n\n"
        "NOT_CALLABLE = 3\n"
    )
    return "qlin_test_bad_factories.py"


# name -> (setup(tmp) -> argv after "quantize" with tmp-relative paths, expected phrases)
QUANTIZE_ERRORS = {
    "missing source": (lambda t: ["missing.pt"], ["missing.pt", "does not exist"]),
    "directory source": (lambda t: [(t / "adir").mkdir() or "adir"], ["adir", "is a folder but not a model folder (it has no config.json)"]),
    "empty file": (lambda t: [_write(t / "empty.pt", b"").name], ["empty.pt", "is empty"]),
    "random bytes .pt": (lambda t: [_write(t / "rnd.pt", random.Random(0).randbytes(4096)).name], ["rnd.pt"]),
    "random bytes .safetensors": (
        lambda t: [_write(t / "rnd.safetensors", random.Random(0).randbytes(4096)).name],
        ["rnd.safetensors", "not a valid safetensors file"],
    ),
    "no Linear layer": (
        lambda t: [torch.save(nn.Sequential(nn.ReLU()), t / "relu.pt") or "relu.pt"],
        ["relu.pt", "no nn.Linear layer"],
    ),
    "factory not importable": (
        lambda t: [_state_dict_pt(t).name, "--model", "nope.mod:fn"],
        ["--model 'nope.mod:fn'", "cannot import 'nope.mod'"],
    ),
    "factory spec without colon": (
        lambda t: [_state_dict_pt(t).name, "--model", "nocolon"],
        ["--model 'nocolon'", "package.module:factory"],
    ),
    "factory file missing": (
        lambda t: [_state_dict_pt(t).name, "--model", "nofile.py:build"],
        ["nofile.py", "does not exist"],
    ),
    "factory raises": (
        lambda t: [_state_dict_pt(t).name, "--model", _factory_file(t) + ":boom"],
        ["factory raised", "RuntimeError: kaboom"],
    ),
    "factory returns a non-module": (
        lambda t: [_state_dict_pt(t).name, "--model", _factory_file(t) + ":not_a_module"],
        ["returned int, not an nn.Module"],
    ),
    "factory not callable": (
        lambda t: [_state_dict_pt(t).name, "--model", _factory_file(t) + ":NOT_CALLABLE"],
        ["no callable 'NOT_CALLABLE'"],
    ),
    "factory of another architecture": (
        lambda t: [_state_dict_pt(t).name, "--model", "torch.nn:Identity"],
        ["does not fit --model torch.nn:Identity", "unexpected"],
    ),
    "state dict without --model": (lambda t: [_state_dict_pt(t).name], ["is a state dict", "--model"]),
    "qlin file as source": (
        lambda t: [shutil.copyfile(t.parent / "q.safetensors", t / "q.safetensors").name],
        ["already a qlin int8 file"],
    ),
    "output is the input": (
        lambda t: [shutil.copyfile(DIGITS_PT, t / "m.pt").name, "-o", "./m.pt"],
        ["is the input file"],
    ),
    "invalid skip regex": (lambda t: [str(DIGITS_PT), "--skip", "("], ["'('", "not a valid regex"]),
    "missing inputs file": (lambda t: [str(DIGITS_PT), "--inputs", "nope.safetensors"], ["inputs", "does not exist"]),
    "missing recipe": (lambda t: [str(DIGITS_PT), "--config", "nope.toml"], ["nope.toml", "does not exist"]),
    "output folder missing": (lambda t: [str(DIGITS_PT), "-o", "nodir/q.safetensors"], ["nodir", "does not exist"]),
}
if not torch.cuda.is_available():
    QUANTIZE_ERRORS["cuda without CUDA"] = (lambda t: [str(DIGITS_PT), "--device", "cuda"], ["CUDA is not available"])


@pytest.fixture
def err_dir(tmp_path, digits_q, monkeypatch):
    """A work folder (the cwd) beside a copy of a qlin file, for the error cases."""
    shutil.copyfile(digits_q, tmp_path / "q.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("case", list(QUANTIZE_ERRORS))
def test_quantize_errors(case, err_dir, capsys):
    setup, phrases = QUANTIZE_ERRORS[case]
    args = setup(err_dir)
    if "-o" not in args:
        args += ["-o", "out.safetensors"]
    before = files_in(err_dir)
    code, stdout, stderr = cli(capsys, "quantize", *args)
    assert code == 1
    line = assert_one_error_line(stderr)
    for phrase in phrases:
        assert phrase in line
    assert stdout == ""
    assert files_in(err_dir) == before  # nothing written, nothing changed


INSPECT_EVAL_ERRORS = {
    "inspect missing file": (["inspect", "missing.safetensors"], "does not exist"),
    "inspect random bytes": (["inspect", "rnd.safetensors"], "not a valid safetensors file"),
    "eval missing qlin file": (["eval", str(DIGITS_PT), "missing.safetensors", "--inputs", str(TEST_INPUTS)],
                               "does not exist"),
    "eval float file as qlin file": (["eval", str(DIGITS_PT), str(DIGITS_SD), "--inputs", str(TEST_INPUTS)],
                                     "not a qlin file"),
    "eval missing inputs": (["eval", str(DIGITS_PT), "q.safetensors", "--inputs", "nope.pt"], "does not exist"),
}


@pytest.mark.parametrize("case", list(INSPECT_EVAL_ERRORS))
def test_inspect_and_eval_errors(case, err_dir, capsys):
    shutil.copyfile(err_dir.parent / "q.safetensors", err_dir / "q.safetensors")
    _write(err_dir / "rnd.safetensors", random.Random(0).randbytes(4096))
    args, phrase = INSPECT_EVAL_ERRORS[case]
    before = files_in(err_dir)
    code, stdout, stderr = cli(capsys, *args)
    assert code == 1
    assert phrase in assert_one_error_line(stderr)
    assert stdout == ""
    assert files_in(err_dir) == before


def test_random_bytes_pt_is_called_not_a_checkpoint(tmp_path, capsys):
    src = _write(tmp_path / "rnd.pt", random.Random(0).randbytes(4096))
    code, _, stderr = cli(capsys, "quantize", src, "-o", tmp_path / "q.safetensors")
    assert code == 1
    line = assert_one_error_line(stderr)
    assert "not a PyTorch checkpoint" in line
    assert "--trust-pickle" not in line


USAGE_ERRORS = {
    "unknown --mode value": (["--mode", "foo"], "foo"),
    "unknown --granularity value": (["--granularity", "row"], "row"),
    "unknown option": (["--bogus"], "--bogus"),
    "--labels is not an option of quantize": (["--labels", "x"], "--labels"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_exit_2(case, tmp_path, capsys):
    extra, phrase = USAGE_ERRORS[case]
    out = tmp_path / "q.safetensors"
    code, stdout, stderr = cli(capsys, "quantize", DIGITS_PT, "-o", out, *extra)
    assert stdout == "" and not out.exists()
    line = assert_one_error_line(stderr)
    assert phrase in line and "internal error" not in line
    assert code == 2


def test_missing_argument_exit_2(capsys):
    code, _, stderr = cli(capsys, "eval", DIGITS_PT, "q.safetensors")  # no --inputs
    assert "inputs" in assert_one_error_line(stderr)
    assert "internal error" not in stderr
    assert code == 2


# ----------------------------------------------------------------------------- untrusted pickles


def test_module_of_own_class_needs_trust_pickle(tmp_path, capsys, monkeypatch):
    helpers = write_net_module(tmp_path, "qlin_test_custom_net", "CustomNet")
    with monkeypatch.context() as m:  # importable only while saving
        m.syspath_prepend(str(helpers))
        import qlin_test_custom_net

        torch.save(qlin_test_custom_net.CustomNet(), tmp_path / "net.pt")
        del sys.modules["qlin_test_custom_net"]
    with pytest.raises(ImportError):
        __import__("qlin_test_custom_net")
    out = tmp_path / "q.safetensors"
    code, stdout, stderr = cli(capsys, "quantize", tmp_path / "net.pt", "-o", out)
    assert code == 1
    line = assert_one_error_line(stderr)
    assert "qlin_test_custom_net.CustomNet" in line
    assert "--trust-pickle" in line and "--model" in line
    assert stdout == "" and not out.exists()
    # the same for inspect
    code, _, stderr = cli(capsys, "inspect", tmp_path / "net.pt")
    assert code == 1
    assert "--trust-pickle" in assert_one_error_line(stderr)


class _OpenMarker:
    """Unpickling this creates a file: `open(path, 'w')`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _SystemMarker:
    """Unpickling this runs a shell command: `os.system('touch path')`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [_OpenMarker, _SystemMarker])
@pytest.mark.parametrize("container", ["dict", "module attribute"])
def test_malicious_pickle_is_not_run(payload, container, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    src = tmp_path / "evil.pt"
    obj = payload(str(marker))
    if container == "dict":
        torch.save({"weight": torch.zeros(2, 2), "evil": obj}, src)
    else:
        model = nn.Sequential(nn.Linear(4, 2))
        model.evil = obj
        torch.save(model, src)
    assert not marker.exists()
    for cmd in (["quantize", src, "-o", tmp_path / "q.safetensors"], ["inspect", src]):
        code, _, stderr = cli(capsys, *cmd)
        assert code == 1
        line = assert_one_error_line(stderr)
        assert "--trust-pickle" in line
        assert not marker.exists()
    assert not (tmp_path / "q.safetensors").exists()


def test_malicious_legacy_torch_pickle_is_not_run(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    src = tmp_path / "evil.pt"
    torch.save({"evil": _OpenMarker(str(marker))}, src, _use_new_zipfile_serialization=False)
    code, _, stderr = cli(capsys, "quantize", src, "-o", tmp_path / "q.safetensors")
    assert code == 1
    assert "--trust-pickle" in assert_one_error_line(stderr)
    assert not marker.exists()


# ----------------------------------------------------------------------------- the real entry point


SUBPROCESS_ERRORS = {
    "missing source": (lambda t: ["missing.pt"], "does not exist"),
    "random bytes .safetensors": (
        lambda t: [_write(t / "rnd.safetensors", random.Random(1).randbytes(2048)).name],
        "not a valid safetensors file",
    ),
    "state dict without --model": (lambda t: [_state_dict_pt(t).name], "--model"),
    "factory not importable": (lambda t: [_state_dict_pt(t).name, "--model", "nope.mod:fn"], "cannot import"),
}


@pytest.mark.parametrize("case", list(SUBPROCESS_ERRORS))
def test_entry_point_error_has_no_traceback(case, tmp_path):
    setup, phrase = SUBPROCESS_ERRORS[case]
    args = setup(tmp_path)
    before = files_in(tmp_path)
    proc = warm_subprocess_qlin("quantize", *args, "-o", "out.safetensors", cwd=tmp_path)
    assert proc.returncode == 1
    assert phrase in assert_one_error_line(proc.stderr)
    assert proc.stdout == ""
    assert files_in(tmp_path) == before


def test_entry_point_malicious_pickle(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"evil": _SystemMarker(str(marker))}, tmp_path / "evil.pt")
    proc = warm_subprocess_qlin("quantize", "evil.pt", cwd=tmp_path)
    assert proc.returncode == 1
    line = assert_one_error_line(proc.stderr)
    assert "posix.system" in line and "--trust-pickle" in line
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


def test_entry_point_plain_pickle_file_one_line(tmp_path):
    import pickle

    marker = tmp_path / "MARKER"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"evil": _OpenMarker(str(marker))}, f, protocol=4)
    proc = warm_subprocess_qlin("quantize", "evil.pt", cwd=tmp_path)
    assert proc.returncode == 1
    assert not marker.exists()
    assert_one_error_line(proc.stderr)


def test_entry_point_usage_error(tmp_path):
    proc = warm_subprocess_qlin("quantize", DIGITS_PT, "--mode", "foo", "-o", tmp_path / "q.safetensors", cwd=REPO)
    assert "foo" in assert_one_error_line(proc.stderr)
    assert "internal error" not in proc.stderr
    assert proc.returncode == 2


def test_entry_point_debug_shows_traceback(tmp_path):
    proc = subprocess_qlin("quantize", "missing.pt", "--debug", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "InputError" in proc.stderr and "does not exist" in proc.stderr


def test_entry_point_quantize_json_clean_streams(tmp_path):
    out = tmp_path / "q.safetensors"
    proc = subprocess_qlin("quantize", DIGITS_PT, "-o", out, "--json", *INT8)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no warnings, no progress bar when stderr is not a terminal
    assert json.loads(proc.stdout)["output"] == str(out)
    assert metadata(out)["format"] == "qlin"


def test_entry_point_help():
    proc = subprocess_qlin("--help")
    assert proc.returncode == 0
    for command in ("quantize", "inspect", "eval"):
        assert command in proc.stdout


def test_without_the_fused_kernels_qlin_says_so_once_and_runs(tmp_path):
    """No C++ compiler (here: QLIN_NATIVE=0): the per-token layers run the torch-op path, the
    kernel reason says why, and one note on stderr says so."""
    from conftest import subprocess_qlin

    out = tmp_path / "q.safetensors"
    done = subprocess_qlin("quantize", DIGITS_PT, "-o", out, "--kernel", "onednn", "--json", QLIN_NATIVE="0")
    assert done.returncode == 0, done.stderr
    notes = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert notes == ["note: qlin runs without its fused kernels (turned off by QLIN_NATIVE=0): per-token and "
                     "static int8 layers use torch ops (the same results to float rounding, but slower) and "
                     "low-bit weight-only layers their dequantized float weight"]
    layers = json.loads(done.stdout)["layers"]
    from qlin_cli.kernels.common import reduce_range

    if reduce_range():  # no VNNI: onednn's first refusal, and fbgemm's per-token path saturates too
        expected = ("int_mm", "fallback: full-range uint8 activations can saturate without VNNI")
    else:
        expected = ("fbgemm", "fallback: turned off by QLIN_NATIVE=0")
    assert {(r["kernel"], r["kernel_reason"]) for r in layers} == {expected}
