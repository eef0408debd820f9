"""qlin_cli.sources: float checkpoints in (state dicts + factories, pickled modules), model
inputs and labels, and the file checks, each with the one-line InputError a user sees."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qlin_cli.errors import InputError, QlinError
from qlin_cli.files import check_file
from qlin_cli.sources import (
    CT_WEIGHTS, PICKLE, QLIN_FILE, QUANTIZED_FOLDER, SAFETENSORS, load_factory, load_source, load_tensors, read_checkpoint,
    what_is,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
DIGITS_PT = SAMPLES / "digits_mlp.pt"
DIGITS_SD = SAMPLES / "digits_mlp.safetensors"
DIGITS_FACTORY = "sample_models.digits:build_digits_mlp"


@pytest.fixture(autouse=True)
def _isolate(isolate_imports):
    """Every test here may import factories: undo that afterwards."""


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def small_mlp(out: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out))


def write_factory(folder: Path, name: str) -> str:
    (folder / f"{name}.py").write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n\n"
        "def build_wide():\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))\n\n"
        "def build_other():\n"
        "    return nn.Sequential(nn.Linear(8, 4))\n\n"
        "def build_tied():\n"
        "    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))\n"
        "    m[2].weight = m[0].weight\n"
        "    return m\n\n"
        "def build_bn():\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))\n\n"
        "VALUE = 3\n"
    )
    return f"{name}.py"


def digits_state() -> dict[str, torch.Tensor]:
    return load_file(DIGITS_SD)


def assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(got[key], value), key


def message(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, f"not one line: {text!r}"
    return text


# ----------------------------------------------------------------------------- check_file


def test_check_file_accepts_a_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    assert check_file(str(f)) == f
    assert isinstance(check_file(f), Path)


def _empty(folder: Path) -> Path:
    (folder / "empty.pt").write_bytes(b"")
    return folder / "empty.pt"


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda p: p / "missing.pt", "does not exist"),
        (lambda p: p, "is a directory, not a file"),
        (_empty, "is empty"),
    ],
    ids=["missing", "directory", "empty"],
)
def test_check_file_rejects(tmp_path, make, phrase):
    path = make(tmp_path)
    with pytest.raises(InputError) as exc:
        check_file(path, "source")
    assert message(exc) == f"source {path} {phrase}"


# ----------------------------------------------------------------------------- state dicts + factories


def test_state_dict_pt_with_module_factory(tmp_path, in_repo):
    state = digits_state()
    src = tmp_path / "sd.pt"
    torch.save(state, src)
    source = load_source(src, model=DIGITS_FACTORY)
    assert source.kind == "state dict"
    assert source.path == src
    assert source.size_bytes == src.stat().st_size
    assert source.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert isinstance(source.model, nn.Sequential) and not source.model.training
    assert_state_equal(source.model, state)


def test_safetensors_state_dict_with_factory_matches_pickled_module(in_repo):
    source = load_source(DIGITS_SD, model=DIGITS_FACTORY)
    assert source.kind == "safetensors state dict"
    pickled = load_source(DIGITS_PT)
    assert pickled.kind == "pickled module"
    assert not pickled.model.training
    x = torch.linspace(0, 1, 5 * 64).reshape(5, 64)
    assert torch.equal(source.model(x), pickled.model(x))
    assert tuple(source.model(x).shape) == (5, 10)


def test_state_dict_with_file_factory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_factory(tmp_path, "qlin_test_src_factory_a") + ":build"
    state = small_mlp().state_dict()
    torch.save(state, tmp_path / "sd.pt")
    source = load_source("sd.pt", model=spec)
    assert_state_equal(source.model, state)
    assert not source.model.training  # the factory's model is in train mode; sources hand it over in eval


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_nested_state_dict(tmp_path, wrapper):
    spec = write_factory(tmp_path, f"qlin_test_src_factory_{wrapper}")
    state = small_mlp().state_dict()
    src = tmp_path / "ckpt.pt"
    torch.save({wrapper: state, "epoch": 3, "step": torch.tensor(100)}, src)
    obj, kind = read_checkpoint(src)
    assert kind == "state dict"
    assert obj.keys() == state.keys()
    source = load_source(src, model=str(tmp_path / spec) + ":build")
    assert_state_equal(source.model, state)


def test_state_dict_without_model(tmp_path):
    src = tmp_path / "sd.pt"
    torch.save(small_mlp().state_dict(), src)
    with pytest.raises(InputError) as exc:
        load_source(src)
    text = message(exc)
    assert "is a state dict (4 tensors)" in text and "pass `model`" in text


def save_state(state: dict, path: Path) -> str:
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    return path.name


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_key_mismatch(tmp_path, monkeypatch, suffix):
    monkeypatch.chdir(tmp_path)
    spec = write_factory(tmp_path, f"qlin_test_src_factory_keys{suffix[1:]}") + ":build"
    state = small_mlp().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["2.bias"]
    name = save_state(state, tmp_path / f"sd{suffix}")
    with pytest.raises(InputError) as exc:
        load_source(name, model=spec)
    text = message(exc)
    assert f"does not fit `model` {spec}" in text
    assert "1 missing (e.g. '2.bias')" in text
    assert "1 unexpected (e.g. 'extra.weight')" in text


def test_key_mismatch_other_architecture(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_factory(tmp_path, "qlin_test_src_factory_other") + ":build_other"
    torch.save(small_mlp().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(InputError) as exc:
        load_source("sd.pt", model=spec)
    assert "unexpected" in message(exc) and "missing" not in message(exc)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_shape_mismatch(tmp_path, monkeypatch, suffix):
    monkeypatch.chdir(tmp_path)
    spec = write_factory(tmp_path, f"qlin_test_src_factory_shape{suffix[1:]}") + ":build_wide"
    name = save_state(small_mlp(out=4).state_dict(), tmp_path / f"sd{suffix}")
    with pytest.raises(InputError) as exc:
        load_source(name, model=spec)
    text = message(exc)
    assert f"does not fit `model` {spec}" in text
    assert "size mismatch for 2.weight" in text
    assert "[4, 16]" in text and "[6, 16]" in text


def test_safetensors_streams_into_the_model(tmp_path, monkeypatch):
    """A safetensors state dict is read tensor by tensor into the built model (never whole, beside
    it): bit-exact, converting another dtype as load_state_dict does, tied weights kept tied;
    a model whose modules customize loading (BatchNorm) goes through load_state_dict."""
    import safetensors.torch

    monkeypatch.chdir(tmp_path)
    spec = write_factory(tmp_path, "qlin_test_src_factory_stream")
    state = small_mlp().state_dict()
    save_file(state, str(tmp_path / "sd.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "half.safetensors"))
    tied = {"0.weight": torch.randn(8, 8), "0.bias": torch.randn(8), "2.bias": torch.randn(8)}
    tied["2.weight"] = tied["0.weight"].clone()
    save_file(tied, str(tmp_path / "tied.safetensors"))
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("read the whole file"))
        assert_state_equal(load_source("sd.safetensors", model=spec + ":build").model, state)
        half = load_source("half.safetensors", model=spec + ":build").model
        assert_state_equal(half, {k: v.half().float() for k, v in state.items()})
        assert all(p.dtype == torch.float32 for p in half.parameters())
        model = load_source("tied.safetensors", model=spec + ":build_tied").model
        assert model[2].weight is model[0].weight and torch.equal(model[0].weight, tied["0.weight"])
    bn = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    bn[1].running_mean.normal_()
    bn[1].num_batches_tracked.fill_(7)
    save_file(bn.state_dict(), str(tmp_path / "bn.safetensors"))
    assert_state_equal(load_source("bn.safetensors", model=spec + ":build_bn").model, bn.state_dict())


def test_truncated_safetensors_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_factory(tmp_path, "qlin_test_src_factory_trunc") + ":build"
    save_file(small_mlp().state_dict(), str(tmp_path / "sd.safetensors"))
    data = (tmp_path / "sd.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(InputError) as exc:
        load_source("cut.safetensors", model=spec)
    assert message(exc).startswith("source cut.safetensors is not a valid safetensors file (")


# ----------------------------------------------------------------------------- load_factory


def test_load_factory_module_and_file(tmp_path, in_repo):
    from sample_models.digits import build_digits_mlp

    assert load_factory(DIGITS_FACTORY) is build_digits_mlp
    spec = write_factory(tmp_path, "qlin_test_src_factory_abs")
    fn = load_factory(f"{tmp_path / spec}:build")
    assert callable(fn) and isinstance(fn(), nn.Sequential)


def test_load_factory_relative_file_from_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "models"
    sub.mkdir()
    write_factory(sub, "qlin_test_src_factory_rel")
    monkeypatch.chdir(tmp_path)
    assert isinstance(load_factory("models/qlin_test_src_factory_rel.py:build")(), nn.Sequential)


def test_load_factory_imports_package_from_cwd(tmp_path, monkeypatch):
    pkg = tmp_path / "qlin_test_src_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write_factory(pkg, "arch")
    monkeypatch.chdir(tmp_path)
    assert isinstance(load_factory("qlin_test_src_pkg.arch:build")(), nn.Sequential)


@pytest.mark.parametrize(
    "spec, phrase",
    [
        ("nocolon", "must look like package.module:factory or file.py:factory"),
        ("mod:", "must look like"),
        (":fn", "must look like"),
        ("nope.mod:fn", "cannot import 'nope.mod' (ModuleNotFoundError"),
        ("missing_file.py:fn", "file missing_file.py does not exist"),
        ("os:no_such_function", "'os' has no callable 'no_such_function'"),
        ("qlin_test_src_factory_err.py:VALUE", "has no callable 'VALUE'"),
        ("qlin_test_src_raises.py:build", "cannot import 'qlin_test_src_raises.py' (ZeroDivisionError"),
    ],
)
def test_load_factory_errors(tmp_path, monkeypatch, spec, phrase):
    monkeypatch.chdir(tmp_path)
    write_factory(tmp_path, "qlin_test_src_factory_err")
    (tmp_path / "qlin_test_src_raises.py").write_text("x = 1 / 0\n")
    with pytest.raises(InputError) as exc:
        load_factory(spec)
    text = message(exc)
    assert text.startswith(f"`model` {spec!r}")
    assert phrase in text


def test_factory_that_raises_or_returns_non_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qlin_test_src_bad.py").write_text(
        "def boom():\n    raise ValueError('no such size\\nsecond line')\n\ndef number():\n    return 7\n"
    )
    torch.save(small_mlp().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(InputError) as exc:
        load_source("sd.pt", model="qlin_test_src_bad.py:boom")
    assert message(exc) == "`model` 'qlin_test_src_bad.py:boom': the factory raised ValueError: no such size"
    with pytest.raises(InputError) as exc:
        load_source("sd.pt", model="qlin_test_src_bad.py:number")
    assert message(exc) == "`model` 'qlin_test_src_bad.py:number' returned int, not an nn.Module"


# ----------------------------------------------------------------------------- read_checkpoint


def test_pickled_torch_nn_module_loads_without_trust():
    obj, kind = read_checkpoint(DIGITS_PT)
    assert kind == "pickled module"
    assert isinstance(obj, nn.Sequential)
    assert [type(m).__name__ for m in obj] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert_state_equal(obj, digits_state())


def test_legacy_format_state_dict_loads_and_whole_module_names_the_format(tmp_path, in_repo):
    """torch.save(..., _use_new_zipfile_serialization=False): a state dict loads as from the zip
    format; a whole module cannot be read with weights_only (the legacy format pickles each
    class's source code), and the message says the format is the reason and what to do."""
    model = load_source(DIGITS_PT).model
    torch.save(model.state_dict(), tmp_path / "sd.pt", _use_new_zipfile_serialization=False)
    loaded = load_source(tmp_path / "sd.pt", model=DIGITS_FACTORY).model
    assert_state_equal(loaded, digits_state())
    torch.save(model, tmp_path / "whole.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(InputError) as exc:
        read_checkpoint(tmp_path / "whole.pt")
    msg = str(exc.value)
    assert "legacy (non-zip) torch.save format" in msg and "torch.save(model, path)" in msg
    assert "`trust_pickle`" in msg and "\n" not in msg
    obj, kind = read_checkpoint(tmp_path / "whole.pt", trust_pickle=True)  # the user trusts it
    assert kind == "pickled module" and isinstance(obj, nn.Sequential)


def test_safetensors_state_dict():
    obj, kind = read_checkpoint(DIGITS_SD)
    assert kind == "safetensors state dict"
    assert sorted(obj) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]


def test_module_of_own_class_needs_trust(tmp_path, monkeypatch):
    (tmp_path / "qlin_test_src_own.py").write_text(
        "from torch import nn\n\nclass OwnNet(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(3, 2)\n\n"
        "    def forward(self, x):\n        return self.fc(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import qlin_test_src_own

    src = tmp_path / "own.pt"
    torch.save(qlin_test_src_own.OwnNet(), src)
    with pytest.raises(InputError) as exc:
        read_checkpoint(src)
    text = message(exc)
    assert "qlin_test_src_own.OwnNet" in text and "`trust_pickle`" in text and "`model`" in text
    obj, kind = read_checkpoint(src, trust_pickle=True)  # importable here, and trusted
    assert kind == "pickled module" and type(obj).__name__ == "OwnNet"
    assert (obj.fc.in_features, obj.fc.out_features) == (3, 2)


def test_non_model_content_is_rejected(tmp_path):
    src = tmp_path / "list.pt"
    torch.save([torch.zeros(2), torch.ones(2)], src)
    with pytest.raises(InputError) as exc:
        read_checkpoint(src)
    assert "holds a list, not a model or a state dict" in message(exc)


def test_qlin_file_is_rejected_as_source(tmp_path):
    from qlin_cli import QuantConfig, quantize_model, save_quantized

    out = tmp_path / "q.safetensors"
    save_quantized(quantize_model(small_mlp(), QuantConfig()), out)
    with pytest.raises(InputError) as exc:
        read_checkpoint(out)
    assert "already a qlin int8 file" in message(exc)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_garbage_is_an_input_error(tmp_path, suffix):
    src = tmp_path / f"garbage{suffix}"
    src.write_bytes(b"this is not a checkpoint at all\n" * 20)
    with pytest.raises(InputError) as exc:
        read_checkpoint(src)
    assert str(src) in message(exc)


def test_errors_are_qlin_errors():
    assert issubclass(InputError, QlinError)


# ----------------------------------------------------------------------------- load_tensors


def test_load_tensors_single_tensor_safetensors():
    t = load_tensors(SAMPLES / "digits_test.safetensors")
    assert isinstance(t, torch.Tensor)
    assert tuple(t.shape) == (450, 64) and t.dtype == torch.float32
    labels = load_tensors(SAMPLES / "digits_test_labels.safetensors", "labels")
    assert tuple(labels.shape) == (450,) and labels.dtype == torch.int64


def test_load_tensors_dict_of_several(tmp_path):
    ids, mask = torch.arange(12).reshape(3, 4), torch.ones(3, 4, dtype=torch.bool)
    path = tmp_path / "kw.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask}, path)
    got = load_tensors(path)
    assert isinstance(got, dict) and set(got) == {"input_ids", "attention_mask"}
    assert torch.equal(got["input_ids"], ids) and torch.equal(got["attention_mask"], mask)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_tensors_rejects_disagreeing_samples(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    data = {"a": torch.zeros(3, 4), "b": torch.zeros(5, 4)}
    save_file(data, path) if suffix == ".safetensors" else torch.save(data, path)
    with pytest.raises(InputError) as exc:
        load_tensors(path)
    text = message(exc)
    assert "disagree on the number of samples" in text and "'a': 3" in text and "'b': 5" in text


def test_load_tensors_plain_tensor_pt(tmp_path):
    t = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "x.pt"
    torch.save(t, path)
    got = load_tensors(path)
    assert isinstance(got, torch.Tensor) and torch.equal(got, t)
    torch.save({"only": t}, tmp_path / "one.pt")  # a dict of one tensor gives the tensor
    assert torch.equal(load_tensors(tmp_path / "one.pt"), t)


def test_load_tensors_rejects_scalar_and_other_objects(tmp_path):
    torch.save(torch.tensor(3.0), tmp_path / "scalar.pt")
    with pytest.raises(InputError) as exc:
        load_tensors(tmp_path / "scalar.pt")
    assert "holds a scalar" in message(exc)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(InputError) as exc:
        load_tensors(tmp_path / "list.pt", "labels")
    assert message(exc).startswith(f"labels {tmp_path / 'list.pt'} holds a list")


def test_load_tensors_refuses_pickled_code(tmp_path):
    class Marker:
        def __reduce__(self):
            return (open, (str(tmp_path / "MARKER"), "w"))

    torch.save({"x": torch.zeros(2), "m": Marker()}, tmp_path / "evil.pt")
    with pytest.raises(InputError) as exc:
        load_tensors(tmp_path / "evil.pt")
    assert "cannot be loaded as tensors" in message(exc)
    assert not (tmp_path / "MARKER").exists()


def test_load_tensors_missing_file(tmp_path):
    with pytest.raises(InputError) as exc:
        load_tensors(tmp_path / "nope.safetensors", "labels")
    assert message(exc) == f"labels {tmp_path / 'nope.safetensors'} does not exist"


# ----------------------------------------------------------------------------- what_is: what a path is


@pytest.fixture(scope="module")
def quantized_outputs(tmp_path_factory):
    """A qlin file and a compressed-tensors folder, both written by qlin from a small MLP."""
    from qlin_cli import QuantConfig, quantize_model, save_quantized
    from qlin_cli.export import save_compressed_tensors

    root = tmp_path_factory.mktemp("quantized")
    save_quantized(quantize_model(small_mlp(), QuantConfig(kernel="fbgemm")), root / "q.safetensors")
    save_compressed_tensors(quantize_model(small_mlp(), QuantConfig(kernel="fbgemm")), root / "ct")
    return root


def test_what_is_a_qlin_file(quantized_outputs):
    kind = what_is(quantized_outputs / "q.safetensors")
    assert kind.kind == QLIN_FILE and kind.quantized and not kind.folder
    assert kind.header.metadata["format"] == "qlin" and kind.header_problem is None
    assert kind.stream_problem() is None  # a safetensors file; loading it as a source refuses it
    with pytest.raises(InputError, match="already a qlin int8 file"):
        load_source(kind)


def test_what_is_a_compressed_tensors_folder_and_its_weights(quantized_outputs):
    folder = what_is(quantized_outputs / "ct")
    assert folder.kind == QUANTIZED_FOLDER and folder.quant_method == "compressed-tensors"
    assert folder.quantized and folder.folder and folder.header is None
    assert folder.weight_files().files == (quantized_outputs / "ct" / "model.safetensors",)
    weights = what_is(quantized_outputs / "ct" / "model.safetensors")
    assert weights.kind == CT_WEIGHTS and weights.quantized and "qlin_plan" in weights.header.metadata


def test_what_is_a_hugging_face_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from qlin_cli.hf import HF_KIND

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    kind = what_is(tmp_path / "bert")
    assert kind.kind == HF_KIND and kind.folder and not kind.quantized and kind.quant_method is None
    assert kind.weight_files().kind == "model.safetensors" and kind.stream_problem() is None
    assert load_source(kind).kind == "Hugging Face folder (BertModel, model.safetensors)"


def test_what_is_a_folder_with_pickled_weights_or_none(tmp_path):
    for name in ("bin", "none"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    torch.save(small_mlp().state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert what_is(tmp_path / "bin").stream_problem() == f"{tmp_path / 'bin'} holds pytorch_model.bin weights, a pickle that loads whole"
    none = what_is(tmp_path / "none")  # found out now, said when the weights are needed
    assert none.weights is None and not none.quantized
    with pytest.raises(InputError) as exc:
        none.weight_files()
    assert message(exc) == (f"{tmp_path / 'none'} has a config.json but no weights: expected model.safetensors, "
                            "model.safetensors.index.json (+ shards) or pytorch_model.bin")


def test_what_is_a_folder_of_another_quantization_method(tmp_path):
    (tmp_path / "gptq").mkdir()
    (tmp_path / "gptq" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    kind = what_is(tmp_path / "gptq")
    assert (kind.kind, kind.quant_method, kind.quantized) == (QUANTIZED_FOLDER, "gptq", True)


def test_what_is_a_state_dict(tmp_path, in_repo):
    torch.save(digits_state(), tmp_path / "sd.pt")
    pt = what_is(tmp_path / "sd.pt")
    assert (pt.kind, pt.header, pt.quantized) == (PICKLE, None, False)
    assert pt.stream_problem() == f"{tmp_path / 'sd.pt'} is a pickle, which loads whole"
    st = what_is(DIGITS_SD)
    assert st.kind == SAFETENSORS and not st.quantized and st.stream_problem() is None
    assert set(st.header.tensors) == set(digits_state()) and st.header.metadata == {}
    assert_state_equal(load_source(st, model=DIGITS_FACTORY).model, digits_state())


def test_what_is_a_pickled_module(tmp_path):
    torch.save(small_mlp(), tmp_path / "whole.pt")
    kind = what_is(tmp_path / "whole.pt")
    assert kind.kind == PICKLE  # a state dict or a module: only loading tells
    assert read_checkpoint(kind)[1] == "pickled module"


def test_what_is_keeps_a_damaged_header_for_the_loader(tmp_path):
    src = tmp_path / "cut.safetensors"
    src.write_bytes(DIGITS_SD.read_bytes()[:-10])
    kind = what_is(src)
    assert kind.kind == SAFETENSORS and kind.header is None
    assert kind.header_problem.startswith("ValueError: the tensors take ")
    with pytest.raises(InputError) as exc:
        load_source(kind, model=DIGITS_FACTORY)
    assert message(exc) == f"source {src} is not a valid safetensors file ({kind.header_problem})"


@pytest.mark.parametrize("make, what, phrase", [
    (lambda p: p / "missing.pt", "source", "does not exist"),
    (lambda p: p, "source", "is a folder but not a model folder (it has no config.json)"),
    (lambda p: p, "file", "is a folder but not a model folder (it has no config.json)"),
    (_empty, "source", "is empty"),
], ids=["missing", "plain-folder", "plain-folder-as-file", "empty"])
def test_what_is_refuses_what_is_no_model(tmp_path, make, what, phrase):
    path = make(tmp_path)
    with pytest.raises(InputError) as exc:
        what_is(path, what)
    assert message(exc) == f"{what} {path} {phrase}"


def test_loaders_take_the_kind_without_deciding_it_again(tmp_path, in_repo, monkeypatch):
    import qlin_cli.sources as sources

    kinds = [what_is(DIGITS_PT), what_is(DIGITS_SD)]
    monkeypatch.setattr(sources, "what_is", lambda *a, **k: pytest.fail("what_is called again"))
    assert load_source(kinds[0]).kind == "pickled module"
    assert load_source(kinds[1], model=DIGITS_FACTORY).kind == "safetensors state dict"
    assert read_checkpoint(kinds[1])[1] == "safetensors state dict"
    lazy = sources.load_source_lazily(kinds[1], model=DIGITS_FACTORY)
    assert lazy.tensor("0.weight").shape == digits_state()["0.weight"].shape
