"""What a new user of the `qlin` command line meets first: --version, --debug and natural
metavars in the help, the shipped recipes by name from any folder, sizes that did not shrink,
the progress bar while the model loads, and the static-mode message of a recipe rule."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from rich.progress import Progress
from safetensors.torch import save_file

import qlin_cli
from conftest import assert_one_error_line, cli, cli_json
from qlin_cli.api import QuantizeOptions, quantize_checkpoint
from qlin_cli.errors import ConfigError
from qlin_cli.config import RECIPES, find_recipe, load_recipe, recipe_names
from qlin_cli.report import shrink

REPO = Path(__file__).resolve().parents[1]
DIGITS_PT = REPO / "sample_models" / "digits_mlp.pt"


def test_version(capsys):
    code, out, err = cli(capsys, "--version")
    assert (code, out, err) == (0, f"qlin {qlin_cli.__version__}\n", "")


def test_help_lists_debug_and_version_and_reads_naturally(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0 and "--debug" in out and "--version" in out
    code, out, _ = cli(capsys, "quantize", "--help")
    assert code == 0
    assert out.splitlines()[0] == "Usage: qlin quantize [OPTIONS] SOURCE"
    for shown in ("--skip REGEX", "--config RECIPE", "--calib FILE", "--model MOD:FN", "--min-sqnr DB", "--debug"):
        assert shown in out, shown
    assert "<list[str]>" not in out and "{" not in out.splitlines()[0]
    code, out, _ = cli(capsys, "eval", "--help")
    assert out.splitlines()[0] == "Usage: qlin eval [OPTIONS] SOURCE QUANTIZED" and "--debug" in out


# ----------------------------------------------------------------------------- recipes by name


def test_recipes_are_package_data_and_configs_is_their_documented_place():
    assert {"default", "per-tensor", "smoothquant", "w8a8-static", "weight-only"} <= set(recipe_names())
    assert recipe_names() == sorted(p.stem for p in (REPO / "configs").glob("*.toml"))
    assert RECIPES == Path(qlin_cli.__file__).parent / "configs"
    # the top-level configs/ of a checkout is the same folder
    assert (REPO / "configs").resolve() == RECIPES.resolve()
    # and the wheel ships every recipe (package-data globs, relative to the package)
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["qlin_cli"]
    shipped = {p.relative_to(RECIPES.parent) for pattern in data for p in RECIPES.parent.glob(pattern)}
    assert {p.relative_to(RECIPES.parent) for p in RECIPES.glob("*.toml")} <= shipped


def test_find_recipe_by_name_file_or_neither(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_recipe("w8a8-static") == RECIPES / "w8a8-static.toml"
    assert find_recipe("w8a8-static.toml") == RECIPES / "w8a8-static.toml"
    assert load_recipe("weight-only")["mode"] == "weight-only"
    (tmp_path / "w8a8-static.toml").write_text('mode = "weight-only"\n')  # a file of that name wins
    assert load_recipe("w8a8-static.toml")["mode"] == "weight-only"
    with pytest.raises(ConfigError) as exc:
        find_recipe("w8a8")
    assert str(exc.value) == ("recipe w8a8 does not exist: it is neither a file nor a shipped recipe "
                              f"({', '.join(recipe_names())})")


def test_recipe_by_name_from_another_folder(tmp_path, capsys, monkeypatch):
    """`--config weight-only` from a folder that has no configs/; `--config w8a8-static` without
    --calib says static mode needs calibration data."""
    monkeypatch.chdir(tmp_path)
    r = cli_json(capsys, "quantize", DIGITS_PT, "--config", "weight-only", "-o", "q.safetensors")
    assert r["config"]["mode"] == "weight-only"
    code, out, err = cli(capsys, "quantize", DIGITS_PT, "--config", "w8a8-static", "-o", "s.safetensors")
    assert code == 1 and out == ""
    assert assert_one_error_line(err).startswith("error: static mode needs calibration data: pass --calib FILE")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]


def test_static_recipe_rule_without_calib_names_static_mode(tmp_path, capsys):
    """A rule that makes one layer static (and another smoothed): the message is about static
    mode, not SmoothQuant."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('mode = "dynamic"\n\n[[layers]]\nmatch = "^0$"\nsmooth = 0.5\n\n'
                      '[[layers]]\nmatch = "^2$"\nmode = "static"\n')
    code, out, err = cli(capsys, "quantize", DIGITS_PT, "-o", tmp_path / "q.safetensors", "--config", recipe)
    assert code == 1 and out == ""
    line = assert_one_error_line(err)
    assert line.startswith("error: static mode needs calibration data: pass --calib FILE") and "SmoothQuant" not in line


# ----------------------------------------------------------------------------- sizes and progress


def test_shrink_says_plainly_when_a_file_did_not_shrink():
    assert shrink(344_441, 91_738) == "3.75x smaller"
    assert shrink(1000, 1000) == "did not shrink: the same size"
    assert shrink(1000, 1136) == "did not shrink: 1.14x larger"


def test_a_file_that_grew_is_reported_as_not_shrinking(tmp_path, capsys):
    """A 2x2 Linear in a 160-byte safetensors file: the qlin file (metadata, scales) is larger."""
    torch.manual_seed(0)
    source = tmp_path / "tiny.safetensors"
    save_file({"weight": torch.randn(2, 2), "bias": torch.randn(2)}, source)
    (tmp_path / "tiny_model.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(2, 2)\n")
    code, out, err = cli(capsys, "quantize", source, "--model", f"{tmp_path / 'tiny_model.py'}:build",
                         "-o", tmp_path / "q.safetensors")
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("file size:"))
    assert "did not shrink: " in line and "x larger" in line and "smaller" not in line


def test_progress_says_loading_model_before_the_layers(tmp_path):
    seen = []
    quantize_checkpoint(DIGITS_PT, options=QuantizeOptions(output=tmp_path / "q.safetensors"),
                        progress=lambda done, total, what: seen.append((done, total, what)))
    assert seen[0] == (0, 0, "loading model")
    assert seen[1:] == [(1, 3, "0"), (2, 3, "2"), (3, 3, "4")]


def test_progress_bar_shows_no_count_while_loading():
    from qlin_cli.cli import _Count

    with Progress(disable=True) as bar:
        task = bar.add_task("loading model", total=None)
        assert str(_Count().render(bar.tasks[task])) == ""
        bar.update(task, completed=1, total=3)
        assert str(_Count().render(bar.tasks[task])) == "1/3"
