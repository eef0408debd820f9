"""Hostile and careless input through the real CLI: tiny files that would
make qlin allocate gigabytes, special files, outputs that are inputs, signals, nonsense in eval,
regexes that backtrack, and exits that were `internal error`. Each ends in one line on stderr,
exit 1 (2 for usage), inputs unchanged, nothing written; where memory is the point, the peak
resident memory of the qlin process is checked.
"""

from __future__ import annotations

import copyreg
import io
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qlin_cli.files
from conftest import ModuleWith, assert_one_error_line, cli, files_in, qlin_env, raising
from qlin_cli.errors import Terminated
from warm_qlin import run_warm

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
DIGITS_PT = SAMPLES / "digits_mlp.pt"
DIGITS_TEST = SAMPLES / "digits_test.safetensors"
DIGITS_LABELS = SAMPLES / "digits_test_labels.safetensors"

pytestmark = pytest.mark.usefixtures("isolate_imports")

# a qlin subprocess may map this much address space: a regression that allocates what a hostile
# file asks for fails with MemoryError (and the test on its message) instead of taking the machine
ADDRESS_LIMIT = 3 * 2**30


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file under `folder` with its bytes (for files of at most 64 MB) or its inode, size and
    mtime (a sparse file that claims tens of GB is not read)."""
    return {
        p.name: (p.read_bytes() if p.stat().st_size <= 2**26 else (p.stat().st_ino, p.stat().st_size),
                 p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def run_measured(*args, cwd: Path, timeout: float = 90) -> tuple[int, str, str, float]:
    """Run `python -m qlin_cli ARGS` in a process of its own, its address space capped: (exit code,
    stdout, stderr, peak resident MB of that process). The process is forked from one that has
    imported torch and transformers already (warm_qlin.py): its peak counts those imports as a
    fresh process's does, without paying 2-5 s for them at each run."""
    return run_warm(*args, cwd=cwd, timeout=timeout, address_limit=ADDRESS_LIMIT)


@pytest.fixture(scope="module")
def baseline_mb(tmp_path_factory) -> float:
    """Peak MB of `qlin inspect` on the small sample model: what starting Python, torch and
    transformers costs (run_measured's processes all start with them imported)."""
    code, _, err, peak = run_measured("inspect", DIGITS_PT, cwd=tmp_path_factory.mktemp("base"))
    assert code == 0, err
    return peak


# ----------------------------------------------------------------------------- hostile files


class _Call:
    """Pickles as a call of `fn(*args)` (REDUCE), as a crafted file would hold it."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def linear_call(folder: Path) -> Path:
    """1 KB: unpickling calls nn.Linear(40000, 40000) (6.4 GB and 83 s of init if it were made)."""
    torch.save(_Call(nn.Linear, 40000, 40000), folder / "linear_call.pt")
    return folder / "linear_call.pt"


def bytearray_call(folder: Path) -> Path:
    """bytearray(10**10), an allowlisted global of torch's weights_only unpickler."""
    torch.save({"w": torch.zeros(2), "x": _Call(bytearray, 10**10)}, folder / "bytearray.pt")
    return folder / "bytearray.pt"


class _NewTensor:
    def __reduce__(self):
        return copyreg.__newobj__, (_NewTensor, 60000, 60000)


def tensor_new(folder: Path) -> Path:
    """torch.Tensor.__new__(torch.Tensor, 60000, 60000) by NEWOBJ: a 14 GB tensor."""
    buf = io.BytesIO()
    torch.save({"w": _NewTensor()}, buf)
    return _edit_pickle(buf, folder / "tensor_new.pt", f"{__name__}\n_NewTensor".encode(), b"torch\nTensor")


def _edit_pickle(buf: io.BytesIO, path: Path, old: bytes, new: bytes) -> Path:
    """The checkpoint in `buf` with `old` replaced by `new` in its pickle, written to `path`."""
    src = zipfile.ZipFile(buf)
    with zipfile.ZipFile(path, "w") as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            z.writestr(info, data)
    return path


def stride_zero(folder: Path) -> Path:
    """A pickled module whose weight repeats one element 30000 x 30000 times (stride 0)."""
    lin = nn.Linear(1, 1, bias=False)
    lin.weight = nn.Parameter(torch.zeros(1).expand(30000, 30000))
    lin.in_features = lin.out_features = 30000
    torch.save(nn.Sequential(lin), folder / "stride_zero.pt")
    return folder / "stride_zero.pt"


def zip_bomb(folder: Path) -> Path:
    """A checkpoint whose storage record deflates from ~70 kB to 64 MB."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(buf)
    path = folder / "bomb.pt"
    with zipfile.ZipFile(path, "w") as z:
        for info in src.infolist():
            if info.filename.endswith("data/0"):
                big = zipfile.ZipInfo(info.filename)
                big.compress_type = zipfile.ZIP_DEFLATED
                with z.open(big, "w", force_zip64=True) as f:
                    chunk = bytes(2**20)
                    for _ in range(64):
                        f.write(chunk)
            else:
                z.writestr(info, src.read(info))
    return path


def sparse_inputs(folder: Path) -> Path:
    """A 4 kB sparse safetensors file whose one tensor claims twice this machine's memory."""
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = math.ceil(2 * phys / (64 * 4))
    header = json.dumps({"inputs": {"dtype": "F32", "shape": [rows, 64], "data_offsets": [0, rows * 64 * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    path = folder / "sparse.safetensors"
    with path.open("wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        try:
            f.truncate(8 + len(header) + rows * 64 * 4)
        except OSError as exc:
            pytest.skip(f"this filesystem has no sparse files ({exc})")
    return path


# (name, builder, the command's arguments given the file, phrase of the error)
HOSTILE = [
    ("nn.Linear(40000, 40000) call", linear_call, lambda f: ["inspect", f],
     "calls torch.nn.modules.linear.Linear(40000, 40000)"),
    ("bytearray(10**10) call", bytearray_call, lambda f: ["inspect", f], "calls builtins.bytearray(10000000000)"),
    ("torch.Tensor.__new__(60000, 60000)", tensor_new, lambda f: ["quantize", DIGITS_PT, "--inputs", f],
     "makes a torch.Tensor from arguments"),
    ("stride-0 30000x30000 weight", stride_zero, lambda f: ["quantize", f, "-o", "out.safetensors"],
     "tensor '0.weight' (30000, 30000) describes 3.6 GB but its storage holds 4 bytes"),
    ("64 MB deflated storage", zip_bomb, lambda f: ["inspect", f], "inflates to 67.1 MB"),
    ("sparse inputs claiming 2x the memory", sparse_inputs,
     lambda f: ["quantize", DIGITS_PT, "-o", "out.safetensors", "--inputs", f], "GB of tensors, more than --max-memory"),
]


@pytest.mark.parametrize("name, build, args, phrase", HOSTILE, ids=[f"{h[0]}-{h[2]('F')[0]}" for h in HOSTILE])
def test_tiny_file_cannot_make_qlin_allocate(name, build, args, phrase, tmp_path, baseline_mb):
    path = build(tmp_path)
    assert path.stat().st_blocks * 512 < 2**20  # at most a few hundred kB on disk
    before = snapshot(tmp_path)
    code, out, err, peak = run_measured(*args(path), cwd=tmp_path)
    assert code == 1 and out == "", err
    line = assert_one_error_line(err)
    assert phrase in line, line
    assert snapshot(tmp_path) == before  # the input unchanged, nothing written
    assert peak < baseline_mb + 64, f"peak {peak:.0f} MB, baseline {baseline_mb:.0f} MB"


def test_max_memory_is_a_limit_the_user_sets(digits_q, capsys):
    code, out, err = cli(capsys, "inspect", digits_q, "--max-memory", "10kB")
    assert code == 1
    assert "holds 89.2 kB of tensors, more than --max-memory 10.0 kB" in assert_one_error_line(err)
    code, out, err = cli(capsys, "inspect", digits_q, "--max-memory", "1MiB", "--json")
    assert code == 0, err
    for bad in ("nan", "-1GB", "0", "lots"):
        code, _, err = cli(capsys, "inspect", digits_q, "--max-memory", bad)
        assert code == 2 and "--max-memory" in err, (bad, err)


# ----------------------------------------------------------------------------- special files


def test_dev_zero_and_a_fifo_are_refused_unread(tmp_path, baseline_mb):
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    code, out, err, peak = run_measured("quantize", "/dev/zero", "-o", tmp_path / "out.safetensors", cwd=tmp_path)
    assert code == 1 and "source /dev/zero is a character device, not a regular file" in assert_one_error_line(err)
    assert peak < baseline_mb + 64
    code, out, err, _ = run_measured("inspect", fifo, cwd=tmp_path, timeout=60)  # it waited for a writer forever
    assert code == 1 and "is a FIFO (named pipe), not a regular file" in assert_one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == ["fifo.pt"]


def _special_outputs(folder: Path) -> list[Path]:
    fifo = folder / "fifo.safetensors"
    os.mkfifo(fifo)
    outs = [fifo]
    try:
        os.mknod(folder / "null.safetensors", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
        outs.append(folder / "null.safetensors")
    except PermissionError:
        pass
    return outs


@pytest.mark.parametrize("force", [False, True])
def test_output_that_is_a_device_or_fifo_is_never_replaced(force, tmp_path, capsys):
    for out in _special_outputs(tmp_path):
        kind = stat.S_IFMT(out.stat().st_mode)
        code, stdout, err = cli(capsys, "quantize", DIGITS_PT, "-o", out, *(["--force"] if force else []))
        assert code == 1 and stdout == ""
        assert "qlin writes only regular files, even with --force" in assert_one_error_line(err)
        assert stat.S_IFMT(out.stat().st_mode) == kind  # still the device or FIFO
        code, _, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--report", out, "--force")
        assert code == 1 and stat.S_IFMT(out.stat().st_mode) == kind
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "q.safetensors").exists()


def test_write_never_replaces_a_fifo_that_appears_after_the_check(tmp_path):
    """write_atomic looks again just before its rename."""
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(qlin_cli.files.OutputError, match="FIFO"):
        qlin_cli.files.write_atomic(fifo, b"data", force=True)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert os.listdir(tmp_path) == ["fifo.safetensors"]  # and no temporary


# ----------------------------------------------------------------------------- outputs that are inputs


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


CLOBBER = {
    "-o is the --inputs file": (lambda t: ["-o", t / "in.safetensors", "--inputs", t / "in.safetensors"],
                                "is the input file", "--inputs"),
    "-o is the --calib file": (lambda t: ["-o", t / "in.safetensors", "--calib", t / "in.safetensors", "--mode", "static"],
                               "is the input file", "--calib"),
    "-o is the --eval-inputs file": (lambda t: ["-o", t / "in.safetensors", "--calib", t / "in.safetensors",
                                                "--eval-inputs", t / "in.safetensors", "--min-sqnr", "20"],
                                     "is the input file", "--calib"),
    "-o is the --config file": (lambda t: ["-o", t / "r.toml", "--config", t / "r.toml"], "is the input file", "--config"),
    "--report is the --config file": (lambda t: ["-o", t / "q.safetensors", "--config", t / "r.json",
                                                 "--report", t / "r.json"], None, None),
    "-o is a hard link to the source": (lambda t: ["-o", t / "link.pt"], "is the input file", "source"),
    "-o and --report the same file": (lambda t: ["-o", t / "x.json", "--report", t / "x.json"],
                                      "are the same file", "--report"),
    "-o is the report's Markdown twin": (lambda t: ["-o", t / "x.md", "--report", t / "x.json"],
                                         "are the same file", "Markdown"),
}


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("case", list(CLOBBER))
def test_no_output_is_an_input_or_another_output(case, force, tmp_path, capsys):
    make, phrase, names = CLOBBER[case]
    src = _copy(DIGITS_PT, tmp_path / "src.pt")
    _copy(DIGITS_TEST, tmp_path / "in.safetensors")
    (tmp_path / "r.toml").write_text('mode = "dynamic"\n')
    (tmp_path / "r.json").write_text('{}')  # not TOML: refused as a recipe before anything is written
    os.link(src, tmp_path / "link.pt")
    before = files_in(tmp_path)
    code, out, err = cli(capsys, "quantize", src, *make(tmp_path), *(["--force"] if force else []))
    assert code == 1 and out == ""
    line = assert_one_error_line(err)
    if phrase:
        assert phrase in line and names in line, line
    assert files_in(tmp_path) == before


# ----------------------------------------------------------------------------- signals


def _terminate_on(name: str, signum: int):
    def fn(*args, **kwargs):
        raise Terminated(signum)
    return fn


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("out_format", ["qlin", "compressed-tensors"])
def test_sigterm_during_the_write_cleans_up_like_ctrl_c(signum, out_format, tmp_path, capsys, monkeypatch):
    """Deterministic: the signal's handler raises while the temporary file is synced (the real
    signal, sent to a process, is in test_interrupts.py)."""
    monkeypatch.setattr(qlin_cli.files, "os", ModuleWith(os, fsync=_terminate_on("fsync", signum)))
    out = tmp_path / ("out.safetensors" if out_format == "qlin" else "out-ct")
    code, stdout, err = cli(capsys, "quantize", DIGITS_PT, "-o", out, "--format", out_format, "--kernel", "fbgemm")
    assert code == 128 + signum and stdout == ""
    assert err.strip() == f"interrupted ({signal.Signals(signum).name})"
    assert list(tmp_path.iterdir()) == []  # no .tmp file or folder


def test_sigterm_to_a_running_quantize(tmp_path):
    """The real signal: the handler is installed and the exit code is 143 with one line."""
    code = (
        "import os, signal, sys, qlin_cli.jobs.quantize as job\n"
        "real = job.quantize_model\n"
        "def slow(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*a, **k)\n"
        "job.quantize_model = slow\n"
        "from qlin_cli.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    p = subprocess.run([sys.executable, "-c", code, "quantize", str(DIGITS_PT), "-o", str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True, env=qlin_env(), timeout=120)
    assert p.returncode == 143 and p.stderr.strip() == "interrupted (SIGTERM)", (p.returncode, p.stderr)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- eval


@pytest.fixture
def digits_inputs() -> torch.Tensor:
    return load_file(DIGITS_TEST)["inputs"].clone()


def _save(tmp_path: Path, name: str, t: torch.Tensor) -> Path:
    save_file({"x": t.contiguous()}, tmp_path / name)
    return tmp_path / name


def _eval(capsys, digits_q, inputs, *more):
    return cli(capsys, "eval", DIGITS_PT, digits_q, "--inputs", inputs, *more)


def test_eval_refuses_non_finite_inputs(digits_q, digits_inputs, tmp_path, capsys):
    x = digits_inputs.clone()
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    code, out, err = _eval(capsys, digits_q, _save(tmp_path, "nan.safetensors", x))
    assert code == 1 and out == ""
    line = assert_one_error_line(err)
    assert f"has 2 non-finite value(s) (NaN or Inf) in 2 of {x.shape[0]} samples, the first at index (3, 5)" in line
    code, out, err = _eval(capsys, digits_q, _save(tmp_path, "allnan.safetensors", torch.full_like(x, float("nan"))))
    assert code == 1 and f"has {x.numel()} non-finite value(s)" in assert_one_error_line(err)


def test_quantize_refuses_non_finite_probe_inputs(digits_inputs, tmp_path, capsys):
    digits_inputs[0, 0] = float("nan")
    code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors",
                         "--inputs", _save(tmp_path, "nan.safetensors", digits_inputs))
    assert code == 1 and "the first at index (0, 0)" in assert_one_error_line(err)
    assert not (tmp_path / "q.safetensors").exists()


LABELS = {
    "float": (lambda y: y.float(), "are float32; give integer class indices"),
    "bool": (lambda y: y > 4, "are bool; give integer class indices"),
    "negative": (lambda y: torch.where(torch.arange(len(y)) == 2, -1, y), "1 label(s) outside [0, 10) for the model's 10 classes, the first -1 at sample 2"),
    "too large": (lambda y: torch.where(torch.arange(len(y)) < 3, 10, y), "3 label(s) outside [0, 10)"),
    "one too few": (lambda y: y[:-1], "entries but the inputs have"),
}


@pytest.mark.parametrize("case", list(LABELS))
def test_eval_refuses_labels_that_are_not_class_indices(case, digits_q, tmp_path, capsys):
    change, phrase = LABELS[case]
    labels = _save(tmp_path, "labels.safetensors", change(load_file(DIGITS_LABELS)["labels"]))
    code, out, err = _eval(capsys, digits_q, DIGITS_TEST, "--labels", labels)
    assert code == 1 and out == ""
    assert phrase in assert_one_error_line(err)


NUMBERS = [
    ("quantize", "--min-sqnr", "nan"), ("quantize", "--min-sqnr", "inf"), ("quantize", "--percentile", "nan"),
    ("quantize", "--percentile", "-inf"), ("quantize", "--smooth", "nan"), ("quantize", "--smooth", "inf"),
    ("eval", "--batch-size", "0"), ("eval", "--repeats", "0"),
]


@pytest.mark.parametrize("command, option, value", NUMBERS)
def test_number_options_refuse_nan_infinity_and_out_of_range(command, option, value, digits_q, tmp_path, capsys):
    if command == "quantize":
        args = ["quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--calib", DIGITS_TEST, option, value]
    else:
        args = ["eval", DIGITS_PT, digits_q, "--inputs", DIGITS_TEST, option, value]
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == "" and option in err and "Traceback" not in err, err
    assert not (tmp_path / "q.safetensors").exists()


def test_out_of_range_numbers_are_one_line_errors(tmp_path, capsys):
    for option, value in (("--percentile", "101"), ("--smooth", "0"), ("--batch-size", "0"), ("--calib-samples", "0")):
        code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--calib", DIGITS_TEST,
                             option, value)
        assert code == 1 and option.strip("-").replace("-", "_") in assert_one_error_line(err).replace("-", "_"), err


# ----------------------------------------------------------------------------- regexes


def test_a_backtracking_skip_pattern_runs_in_linear_time(tmp_path):
    code, out, err, _ = run_measured("quantize", DIGITS_PT, "--kernel", "fbgemm", "-o", tmp_path / "q.safetensors",
                                     "--skip", "(.*.*)*X", "--skip", "(a|aa)+$", "--json", cwd=tmp_path)  # backtracking: never ends
    assert code == 0, err
    assert json.loads(out)["warnings"] == ["`skip` '(.*.*)*X' matches no layer", "`skip` '(a|aa)+$' matches no layer"]
    assert err.splitlines() == ["warning: --skip '(.*.*)*X' matches no layer", "warning: --skip '(a|aa)+$' matches no layer"]


def test_a_pattern_that_matches_no_layer_is_an_error_with_strict(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[layers]]\nmatch = "^blocks\\\\."\nskip = true\n')
    code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--config", recipe, "--strict")
    assert code == 1 and "recipe rule layers[0] match '^blocks\\\\.' matches no layer (--strict)" in assert_one_error_line(err)
    assert not (tmp_path / "q.safetensors").exists()
    code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--skip", "^2$", "--strict")
    assert code == 0, err  # a pattern that matches is fine


@pytest.mark.parametrize("pattern, why", [("(a)\\1", "invalid escape sequence"), ("(?=a)", "invalid perl operator"),
                                          ("a{2000}", "invalid repetition size")])
def test_patterns_re2_cannot_run_in_linear_time_are_refused(pattern, why, tmp_path, capsys):
    code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--skip", pattern)
    assert code == 1
    line = assert_one_error_line(err)
    assert why in line and "linear time" in line, line


# ----------------------------------------------------------------------------- other exits


def test_a_factory_that_exits_is_an_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "exits.py").write_text("import sys\ndef build():\n    sys.exit(0)\n")
    torch.save(torch.nn.Linear(4, 4).state_dict(), tmp_path / "sd.pt")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "quantize", "sd.pt", "--model", "exits.py:build", "-o", "q.safetensors")
    assert code == 1 and "the factory called sys.exit(0) instead of returning a model" in assert_one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == ["exits.py", "sd.pt"]


def test_a_bad_global_name_is_a_one_line_error(tmp_path, capsys):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    _edit_pickle(buf, tmp_path / "g.pt", b"collections\nOrderedDict", b"torch.nn.modules.nosuch\nFoo")
    code, out, err = cli(capsys, "inspect", tmp_path / "g.pt")
    assert code == 1 and "torch.nn.modules.nosuch.Foo" in assert_one_error_line(err)


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_zero_sample_inputs(command, digits_q, tmp_path, capsys):
    empty = _save(tmp_path, "empty.safetensors", torch.zeros(0, 64))
    if command == "quantize":
        code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--inputs", empty)
    else:
        code, out, err = _eval(capsys, digits_q, empty)
    assert code == 1 and "holds 0 samples" in assert_one_error_line(err)


def test_a_file_name_that_is_not_utf8(tmp_path, capsys):
    src = _copy(DIGITS_PT, tmp_path / os.fsdecode(b"\xff.pt"))
    out = tmp_path / os.fsdecode(b"\xfe.safetensors")
    code, stdout, err = cli(capsys, "quantize", src, "-o", out, "--json", "--report", tmp_path / os.fsdecode(b"r\xff.json"))
    assert code == 0, err
    assert json.loads(stdout)["source"] == str(src)
    assert sorted(os.listdir(os.fsencode(tmp_path))) == [b"r\xff.json", b"r\xff.md", b"\xfe.safetensors", b"\xff.pt"]
    code, stdout, err = cli(capsys, "inspect", out)  # safetensors opens UTF-8 paths only
    assert code == 1 and "its name is not valid UTF-8" in assert_one_error_line(err)


def test_a_plan_of_ghost_layers_is_refused_and_a_long_table_prints(digits_q, tmp_path, capsys):
    """A plan may list no layer whose weight is not in the file (600k ghost entries took 645 s);
    a real table of more than 1000 rows prints as plain columns, every row."""
    from safetensors import safe_open

    with safe_open(digits_q, "pt") as f:
        meta = dict(f.metadata())
    plan = json.loads(meta["plan"])
    ghost = {k: plan[0][k] for k in ("in_features", "out_features", "has_bias", "aliases", "dtype")}
    plan += [dict(ghost, name=f"x{i}", status="skipped", reason="r") for i in range(20000)]
    save_file(load_file(digits_q), tmp_path / "ghosts.safetensors", metadata={**meta, "plan": json.dumps(plan)})
    code, out, err = cli(capsys, "inspect", tmp_path / "ghosts.safetensors")
    assert code == 1 and "layer 'x0' has no tensor x0.weight" in assert_one_error_line(err)
    torch.save({f"l{i}.weight": torch.zeros(2, 2) for i in range(1500)}, tmp_path / "wide.pt")
    code, out, err = cli(capsys, "inspect", tmp_path / "wide.pt")
    assert code == 0, err
    assert sum(bool(re.match(r"l\d+ ", line)) for line in out.splitlines()) == 1500


def test_a_recipe_that_is_a_fifo_is_refused_unread(tmp_path):
    os.mkfifo(tmp_path / "r.toml")
    code, out, err, _ = run_measured("quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--config",
                                     tmp_path / "r.toml", cwd=tmp_path, timeout=60)  # reading it waited forever
    assert code == 1 and "recipe" in err and "is not a regular file" in assert_one_error_line(err)


@pytest.mark.parametrize("what", ["modules", "dicts"])
def test_deep_nesting_is_a_one_line_error(what, tmp_path, capsys):
    """A pickle nests modules (or dicts) 3000 deep in a few kB: Python's recursion gave up inside
    state_dict (internal error RecursionError)."""
    obj = nn.Linear(2, 2) if what == "modules" else {"w": torch.zeros(2)}
    for _ in range(3000):
        obj = nn.Sequential(obj) if what == "modules" else {"a": obj}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # for torch.save's pickler
    try:
        torch.save(obj, tmp_path / "deep.pt")
    finally:
        sys.setrecursionlimit(limit)
    code, out, err = cli(capsys, "inspect", tmp_path / "deep.pt")
    assert code == 1 and "nests modules or dicts more than 200 deep" in assert_one_error_line(err)
