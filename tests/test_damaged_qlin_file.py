"""qlin files changed after they were written.

1. Files whose metadata disagrees with their tensors, a future format version, a stray tensor:
   inspect and eval exit 1 with one line naming the file, no traceback, nothing written.
2. Fuzzing (hypothesis, derandomized): mutated qlin files either load (and the model runs) or
   raise QlinError with a one-line message; nothing else.
3. Integrity: `qlin inspect --verify` and `load_quantized(verify=True)` catch what validation
   cannot (flipped payload bits, swapped tensors).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import qlin_cli
from conftest import (
    assert_one_error_line, cli, files_in, join_header, quantize_once, sha256, split_header, tamper,
)
from qlin_cli import QlinError, load_quantized, quantize_model, read_qfile, save_quantized
from qlin_cli.api import inspect_path
from qlin_cli.errors import FormatError
from warm_qlin import warm_subprocess_qlin

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
DIGITS_PT = SAMPLES / "digits_mlp.pt"
TEST_INPUTS = SAMPLES / "digits_test.safetensors"

# load_factory (--model) puts the current folder on sys.path: conftest's fixture undoes it
pytestmark = pytest.mark.usefixtures("isolate_imports")


# ============================================================================= 1. disagreeing with itself


@pytest.fixture(scope="module")
def digits_static(tmp_path_factory) -> Path:
    """digits_mlp.pt quantized in static mode with SmoothQuant."""
    return quantize_once(tmp_path_factory.mktemp("digits_static"), "--mode", "static", "--smooth", "0.5",
                          "--calib", str(SAMPLES / "digits_calib.safetensors"), "--kernel", "fbgemm")


def _add_ghost_layer(plan: list[dict]) -> list[dict]:
    ghost = dict(next(e for e in plan if e["name"] == "4"), name="9")
    return [*plan, ghost]


def _set_plan(name: str, **changes):
    def edit(plan: list[dict]) -> list[dict]:
        for e in plan:
            if e["name"] == name:
                e.update(changes)
        return plan

    return edit


_nan_scale = torch.ones(256)


_nan_scale[3] = float("nan")


# name -> (tamper(...) keyword arguments, phrase of the one error line)
QLIN_MISMATCHES = {
    "weight of the wrong dtype": (
        dict(tensors={"0.weight": torch.zeros(256, 64, dtype=torch.float16)}), "0.weight is torch.float16"),
    "zero point of the wrong dtype": (
        dict(tensors={"2.weight_zero_point": torch.zeros(256, dtype=torch.int32)}), "2.weight_zero_point is torch.int32"),
    "bias of the wrong dtype": (dict(tensors={"4.bias": torch.zeros(10, dtype=torch.int64)}), "4.bias is torch.int64"),
    "scale of the wrong shape": (dict(tensors={"0.weight_scale": torch.ones(128)}), "0.weight_scale is torch.float32 (128,)"),
    "per-tensor scale for a per-channel plan": (dict(tensors={"2.weight_scale": torch.tensor(0.1)}), "2.weight_scale is torch.float32 ()"),
    "weight of the wrong shape": (
        dict(tensors={"4.weight": torch.zeros(256, 10, dtype=torch.int8)}), "4.weight is torch.int8 (256, 10)"),
    "a layer in the plan with no tensors": (
        dict(drop=("2.weight", "2.weight_scale", "2.weight_zero_point", "2.bias")), "layer '2' has no tensor 2.weight"),
    "a plan entry for a layer the file does not hold": (dict(plan=_add_ghost_layer), "layer '9' has no tensor 9.weight"),
    "a quantized layer's tensors with no plan entry": (
        dict(tensors={"9.weight": torch.zeros(3, 4, dtype=torch.int8), "9.weight_scale": torch.ones(3),
                      "9.weight_zero_point": torch.zeros(3, dtype=torch.int8)}),
        "9.weight_scale belongs to no quantized layer"),
    "plan says no bias, file has one": (dict(plan=_set_plan("0", has_bias=False)), "layer '0': bias unexpected"),
    "plan dtype is not a float dtype": (dict(plan=_set_plan("2", dtype="int8")), "not a float dtype"),
    "plan mode unknown": (dict(plan=_set_plan("2", mode="int4")), "layer '2' has an invalid scheme"),
    "plan size negative": (dict(plan=_set_plan("4", out_features=-10)), "layer '4' has shape (-10, 256)"),
    "plan size a string": (dict(plan=_set_plan("4", in_features="256")), "has no valid 'in_features'"),
    "NaN scale": (dict(tensors={"0.weight_scale": _nan_scale}), "not finite and positive"),
    "format version 4": (dict(meta={"format_version": "4"}), "format version 4; this qlin reads up to 3: upgrade qlin"),
    "format version not a number": (dict(meta={"format_version": "one"}), "format_version 'one' is not a number"),
    "format version 0": (dict(meta={"format_version": "0"}), "format_version 0 is not valid"),
    "config missing": (dict(meta={"config": None}), "metadata has no 'config'"),
    "static layer without its input scale": (dict(static=True, drop=("2.input_scale",)), "layer '2' has no tensor 2.input_scale"),
    "static input zero point of the wrong dtype": (
        dict(static=True, tensors={"0.input_zero_point": torch.tensor(3, dtype=torch.uint8)}), "0.input_zero_point is torch.uint8"),
    "SmoothQuant scale of the wrong shape": (dict(static=True, tensors={"4.smooth_scale": torch.ones(10)}), "4.smooth_scale is torch.float32 (10,)"),
    "static tensor on a dynamic layer": (dict(tensors={"2.input_scale": torch.tensor(0.5)}), "2.input_scale"),
}


@pytest.mark.parametrize("case", list(QLIN_MISMATCHES))
@pytest.mark.parametrize("command", ["inspect", "inspect --verify", "eval"])
def test_qlin_file_that_disagrees_with_itself(case, command, request, tmp_path, capsys):
    change, phrase = QLIN_MISMATCHES[case]
    change = copy.deepcopy(change)
    digits_q = request.getfixturevalue("digits_static" if change.pop("static", False) else "digits_q")
    meta = change.pop("meta", None)
    if meta and None in meta.values():  # deleting a metadata key
        t = load_file(digits_q)
        with safe_open(digits_q, "pt") as f:
            m = {k: v for k, v in f.metadata().items() if meta.get(k, "") is not None}
        save_file(t, tmp_path / "bad.safetensors", metadata=m)
        bad = tmp_path / "bad.safetensors"
    else:
        bad = tamper(digits_q, tmp_path / "bad.safetensors", meta=meta, **change)
    before = files_in(tmp_path)
    if command == "eval":
        args = ["eval", DIGITS_PT, bad, "--inputs", TEST_INPUTS, "--repeats", "1"]
    else:
        args = command.split() + [bad]
    code, stdout, stderr = cli(capsys, *args)
    assert code == 1
    line = assert_one_error_line(stderr)
    assert phrase in line and str(bad) in line
    assert stdout == ""
    assert files_in(tmp_path) == before


def test_inspect_json_of_a_bad_qlin_file_prints_nothing_on_stdout(digits_q, tmp_path, capsys):
    bad = tamper(digits_q, tmp_path / "bad.safetensors", meta={"format_version": "4"})
    code, stdout, stderr = cli(capsys, "inspect", bad, "--json")
    assert code == 1 and stdout == ""
    assert "upgrade qlin" in assert_one_error_line(stderr)


def test_stray_float_tensor_is_shown_by_inspect_and_refused_by_eval(digits_q, tmp_path, capsys):
    """A tensor that belongs to no layer: inspect cannot know (a float model may hold any tensor),
    but loading it into the model it claims to come from must fail, naming the tensor."""
    bad = tamper(digits_q, tmp_path / "bad.safetensors", tensors={"extra.weight": torch.zeros(3)})
    code, stdout, stderr = cli(capsys, "inspect", bad, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["tensors"] == len(load_file(digits_q)) + 1
    code, stdout, stderr = cli(capsys, "eval", DIGITS_PT, bad, "--inputs", TEST_INPUTS, "--repeats", "1")
    assert code == 1 and stdout == ""
    line = assert_one_error_line(stderr)
    assert "does not fit the model" in line and "1 unexpected" in line and "'extra.weight'" in line


def test_format_version_4_is_refused_by_the_entry_point(digits_q, tmp_path):
    bad = tamper(digits_q, tmp_path / "v2.safetensors", meta={"format_version": "4"})
    proc = warm_subprocess_qlin("inspect", bad, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "format version 4; this qlin reads up to 3: upgrade qlin" in assert_one_error_line(proc.stderr)


# ============================================================================= 2. fuzzing


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


# the files mutated: the default scheme, and one with every optional tensor (static input
# scale and zero point, SmoothQuant scales) and per-tensor asymmetric weights
FUZZ_BASES = {
    "dynamic": lambda: qlin_cli.QuantConfig(kernel="fbgemm"),  # a kernel named: auto keeps layers this small float
    "static-smooth-tensor-asym": lambda: qlin_cli.QuantConfig(mode="static", smooth=0.5, granularity="tensor",
                                                               symmetric=False, kernel="fbgemm"),
}


def _fuzz_base(folder: Path, base: str) -> dict:
    config = FUZZ_BASES[base]()
    if config.calibration_need() is not None:
        result = quantize_model(_tiny(), config, calib=torch.randn(32, 16, generator=torch.Generator().manual_seed(1)))
    else:
        result = quantize_model(_tiny(), config)
    raw = save_quantized(result, folder / "good.safetensors").read_bytes()
    header, payload = split_header(raw)
    return {"raw": raw, "header": header, "payload": payload, "path": folder / "mutated.safetensors",
            "x": torch.randn(2, 16, generator=torch.Generator().manual_seed(0))}


@pytest.fixture(scope="module", params=list(FUZZ_BASES))
def fuzz(request, tmp_path_factory) -> dict:
    return _fuzz_base(tmp_path_factory.mktemp("fuzz"), request.param)


@pytest.fixture(scope="module")
def fuzz_dynamic(tmp_path_factory) -> dict:
    return _fuzz_base(tmp_path_factory.mktemp("fuzz"), "dynamic")


def test_fuzz_bases_load_and_run(fuzz):
    """The unmutated files load and run (so the fuzz tests start from a valid file)."""
    path = fuzz["path"]
    path.write_bytes(fuzz["raw"])
    read_qfile(path, verify=True)
    with torch.no_grad():
        assert load_quantized(_tiny(), path, verify=True)(fuzz["x"]).shape == (2, 4)


def _only_load_or_qlin_error(fuzz: dict, data: bytes) -> None:
    """The reader used by `qlin inspect` and load_quantized either work (and the model runs) or
    raise QlinError with a one-line message naming the file."""
    path = fuzz["path"]
    path.write_bytes(data)
    for what, fn in (
        ("read_qfile", lambda: read_qfile(path)),
        ("inspect", lambda: inspect_path(path)),
        ("load_quantized", lambda: load_quantized(_tiny(), path)),
    ):
        try:
            result = fn()
        except QlinError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg and str(path) in msg, f"{what}: unclear message {msg!r}"
            continue
        if what == "load_quantized":
            with torch.no_grad():
                y = result(fuzz["x"])
            assert y.shape == (2, 4)


FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


OPS = st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 2**31), st.integers(0, 255))


@FUZZ
@given(ops=st.lists(OPS, min_size=1, max_size=4))
def test_fuzz_bytes(fuzz, ops):
    data = bytearray(fuzz["raw"])
    for op, pos, byte in ops:
        i = pos % (len(data) + (op == "insert"))
        if op == "flip" and data:
            data[i % len(data)] ^= 1 << (byte % 8)
        elif op == "set" and data:
            data[i % len(data)] = byte
        elif op == "insert":
            data[i:i] = bytes([byte])
        elif op == "delete" and data:
            del data[i % len(data) : i % len(data) + 1 + byte % 8]
    _only_load_or_qlin_error(fuzz, bytes(data))


@settings(FUZZ, max_examples=30)
@given(cut=st.integers(0, 10**6))
def test_fuzz_truncation(fuzz, cut):
    _only_load_or_qlin_error(fuzz, fuzz["raw"][: cut % len(fuzz["raw"])])


@settings(FUZZ, max_examples=50)
@given(edits=st.lists(st.tuples(st.integers(0, 2**31), st.sampled_from(list(b'{}[]",:0123456789-.etrufalsn \\'))),
                      min_size=1, max_size=3))
def test_fuzz_header_characters(fuzz, edits):
    raw = bytearray(fuzz["raw"])
    n = int.from_bytes(raw[:8], "little")
    for pos, ch in edits:
        raw[8 + pos % n] = ch
    _only_load_or_qlin_error(fuzz, bytes(raw))


WORDS = ["dynamic", "weight-only", "static", "tensor", "channel", "group", "token", "auto", "fbgemm", "int_mm",
         "weight_only", "dequant", "float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "int8", "complex64",
         "quantized", "skipped", "qlin", "0", "2", "1", "-1", "", "2.weight", "minmax", "absmax", "mse",
         "percentile", "moving-average"]


JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8), st.sampled_from(WORDS),
)


JSON = st.recursive(JSON_LEAF, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=8)


def _with_metadata(fuzz: dict, **changes) -> bytes:
    header = copy.deepcopy(fuzz["header"])
    for key, value in changes.items():
        if value is _DELETE:
            header["__metadata__"].pop(key, None)
        else:
            header["__metadata__"][key] = value
    return join_header(header, fuzz["payload"])


_DELETE = object()


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_fuzz_metadata_values(fuzz, data):
    """Replace or delete values of random metadata keys (strings, JSON text, or non-strings,
    which safetensors itself refuses)."""
    keys = sorted(fuzz["header"]["__metadata__"]) + ["unknown"]
    changes = {}
    for key in data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        changes[key] = data.draw(st.one_of(
            st.just(_DELETE), st.sampled_from(WORDS), st.text(max_size=20), JSON.map(json.dumps), JSON,
        ))
    _only_load_or_qlin_error(fuzz, _with_metadata(fuzz, **changes))


@settings(FUZZ, max_examples=70)
@given(data=st.data())
def test_fuzz_plan_entries(data, fuzz):
    """Plan entries with values of the wrong type, negative or huge sizes, unknown modes, missing
    keys ('aliases' has its own test)."""
    plan = json.loads(fuzz["header"]["__metadata__"]["plan"])
    for _ in range(data.draw(st.integers(1, 3))):
        entry = plan[data.draw(st.integers(0, len(plan) - 1))]
        key = data.draw(st.sampled_from(sorted(set(entry) - {"aliases"}) + ["unknown"]))
        if data.draw(st.booleans()):
            entry.pop(key, None)
        else:
            entry[key] = data.draw(st.one_of(JSON, st.integers(-(2**40), 2**40), st.sampled_from(WORDS)))
    _only_load_or_qlin_error(fuzz, _with_metadata(fuzz, plan=json.dumps(plan)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # hypothesis reports failures through libcst
@settings(FUZZ, max_examples=40, phases=[Phase.explicit, Phase.generate])  # no shrinking: it fails today
@given(data=st.data())
def test_fuzz_plan_aliases(data, fuzz_dynamic):
    fuzz = fuzz_dynamic
    plan = json.loads(fuzz["header"]["__metadata__"]["plan"])
    entry = plan[data.draw(st.integers(0, len(plan) - 1))]
    entry["aliases"] = data.draw(st.lists(
        st.one_of(st.integers(-3, 3), st.text(max_size=4), st.sampled_from(["0", "1", "2", "0.weight", "nope.x", ""])),
        min_size=1, max_size=3,
    ))
    _only_load_or_qlin_error(fuzz, _with_metadata(fuzz, plan=json.dumps(plan)))


@pytest.mark.parametrize(
    "aliases",
    [[1], ["nope.x"], ["x"], ["1"], ["0.weight"]],
    ids=["not a string", "a path the model lacks", "a new attribute", "the ReLU", "a parameter"],
)
def test_plan_aliases_must_name_the_same_linear(aliases, fuzz_dynamic):
    plan = json.loads(fuzz_dynamic["header"]["__metadata__"]["plan"])
    plan[0]["aliases"] = aliases
    _only_load_or_qlin_error(fuzz_dynamic, _with_metadata(fuzz_dynamic, plan=json.dumps(plan)))


CONFIG_KEYS = ["mode", "granularity", "symmetric", "act_granularity", "kernel", "skip", "observer",
               "weight_observer", "percentile", "smooth"]


@settings(FUZZ, max_examples=50)
@given(which=st.sampled_from(["plan", "config"]), value=st.one_of(
    JSON,
    st.fixed_dictionaries({}, optional={k: st.one_of(JSON, st.sampled_from(WORDS)) for k in CONFIG_KEYS}),
    st.lists(st.dictionaries(st.sampled_from(["name", "status", "in_features", "out_features", "has_bias", "aliases",
                                              "mode", "granularity"]), JSON), max_size=3),
))
def test_fuzz_arbitrary_json_plan_and_config(fuzz, which, value):
    _only_load_or_qlin_error(fuzz, _with_metadata(fuzz, **{which: json.dumps(value)}))


@pytest.mark.parametrize("which", ["plan", "config"])
@pytest.mark.parametrize("text", ["9" * 5000, "[" * 100_000 + "]" * 100_000], ids=["huge int", "deep nesting"])
def test_pathological_json_in_metadata(fuzz_dynamic, which, text):
    _only_load_or_qlin_error(fuzz_dynamic, _with_metadata(fuzz_dynamic, **{which: text}))


# ============================================================================= 3. integrity


def _payload_offsets(path: Path, tensor: str) -> tuple[int, int]:
    """Absolute byte range of `tensor` in the file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _flip(src: Path, dst: Path, tensor: str) -> Path:
    begin, end = _payload_offsets(src, tensor)
    data = bytearray(src.read_bytes())
    data[(begin + end) // 2] ^= 0x10
    dst.write_bytes(bytes(data))
    return dst


def test_inspect_verify_good_file(digits_q, capsys):
    raw = digits_q.read_bytes()
    _, payload = split_header(raw)
    code, stdout, stderr = cli(capsys, "inspect", digits_q, "--verify")
    assert code == 0, stderr
    assert f"payload sha256 verified: {sha256(payload)}" in stdout
    info = json.loads(cli(capsys, "inspect", digits_q, "--json", "--verify")[1])
    assert info["verified"] is True and info["metadata"]["payload_sha256"] == sha256(payload)
    info = json.loads(cli(capsys, "inspect", digits_q, "--json")[1])
    assert info["verified"] is False


def test_inspect_verify_flipped_weight_bit(digits_q, tmp_path, capsys):
    bad = _flip(digits_q, tmp_path / "flipped.safetensors", "2.weight")
    assert bad.stat().st_size == digits_q.stat().st_size
    code, _, stderr = cli(capsys, "inspect", bad)  # shapes and dtypes are fine: only the hash tells
    assert code == 0, stderr
    code, stdout, stderr = cli(capsys, "inspect", bad, "--verify")
    assert code == 1 and stdout == ""
    line = assert_one_error_line(stderr)
    assert str(bad) in line and "sha256" in line and "does not match" in line
    code, stdout, stderr = cli(capsys, "inspect", bad, "--json", "--verify")
    assert code == 1 and stdout == ""
    assert "does not match" in assert_one_error_line(stderr)


@pytest.mark.parametrize(
    "meta, phrase",
    [({"payload_sha256": "0" * 64}, "does not match the recorded 000000000000"),
     ({"payload_sha256": ""}, "records no payload_sha256")],
)
def test_inspect_verify_bad_recorded_hash(meta, phrase, digits_q, tmp_path, capsys):
    bad = tamper(digits_q, tmp_path / "bad.safetensors", meta=meta)
    code, _, stderr = cli(capsys, "inspect", bad, "--verify")
    assert code == 1
    assert phrase in assert_one_error_line(stderr)


def test_inspect_verify_of_a_float_file_is_refused(capsys):
    code, _, stderr = cli(capsys, "inspect", SAMPLES / "digits_mlp.safetensors", "--verify")
    assert code == 1
    assert "not one" in assert_one_error_line(stderr)


def test_load_quantized_verify(fuzz_dynamic, tmp_path):
    fuzz = fuzz_dynamic
    good = tmp_path / "good.safetensors"
    good.write_bytes(fuzz["raw"])
    x = fuzz["x"]
    with torch.no_grad():
        expected = load_quantized(_tiny(), good)(x)
        assert torch.equal(load_quantized(_tiny(), good, verify=True)(x), expected)
    for tensor in ("0.weight", "2.weight", "0.bias"):
        bad = _flip(good, tmp_path / "bad.safetensors", tensor)
        loaded = load_quantized(_tiny(), bad).state_dict()  # loads, silently different
        assert not torch.equal(loaded[tensor], load_file(good)[tensor])
        with pytest.raises(FormatError, match=r"payload sha256 \w+\.\.\. does not match"):
            load_quantized(_tiny(), bad, verify=True)


def test_verify_detects_swapped_tensors(digits_q, tmp_path, capsys):
    header, payload = split_header(digits_q.read_bytes())
    header["0.weight_scale"]["data_offsets"], header["2.weight_scale"]["data_offsets"] = (
        header["2.weight_scale"]["data_offsets"], header["0.weight_scale"]["data_offsets"])
    bad = tmp_path / "swapped.safetensors"
    bad.write_bytes(join_header(header, payload))
    assert not torch.equal(load_file(bad)["0.weight_scale"], load_file(digits_q)["0.weight_scale"])
    code, _, stderr = cli(capsys, "inspect", bad, "--verify")
    assert code == 1
    assert "does not match" in assert_one_error_line(stderr)
