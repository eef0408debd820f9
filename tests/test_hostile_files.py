"""Hostile and careless input, round 3 (issue 26): files and folders that lie, and paths that are
not what they seem. Each case goes through the real CLI and ends in one line on stderr and exit 1
(or a warning where the run is right to go on), with nothing damaged or created; where memory is
the point, the peak resident memory of a qlin subprocess is checked (test_hostile_input.py's
`run_measured`).

- a compressed-tensors folder whose config.json no longer says what the stored plan says;
- outputs that are symbolic links or lie in /dev, /proc, /sys (a fake "dev" folder stands in for
  /dev: the tests run as root, and the real /dev/stdout is only ever given where every write into
  /dev is made to fail first);
- the export's copies: only the files transformers reads, no link out of the folder, streamed,
  within --max-memory;
- packed tensors of the wrong size, recipes and configs nested too deep, a config.json whose sizes
  do not fit the weights, a float checkpoint given as the quantized model;
- --stream applies the default SmoothQuant (block by block); temporaries that SIGKILL left removed by the next write;
- gradients that stop at quantized layers, warned about once.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qlin_cli.files
import qlin_cli.qlinear
from conftest import ModuleWith, assert_one_error_line, cli, files_in, qlin_env
from qlin_cli import QuantConfig, quantize_model
from qlin_cli.errors import FormatError, OutputError
from test_hostile_input import baseline_mb, run_measured  # noqa: F401 (a fixture)

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
DIGITS_PT = REPO / "sample_models" / "digits_mlp.pt"
DIGITS_TEST = REPO / "sample_models" / "digits_test.safetensors"

pytestmark = pytest.mark.usefixtures("isolate_imports")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny Llama folder, token ids for it, and two compressed-tensors exports of it (int8
    dynamic; 4-bit weight-only per group of 16, asymmetric: packed weights and zero points)."""
    transformers.utils.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hostile_files")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    llama.save_pretrained(root / "llama")
    save_file({"input_ids": torch.randint(0, 128, (4, 16))}, root / "ids.safetensors")
    for name, extra in (("ct", ["--kernel", "fbgemm"]),
                        ("ct4", ["--mode", "weight-only", "--bits", "4", "--group-size", "16", "--asymmetric"])):
        _run("quantize", root / "llama", "--format", "compressed-tensors", "-o", root / name, *extra)
    return root


def _run(*args) -> str:
    import contextlib
    import io

    from qlin_cli.cli import main

    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(io.StringIO()) as out:
        main([str(a) for a in args])
    assert exc.value.code in (0, None)
    return out.getvalue()


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ----------------------------------------------------------------------------- item 2


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))


CONFIG_EDITS = {
    "symmetric flipped": (lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False),
                          "config_groups.group_0.weights.symmetric (false; the plan gives true)"),
    "a layer added to ignore": (lambda q: q["ignore"].append("model.layers.0.mlp.down_proj"), "at ignore ("),
    "num_bits changed": (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4),
                         "config_groups.group_0.weights.num_bits (4; the plan gives 8)"),
    "activations made static": (lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False),
                                "input_activations.dynamic"),
    "a sparsity config added": (lambda q: q.update(sparsity_config={"format": "sparse-24"}),
                                "sparsity_config ({\"format\": \"sparse-24\"}; the plan has no such field)"),
    "targets emptied": (lambda q: q["config_groups"]["group_0"].update(targets=[]), "group_0.targets"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_a_config_that_disagrees_with_the_stored_plan_is_refused(case, models, tmp_path, capsys):
    """transformers loads the layers as config.json says, qlin as the plan says: with `symmetric`
    flipped transformers ran at -6.9 dB while `qlin eval` reported 36.6 dB."""
    edit, field = CONFIG_EDITS[case]
    folder = _copy_folder(models / "ct", tmp_path / "ct")
    _edit_config(folder, edit)
    before = files_in(tmp_path)
    for args in (["inspect", folder], ["eval", models / "llama", folder, "--inputs", models / "ids.safetensors"]):
        code, out, err = cli(capsys, *args)
        assert code == 1 and out == "", err
        line = assert_one_error_line(err)
        assert "config.json's quantization_config disagrees with the plan qlin stored" in line and field in line, line
    with pytest.raises(FormatError, match="disagrees with the plan"):  # the Python API reads it the same way
        from qlin_cli.qfile import read_qfile

        read_qfile(folder / "model.safetensors")
    assert files_in(tmp_path) == before


def test_an_unedited_export_still_reads(models, capsys):
    for name in ("ct", "ct4"):
        code, out, err = cli(capsys, "inspect", models / name)
        assert code == 0, err


# ----------------------------------------------------------------------------- item 3


def test_an_output_that_is_a_symlink_is_never_replaced(tmp_path, capsys):
    for name in ("q.safetensors", "r.json", "r.md", "ct"):
        (tmp_path / f"{name}.target").write_bytes(b"someone else's file")
        (tmp_path / name).symlink_to(tmp_path / f"{name}.target")
    before = files_in(tmp_path)
    cases = [["-o", tmp_path / "q.safetensors"], ["-o", tmp_path / "o.safetensors", "--report", tmp_path / "r.json"],
             ["-o", tmp_path / "ct", "--format", "compressed-tensors"]]
    for args in cases:
        for force in ([], ["--force"]):
            code, out, err = cli(capsys, "quantize", DIGITS_PT, *args, *force)
            assert code == 1 and out == "", err
            assert "is a symbolic link" in assert_one_error_line(err), err
    assert files_in(tmp_path) == before
    assert all((tmp_path / n).is_symlink() for n in ("q.safetensors", "r.json", "r.md", "ct"))


def test_a_link_that_appears_before_the_rename_is_not_replaced(tmp_path):
    """write_atomic looks again just before it replaces the file."""
    target = tmp_path / "target.bin"
    target.write_bytes(b"kept")
    (tmp_path / "out.bin").symlink_to(target)
    with pytest.raises(OutputError, match="is a symbolic link"):
        qlin_cli.files.write_atomic(tmp_path / "out.bin", b"new", force=True)
    assert (tmp_path / "out.bin").is_symlink() and target.read_bytes() == b"kept"
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "target.bin"]  # and no temporary
    (tmp_path / "folder").symlink_to(tmp_path)
    with pytest.raises(OutputError, match="is a symbolic link"):
        qlin_cli.files.write_folder_atomic(tmp_path / "folder", {"a": b"1"}, force=True)
    assert (tmp_path / "folder").is_symlink()


@pytest.fixture
def fake_dev(tmp_path, monkeypatch) -> Path:
    """A folder that qlin treats as /dev: `stdout` in it links to a regular file, as /dev/stdout
    does when a program's output goes to a file."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (tmp_path / "captured.txt").write_text("the shell's redirected output\n")
    (dev / "stdout").symlink_to(tmp_path / "captured.txt")
    (tmp_path / "into-dev").symlink_to(dev)
    monkeypatch.setattr(qlin_cli.files, "SYSTEM_FOLDERS", (str(dev),))
    return dev


@pytest.mark.parametrize("where", ["--report", "-o"])
def test_report_to_dev_stdout_with_force_damages_nothing(where, fake_dev, tmp_path, capsys):
    """`--report /dev/stdout --force`, as root, replaced the /dev/stdout link with a regular file
    and created /dev/stdout.md."""
    before = files_in(tmp_path)
    other = ["-o", tmp_path / "q.safetensors"] if where == "--report" else ["--report", tmp_path / "r.json"]
    for path, phrase in ((fake_dev / "stdout", f"is in {fake_dev}"),
                         (tmp_path / "into-dev" / "r.json", f"is in {fake_dev}"),  # through a link to the folder
                         (tmp_path / "into-dev" / "stdout", f"is in {fake_dev}")):
        code, out, err = cli(capsys, "quantize", DIGITS_PT, where, path, *other, "--force")
        assert code == 1 and out == "", err
        line = assert_one_error_line(err)
        assert phrase in line and "even with --force" in line, line
    assert files_in(tmp_path) == before
    assert (fake_dev / "stdout").is_symlink() and sorted(os.listdir(fake_dev)) == ["stdout"]


def test_the_real_dev_stdout_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """The real /dev/stdout, --force: every call that could write, rename or remove anything in
    /dev fails the test instead (so a regression damages nothing)."""
    def guard(name):
        real = getattr(os, name)

        def fn(*args, **kwargs):
            if any(str(a).startswith("/dev") or str(a).startswith("/proc") for a in args):
                raise AssertionError(f"os.{name}{args} reached")
            return real(*args, **kwargs)
        return fn

    monkeypatch.setattr(qlin_cli.files, "os", ModuleWith(os, **{n: guard(n) for n in (
        "open", "replace", "rename", "link", "unlink", "mkdir", "chmod")}))
    code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--report", "/dev/stdout", "--force")
    assert code == 1 and out == ""
    assert "output /dev/stdout is in /dev" in assert_one_error_line(err)
    assert os.listdir(tmp_path) == []
    code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", "/proc/self/fd/1", "--force")
    assert code == 1 and "is in /proc" in assert_one_error_line(err)


# ----------------------------------------------------------------------------- item 4


def test_the_export_copies_only_what_transformers_reads_and_no_link_out(models, tmp_path, capsys):
    """README.md -> /etc/passwd and special_tokens_map.json -> /proc/self/environ were copied into
    the export as files, environment secrets included, and a 3 GB notes file read whole."""
    src = _copy_folder(models / "llama", tmp_path / "src")
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "SECRET"}')
    (src / "README.md").symlink_to(secret)
    (src / "special_tokens_map.json").symlink_to(secret)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (src / "notes.txt").write_text("not a file transformers reads\n")
    (src / "modeling_evil.py").write_text("import os\n")
    code, out, err = cli(capsys, "quantize", src, "--format", "compressed-tensors", "-o", tmp_path / "out", "--kernel", "fbgemm")
    assert code == 0, err
    assert err.strip().splitlines() == [
        f"warning: {src / 'special_tokens_map.json'} is not copied into the export: it leads to {secret}, outside the folder"]
    out_dir = tmp_path / "out"
    assert sorted(os.listdir(out_dir)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    assert (out_dir / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    assert not any(b"SECRET" in f.read_bytes() for f in out_dir.iterdir())


def test_a_hugging_face_cache_snapshot_is_copied_through_its_blob_links(models, tmp_path, capsys):
    repo = tmp_path / "models--x--llama"
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in (models / "llama").iterdir():  # every file of a snapshot is a link to its blob
        (repo / "blobs" / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f.name))
    (repo / "blobs" / "tok").write_text('{"model_max_length": 64}\n')
    (snap / "tokenizer_config.json").symlink_to(Path("..", "..", "blobs", "tok"))
    code, out, err = cli(capsys, "quantize", snap, "--format", "compressed-tensors", "-o", tmp_path / "out", "--kernel", "fbgemm")
    assert code == 0 and err == "", err
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}\n'
    assert not (tmp_path / "out" / "tokenizer_config.json").is_symlink()


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_the_export_streams_its_copies_within_max_memory(models, tmp_path, baseline_mb):
    src = _copy_folder(models / "llama", tmp_path / "src")
    _sparse(src / "tokenizer.json", 200 * 2**20)
    before = sorted(os.listdir(src))
    code, out, err, _ = run_measured("quantize", src, "--format", "compressed-tensors", "-o", tmp_path / "small",
                                     "--kernel", "fbgemm", "--max-memory", "100MB", cwd=tmp_path)
    assert code == 1 and out == ""
    line = assert_one_error_line(err)
    assert "the files the export copies take 209.7 MB (tokenizer.json: 209.7 MB), more than --max-memory 100.0 MB" in line
    assert not (tmp_path / "small").exists() and sorted(os.listdir(tmp_path)) == ["src"]
    code, out, err, peak = run_measured("quantize", src, "--format", "compressed-tensors", "-o", tmp_path / "big",
                                        "--kernel", "fbgemm", cwd=tmp_path)
    assert code == 0, err
    assert (tmp_path / "big" / "tokenizer.json").stat().st_size == 200 * 2**20
    assert peak < baseline_mb + 150, f"peak {peak:.0f} MB, baseline {baseline_mb:.0f} MB: the 200 MB file was read whole"
    assert sorted(os.listdir(src)) == before


# ----------------------------------------------------------------------------- item 11


def _retensor(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=meta)


PACKED = {
    "zero point of the wrong size": (lambda t: t.update({"model.layers.0.mlp.down_proj.weight_zero_point": torch.zeros(3, 5, dtype=torch.int32)}),
                                     "model.layers.0.mlp.down_proj.weight_zero_point is torch.int32 (3, 5), the plan says torch.int32 (8, 8)"),
    "packed weight of no rows": (lambda t: t.update({"model.layers.0.mlp.up_proj.weight_packed": torch.zeros(0, 8, dtype=torch.int32)}),
                                 "model.layers.0.mlp.up_proj.weight_packed is torch.int32 (0, 8), the plan says torch.int32 (128, 8)"),
}


@pytest.mark.parametrize("case", list(PACKED))
def test_packed_tensors_of_the_wrong_size_are_one_line(case, models, tmp_path, capsys):
    """A view/stride RuntimeError before ('internal error')."""
    change, phrase = PACKED[case]
    folder = _copy_folder(models / "ct4", tmp_path / "ct4")
    _retensor(folder, change)
    code, out, err = cli(capsys, "inspect", folder)
    assert code == 1 and phrase in assert_one_error_line(err), err


def test_nesting_and_size_in_recipes_and_configs_are_one_line(models, tmp_path, capsys):
    (tmp_path / "deep.toml").write_text("a = " + "[" * 50000 + "]" * 50000 + "\n")  # RecursionError before
    (tmp_path / "big.toml").write_text("# " + "x" * 1_100_000 + "\n")
    (tmp_path / "long.toml").write_text('mode = "' + "x" * 500_000 + '"\n')
    for recipe, phrase in (("deep.toml", "nests arrays or tables deeper than qlin reads"),
                           ("big.toml", "takes 1,100,003 bytes; a recipe is a few keys"),
                           ("long.toml", "is not valid: use one of dynamic, weight-only, static")):
        code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--config", tmp_path / recipe)
        assert code == 1, err
        line = assert_one_error_line(err)
        assert phrase in line and len(line) < 500, line[:300]
    deep = _copy_folder(models / "llama", tmp_path / "deep")
    (deep / "config.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    code, out, err = cli(capsys, "inspect", deep)
    assert code == 1 and "config.json" in assert_one_error_line(err)
    assert not (tmp_path / "q.safetensors").exists()


# ----------------------------------------------------------------------------- item 13


def test_a_config_whose_sizes_do_not_fit_the_weights(tmp_path, baseline_mb):
    """max_position_embeddings 1.5e9 in a BERT config: transformers said 'For details look at the
    above report!', and there was no report."""
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1_500_000_000}))
    before = files_in(tmp_path)
    code, out, err, peak = run_measured("inspect", tmp_path / "bert", cwd=tmp_path)
    assert code == 1 and out == ""
    line = assert_one_error_line(err)
    assert "bert" in line and "config.json" in line and "above report" not in line, line
    assert files_in(tmp_path) == before
    assert peak < baseline_mb + 400, f"peak {peak:.0f} MB"  # the config declares 384 GB


def test_a_float_checkpoint_given_as_the_quantized_model(tmp_path, capsys):
    code, out, err = cli(capsys, "eval", DIGITS_PT, DIGITS_PT, "--inputs", DIGITS_TEST)
    assert code == 1 and out == ""
    line = assert_one_error_line(err)
    assert f"{DIGITS_PT}: a PyTorch checkpoint (torch.save), not a qlin file: give the .safetensors file" in line
    assert "header length" not in line


# ----------------------------------------------------------------------------- item 14


def test_stream_applies_the_default_smoothquant_block_by_block(models, tmp_path, capsys):
    """The streamed file once differed from the whole-model one without a word (the default
    SmoothQuant was left out); now it runs block by block: the same file, byte for byte, and
    with --no-smooth both are the unsmoothed one (README)."""
    streamed, whole = tmp_path / "s.safetensors", tmp_path / "w.safetensors"
    code, out, err = cli(capsys, "quantize", models / "llama", "-o", streamed, "--kernel", "fbgemm", "--stream", "--json")
    assert code == 0 and err == "", err
    report = json.loads(out)
    assert "streamed block by block" in report["source_kind"] and report["smoothing"]["layers"] == 14
    code, out, err = cli(capsys, "quantize", models / "llama", "-o", whole, "--kernel", "fbgemm")
    assert code == 0, err
    assert whole.read_bytes() == streamed.read_bytes()
    plain = tmp_path / "n.safetensors"
    code, out, err = cli(capsys, "quantize", models / "llama", "-o", plain, "--kernel", "fbgemm", "--stream", "--no-smooth")
    assert code == 0 and err == "", err
    assert plain.read_bytes() != streamed.read_bytes()


# ----------------------------------------------------------------------------- item 15

_KILLED = """
import os, signal, sys
import qlin_cli.files as files
real = files.SafetensorsStream.put
def put(self, key, t):
    real(self, key, t)
    os.kill(os.getpid(), signal.SIGKILL)  # the real SIGKILL, with the temporary half written
files.SafetensorsStream.put = put
from qlin_cli.cli import main
main(sys.argv[1:])
"""


def test_a_temporary_that_sigkill_left_is_removed_by_the_next_write(models, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    p = subprocess.run([sys.executable, "-c", _KILLED, "quantize", str(models / "llama"), "-o", str(out), "--stream",
                        "--kernel", "fbgemm"], env=qlin_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    (left,) = os.listdir(tmp_path)
    assert left.startswith(".s.safetensors.qlin-") and left.endswith(".tmp")
    others = {".s.safetensors.tmp": b"not qlin's", ".x.0123456789abcdef.tmp": b"unmarked, another target", "keep.tmp": b"k"}
    for name, data in others.items():
        (tmp_path / name).write_bytes(data)
    code, stdout, err = cli(capsys, "quantize", models / "llama", "-o", out, "--stream", "--kernel", "fbgemm", "--no-smooth")
    assert code == 0, err
    (line,) = err.splitlines()
    assert line.startswith(f"warning: removed {tmp_path / left} (") and line.endswith(
        "), a temporary that an interrupted qlin run left"), line
    assert sorted(os.listdir(tmp_path)) == sorted([*others, "s.safetensors"])  # nothing else touched


def test_a_live_writers_temporary_is_left_alone(tmp_path, capsys):
    """Another qlin writing into the folder holds its shared lock: its temporary is live."""
    live = tmp_path / ".other.safetensors.qlin-0123456789abcdef.tmp"
    live.write_bytes(b"being written")
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors")
        assert code == 0 and "removed" not in err, err
        assert live.read_bytes() == b"being written"
    finally:
        os.close(fd)
    code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q2.safetensors")
    assert code == 0 and f"warning: removed {live} (13 bytes)" in err
    assert sorted(os.listdir(tmp_path)) == ["q.safetensors", "q2.safetensors"]


def test_a_folder_moved_aside_by_a_killed_forced_write_is_put_back(tmp_path, capsys):
    """SIGKILL between moving the old folder aside and renaming the new one in left neither at
    the output's path: the next write puts the old one back (and so does not clobber it)."""
    aside = tmp_path / ".ct.qlin-0123456789abcdef.old"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    (tmp_path / ".ct.qlin-fedcba9876543210.tmp").mkdir()  # the new folder, half written
    code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "ct", "--format", "compressed-tensors", "--kernel", "fbgemm")
    assert code == 1
    assert f"put back {tmp_path / 'ct'}, which an interrupted qlin run had moved aside" in err
    assert "output folder" in err.splitlines()[-1] and "exists" in err.splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == ["ct"] and (tmp_path / "ct" / "config.json").read_text() == "{}"


# ----------------------------------------------------------------------------- item 16


def test_gradients_stopping_at_quantized_layers_is_warned_about_once(monkeypatch):
    monkeypatch.setattr(qlin_cli.qlinear, "_warned_no_gradient", False)
    torch.manual_seed(0)
    q = quantize_model(torch.nn.Sequential(torch.nn.Linear(16, 8)), QuantConfig(kernel="fbgemm")).model
    x = torch.randn(2, 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            q(x)
        with torch.inference_mode():
            q(x)
        q(x.detach())  # no input that requires grad: nothing to say
    with pytest.warns(UserWarning, match="QuantizedLinear has no gradient: backward stops at quantized layers"):
        y = q(x)
    assert not y.requires_grad  # what it warns about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(x)  # once per process
