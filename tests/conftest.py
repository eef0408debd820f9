"""Shared fixtures: the device list (CPU always, CUDA where there is one) and the sample models;
helpers that run qlin (in process, or as a subprocess) and read its files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import other_build
import qlin_cli

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
if str(ROOT) not in sys.path:  # so that `sample_models.encoder:build` imports
    sys.path.insert(0, str(ROOT))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every numeric test runs on CPU, and on CUDA where there is one."""
    return request.param


def pytest_sessionstart(session):
    """Where this run's paths include test_native.py, the build that its test of the other
    instruction set needs (other_build.py) starts now, in the background: on two cores it
    compiles beside this session's own build (one compiler a core; the test modules' imports
    start that one while collecting) instead of after it."""
    if other_build.wanted(session.config.args, session.config.invocation_params.dir):
        session.config.qlin_other_build = other_build.start()


def pytest_collection_finish(session):
    """A run that deselected that test (-k, ::name, --co) stops its build now."""
    if not any(item.name == other_build.TEST for item in session.items):
        pytest_sessionfinish(session)


def pytest_sessionfinish(session):
    build = getattr(session.config, "qlin_other_build", None)
    if build is not None and build.poll() is None:  # its test did not run (-x): no compiler left behind
        other_build.stop(build)


@pytest.fixture(scope="session", autouse=True)
def fused_kernels_built():
    """Build qlin's fused kernels (native.py) once, before any test: qlin subprocesses then load
    the cached module instead of each spending ~25 s on a first build (or being killed during
    one). Where they cannot be built, the tests run the torch-op path and the fused-kernel tests
    skip with the reason."""
    from qlin_cli.kernels import native

    native.load()


@pytest.fixture(scope="session")
def digits_test():
    from safetensors.torch import load_file

    inputs = load_file(SAMPLES / "digits_test.safetensors")["inputs"]
    labels = load_file(SAMPLES / "digits_test_labels.safetensors")["labels"]
    return inputs, labels


@pytest.fixture
def isolate_imports(monkeypatch, tmp_path_factory):
    """load_factory puts the current folder on sys.path and registers file.py modules in
    sys.modules: undo both after the test, so tests don't see each other's helper modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    base = str(tmp_path_factory.getbasetemp())
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(base):
            del sys.modules[name]


def fbgemm_fallback() -> str:
    """The kernel a per-token or static layer that asks for fbgemm runs on a CPU without VNNI
    (fbgemm's full-range codes would saturate there): qlin's own GEMM where it is built, else
    torch's int_mm."""
    from qlin_cli.kernels import pertoken

    return "pertoken" if pertoken.missing(torch.device("cpu"), torch.float32) is None else "int_mm"


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `qlin ARGS` in-process: (exit code, stdout, stderr)."""
    from qlin_cli.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else code), captured.out, captured.err


def cli_json(capsys, *args) -> dict:
    """Run `qlin ARGS --json` in-process, expect exit 0, and parse stdout as one JSON object."""
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)  # the whole of stdout is one JSON object (json.loads rejects extra data)


def tamper(src: Path, dst: Path, *, tensors=None, drop=(), meta=None, plan=None) -> Path:
    """A copy of qlin file `src` with tensors replaced/added/dropped and metadata changed;
    `plan(list) -> list` edits the plan. The recorded hashes are left stale: validation must
    fail before any hash check."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    t = load_file(src)
    with safe_open(src, "pt") as f:
        m = dict(f.metadata())
    t.update(tensors or {})
    for k in drop:
        t.pop(k)
    m.update(meta or {})
    if plan is not None:
        m["plan"] = json.dumps(plan(json.loads(m["plan"])))
    save_file(t, dst, metadata=m)
    return dst


def load_digits_mlp() -> torch.nn.Module:
    with torch.serialization.safe_globals([torch.nn.Sequential, torch.nn.Linear, torch.nn.ReLU]):
        return torch.load(SAMPLES / "digits_mlp.pt", weights_only=True).eval()


def load_encoder() -> torch.nn.Module:
    from safetensors.torch import load_file

    from sample_models.encoder import build

    model = build()
    model.load_state_dict(load_file(SAMPLES / "encoder.safetensors"))
    return model.eval()


# the folder that holds the qlin_cli these tests import, for the subprocesses to import the same
QLIN_ROOT = Path(qlin_cli.__file__).resolve().parents[1]


def qlin_env(**extra: str) -> dict[str, str]:
    """The environment for a `qlin` subprocess: this one, with QLIN_ROOT first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(QLIN_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def subprocess_qlin(*args, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """Run `python -m qlin_cli ARGS` in `cwd` with the extra environment variables `env`."""
    return subprocess.run(
        [sys.executable, "-m", "qlin_cli", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=120, env=qlin_env(**env),
    )


def assert_one_error_line(err: str) -> str:
    """stderr is exactly one non-empty line starting with 'error:' and no traceback."""
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: "), err
    assert "internal error" not in lines[0], err  # a QlinError, not an escaped exception
    return lines[0]


def files_in(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` (hidden temporaries included) with its bytes and mtime."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_header(raw: bytes) -> tuple[dict, bytes]:
    """(header JSON, payload) of safetensors bytes."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_header(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + payload


def quantize_once(folder: Path, *options: str) -> Path:
    """Quantize digits_mlp.pt with `options` into `folder` through the CLI, in process."""
    import contextlib
    import io

    from qlin_cli.cli import main

    out = folder / "digits_mlp.int8.safetensors"
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(io.StringIO()):  # not in a test's capsys
        main(["quantize", str(SAMPLES / "digits_mlp.pt"), "-o", str(out), *options])
    assert exc.value.code in (0, None)
    return out


@pytest.fixture(scope="module")
def digits_q(tmp_path_factory) -> Path:
    """digits_mlp.pt quantized with the default options and the int8 kernel named (`auto` keeps
    layers this small float)."""
    return quantize_once(tmp_path_factory.mktemp("digits_q"), "--kernel", "fbgemm")


@pytest.fixture(scope="session")
def docs_lm_int8(tmp_path_factory) -> tuple[Path, dict]:
    """sample_models/docs_lm quantized once with int8 activations (`--kernel fbgemm`), through the
    CLI in process: (the file, quantize's JSON report). Shared: tests only read it."""
    pytest.importorskip("transformers")
    import contextlib
    import io

    from qlin_cli.cli import main

    out = tmp_path_factory.mktemp("docs_lm") / "lm.int8.safetensors"
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(io.StringIO()) as stdout:
        main(["quantize", str(SAMPLES / "docs_lm"), "-o", str(out), "--kernel", "fbgemm", "--json"])
    assert exc.value.code in (0, None)
    return out, json.loads(stdout.getvalue())


def mlp_with(layer: int, param: str, index: tuple[int, ...], value: float) -> torch.nn.Sequential:
    """A small seeded MLP whose `model[layer].param[index]` is `value` (e.g. a NaN weight)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        getattr(model[layer], param)[index] = value
    return model


class ModuleWith:
    """A module with some functions replaced (to patch what qlin_cli.files sees, only)."""

    def __init__(self, module, **replaced):
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._module, name)


def raising(exc: BaseException):
    """A function that raises `exc` whatever it is called with."""

    def fn(*args, **kwargs):
        raise exc

    return fn


def float16_panels(pack, unpack, q, bits, scale, zp, group):
    """A kernel's panels of `scale` (all float16 values) by `pack` (`lowbit.to_panels`,
    `lowbit_dynamic.to_dot_panels`), checked: float16 scales (2 bytes each instead of 4), the
    file's tensors back exactly through `unpack`, and float32 panels again where one scale is not
    a float16 value. Returns the panels and their float32 twin (the same values)."""
    p16 = pack(q, bits, scale, zp, group)
    p32 = dataclasses.replace(p16, scale=p16.scale.float())
    assert p16.scale.dtype == torch.float16 and p16.nbytes() == p32.nbytes() - p16.scale.numel() * 2
    back = unpack(p16)
    assert back[1].dtype == torch.float32 and torch.equal(back[1], scale) and torch.equal(back[0], q)
    odd = scale.clone()
    odd[-1, -1] = odd[-1, -1].item() * (1 + 2.0**-20)
    assert pack(q, bits, odd, zp, group).scale.dtype == torch.float32
    return p16, p32
