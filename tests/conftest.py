"""Shared fixtures: the device list (CPU always, CUDA where there is one) and the sample models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
if str(ROOT) not in sys.path:  # so that `sample_models.encoder:build` imports
    sys.path.insert(0, str(ROOT))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every numeric test runs on CPU, and on CUDA where there is one."""
    return request.param


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
    import json

    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)  # the whole of stdout is one JSON object (json.loads rejects extra data)


def tamper(src: Path, dst: Path, *, tensors=None, drop=(), meta=None, plan=None) -> Path:
    """A copy of qlin file `src` with tensors replaced/added/dropped and metadata changed;
    `plan(list) -> list` edits the plan. The recorded hashes are left stale: validation must
    fail before any hash check."""
    import json

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
