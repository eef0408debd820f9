"""qlin_cli.files: the safetensors header reader (bounded, validated), atomic writes of a file
or a folder, and the checks made on inputs and outputs before anything is read or written,
each with the exact one-line message a user sees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qlin_cli.errors import InputError, OutputError
from qlin_cli.files import (
    MAX_HEADER, HASH_KEYS, check_distinct, check_file, check_output, check_output_dir, header_digest, read_header,
    safetensors_writer, same_file, size_bytes, temporary_name, write_atomic, write_folder_atomic,
)


def _raw(header: bytes | dict, payload: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file's bytes: the 8-byte length (`length`, default the header's), the
    header (JSON of a dict, or given bytes) and the payload."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + payload


def _f32(shape: list, start: int, end: int, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def _file(tmp_path: Path, data: bytes, name: str = "x.safetensors") -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def _refusal(path: Path) -> str:
    with pytest.raises(ValueError) as exc:
        read_header(path)
    assert "\n" not in str(exc.value)
    return str(exc.value)


# ----------------------------------------------------------------------------- read_header


def test_read_header_of_a_written_file(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.int8).reshape(2, 3), "a": torch.ones(4), "c": torch.zeros(0, 5)}
    path = write_atomic(tmp_path / "x.safetensors", safetensors_writer(tensors, {"k": "v", "j": "w"}), force=False)
    header = read_header(path)
    text_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header.size == text_len
    assert header.metadata == {"j": "w", "k": "v"}
    # the writer's canonical order: the widest elements first, then by name
    assert list(header.tensors) == ["a", "c", "b"]
    a, c, b = header.tensors["a"], header.tensors["c"], header.tensors["b"]
    assert (a.dtype, a.shape, a.start, a.end, a.torch_dtype) == ("F32", (4,), 0, 16, torch.float32)
    assert (c.dtype, c.shape, c.start, c.end) == ("F32", (0, 5), 16, 16)
    assert (b.dtype, b.shape, b.start, b.end, b.torch_dtype) == ("I8", (2, 3), 16, 22, torch.int8)
    assert header.nbytes == 22 == path.stat().st_size - 8 - text_len
    with safe_open(path, "pt") as f:  # what safetensors itself reads
        assert sorted(f.keys()) == sorted(header.tensors) and f.metadata() == header.metadata


def test_read_header_without_metadata_or_tensors(tmp_path):
    header = read_header(_file(tmp_path, _raw({})))
    assert (header.size, header.tensors, header.metadata, header.nbytes) == (2, {}, {}, 0)


def test_dtype_that_torch_names_otherwise_reads_with_no_torch_dtype(tmp_path):
    header = read_header(_file(tmp_path, _raw({"w": _f32([4], 0, 8, "U16")}, bytes(8))))
    assert header.tensors["w"].torch_dtype is None and header.nbytes == 8


def test_sub_byte_dtype_counts_bits(tmp_path):
    assert read_header(_file(tmp_path, _raw({"w": _f32([4], 0, 2, "F4")}, bytes(2)))).nbytes == 2
    odd = _file(tmp_path, _raw({"w": _f32([3], 0, 2, "F4")}, bytes(2)), "odd.safetensors")
    assert _refusal(odd) == "tensor 'w': F4 [3] takes 12 bits, its data_offsets [0, 2] hold 2 bytes"


def test_digest_of_the_header_read_matches_the_one_recorded(tmp_path):
    path = write_atomic(tmp_path / "x.safetensors",
                        safetensors_writer({"w": torch.ones(3)}, {"k": "v"}, digests=True), force=False)
    header = read_header(path)
    assert set(HASH_KEYS) <= set(header.metadata)
    assert header_digest(header.raw) == header.metadata["header_sha256"]


@pytest.mark.parametrize("data, message", [
    (_raw({"w": _f32([4], 0, 16)}, bytes(16), length=10**6), "header length 1000000 does not fit a file of 86 bytes"),
    (_raw(b'{"a": 1}', bytes(50), length=2**64 - 1), "header length 18446744073709551615 does not fit a file of 66 bytes"),
    (_raw(b'{"a": 1}', bytes(50), length=1), "header length 1 does not fit a file of 66 bytes"),
    (b"\x10\x00\x00", "header length 16 does not fit a file of 3 bytes"),
], ids=["length-beyond-file", "length-2**64-1", "length-1", "shorter-than-the-length-field"])
def test_header_length_that_does_not_fit_the_file(tmp_path, data, message):
    assert _refusal(_file(tmp_path, data)) == message


def test_header_length_beyond_the_limit_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "big.safetensors"
    with path.open("wb") as f:  # a sparse file: the declared header would fit the file, not the limit
        f.write((MAX_HEADER + 1).to_bytes(8, "little"))
        f.truncate(MAX_HEADER + 100)
    assert _refusal(path) == f"header length {MAX_HEADER + 1} does not fit a file of {MAX_HEADER + 100} bytes"


def test_truncated_file(tmp_path):
    full = _raw({"w": _f32([4], 0, 16), "v": _f32([2], 16, 24)}, bytes(24))
    assert _refusal(_file(tmp_path, full[:-5])) == "the tensors take 24 bytes but the file holds 19 after its header"


@pytest.mark.parametrize("text, exc_type", [
    (b'{"w": {"dtype": "F32", "shape": [4], data_offsets: [0, 16]}}', json.JSONDecodeError),
    (b'{"w": {"dtype": "F32", "sha', json.JSONDecodeError),
    (b'{"w\xff": 1}', UnicodeDecodeError),
], ids=["unquoted-key", "cut-short", "not-utf8"])
def test_header_that_is_not_json(tmp_path, text, exc_type):
    with pytest.raises(exc_type):  # a ValueError, which callers turn into their one-line error
        read_header(_file(tmp_path, _raw(text)))


def test_deeply_nested_json_is_a_value_error(tmp_path):
    text = b"[" * 100_000 + b"]" * 100_000
    assert "recursion" in _refusal(_file(tmp_path, _raw(text)))


@pytest.mark.parametrize("header, message", [
    (b"[1, 2, 3]", "the header is not a JSON object"),
    ({"__metadata__": {"a": 1}}, "the header's __metadata__ is not a map of strings to strings"),
    ({"__metadata__": ["a"]}, "the header's __metadata__ is not a map of strings to strings"),
    ({"__metadata__": None}, "the header's __metadata__ is not a map of strings to strings"),
])
def test_header_that_is_not_an_object_of_string_metadata(tmp_path, header, message):
    assert _refusal(_file(tmp_path, _raw(header))) == message


@pytest.mark.parametrize("entry", [
    _f32([4], 0, 16, "F33"), _f32([-4], 0, 16), _f32([4.0], 0, 16), _f32(["4"], 0, 16), _f32([True], 0, 4),
    {"shape": [4], "data_offsets": [0, 16]}, {"dtype": "F32", "data_offsets": [0, 16]}, 3, [1],
], ids=["unknown-dtype", "negative", "float", "string", "bool", "no-dtype", "no-shape", "int", "list"])
def test_entry_without_a_valid_shape_and_dtype(tmp_path, entry):
    assert _refusal(_file(tmp_path, _raw({"w": entry}, bytes(16)))) == "tensor 'w' has no valid shape and dtype"


@pytest.mark.parametrize("offsets", [None, [0], [0, 16, 3], [0.0, 16], [-16, 0]],
                         ids=["missing", "one", "three", "float", "negative"])
def test_entry_without_valid_data_offsets(tmp_path, offsets):
    entry = {"dtype": "F32", "shape": [4], **({} if offsets is None else {"data_offsets": offsets})}
    assert _refusal(_file(tmp_path, _raw({"w": entry}, bytes(16)))) == "tensor 'w' has no valid data_offsets [start, end]"


@pytest.mark.parametrize("tensors, payload, message", [
    ({"w": _f32([3], 0, 16)}, 16, "tensor 'w': F32 [3] takes 12 bytes, its data_offsets [0, 16] hold 16 bytes"),
    ({"w": _f32([0], 16, 0)}, 16, "tensor 'w': F32 [0] takes 0 bytes, its data_offsets [16, 0] hold -16 bytes"),
    ({"w": _f32([1000], 0, 4000)}, 16, "the tensors take 4000 bytes but the file holds 16 after its header"),
    ({"w": _f32([4], 0, 16), "v": _f32([4], 8, 24)}, 24,
     "tensor 'v' starts at byte 8 of the data, not at 16 where the one before it ends"),
    ({"w": _f32([2], 0, 8), "v": _f32([2], 16, 24)}, 24,
     "tensor 'v' starts at byte 16 of the data, not at 8 where the one before it ends"),
    ({"w": _f32([2], 8, 16)}, 16, "tensor 'w' starts at byte 8 of the data, not at 0 where the one before it ends"),
    ({"w": _f32([4], 0, 16)}, 24, "the tensors take 16 bytes but the file holds 24 after its header"),
    ({"w": _f32([25_000_000_000], 0, 100_000_000_000)}, 16,
     "the tensors take 100000000000 bytes but the file holds 16 after its header"),
], ids=["shape-vs-offsets", "reversed", "beyond-the-file", "overlapping", "gap", "not-from-0", "bytes-left-over",
        "claims-100GB"])
def test_offsets_must_tile_the_data(tmp_path, tensors, payload, message):
    assert _refusal(_file(tmp_path, _raw(tensors, bytes(payload)))) == message


def test_tensors_may_be_listed_in_any_order(tmp_path):
    header = read_header(_file(tmp_path, _raw({"v": _f32([2], 8, 16), "w": _f32([2], 0, 8)}, bytes(16))))
    assert list(header.tensors) == ["v", "w"] and header.nbytes == 16


# ----------------------------------------------------------------------------- atomic writes


def test_write_atomic_with_a_writer_function(tmp_path):
    path = write_atomic(tmp_path / "out.bin", lambda f: f.write(b"abc"), force=False)
    assert path == tmp_path / "out.bin" and path.read_bytes() == b"abc"
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["out.bin"]


def test_write_atomic_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomic(target, fail, force=True)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_write_atomic_into_a_missing_folder(tmp_path):
    with pytest.raises(OutputError) as exc:
        write_atomic(tmp_path / "no" / "out.bin", b"x", force=False)
    assert str(exc.value) == f"cannot write in {tmp_path / 'no'}: No such file or directory"


def test_temporary_name_is_hidden_beside_the_target_and_new_each_time(tmp_path):
    a, b = temporary_name(tmp_path / "out.bin"), temporary_name(tmp_path / "out.bin")
    assert a != b
    for name in (a, b):
        assert Path(name).parent == tmp_path and Path(name).name.startswith(".out.bin.")
    assert temporary_name(Path("out.bin")).startswith(".out.bin.")  # a bare name: the current folder


def test_write_folder_atomic_writes_replaces_and_refuses(tmp_path):
    out = tmp_path / "model"
    write_folder_atomic(out, {"a.txt": b"1", "b.bin": lambda f: f.write(b"22")}, force=False)
    assert sorted(os.listdir(out)) == ["a.txt", "b.bin"] and (out / "b.bin").read_bytes() == b"22"
    with pytest.raises(OutputError) as exc:
        write_folder_atomic(out, {"c.txt": b"3"}, force=False)
    assert str(exc.value) == f"output folder {out} exists; pass `force` to replace it"
    write_folder_atomic(out, {"c.txt": b"3"}, force=True)
    assert os.listdir(out) == ["c.txt"]  # the old files went with the old folder
    assert os.listdir(tmp_path) == ["model"]  # no temporary folder left


def test_write_folder_atomic_failure_keeps_the_old_folder(tmp_path):
    out = tmp_path / "model"
    write_folder_atomic(out, {"a.txt": b"1"}, force=False)

    def fail(f):
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        write_folder_atomic(out, {"a.txt": b"new", "b.txt": fail}, force=True)
    assert os.listdir(out) == ["a.txt"] and (out / "a.txt").read_bytes() == b"1"
    assert os.listdir(tmp_path) == ["model"]


# ----------------------------------------------------------------------------- checks of outputs


def test_check_output_refuses_an_input_even_with_force(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes(b"x")
    os.link(src, tmp_path / "link.pt")
    for out in (src, tmp_path / "link.pt"):  # the same path, or the same inode by a hard link
        with pytest.raises(OutputError) as exc:
            check_output(out, force=True, inputs=[("source", src), ("`calib`", None)])
        assert str(exc.value) == f"output {out} is the input file {src} (source); qlin never writes over an input"


def test_check_output_existing_file_needs_force(tmp_path):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(OutputError) as exc:
        check_output(out, force=False)
    assert str(exc.value) == f"output {out} exists; pass `force` to overwrite it"
    assert check_output(str(out), force=True) == out


@pytest.mark.parametrize("force", [False, True])
def test_check_output_refuses_a_symlink_even_dangling(tmp_path, force):
    out = tmp_path / "q.safetensors"
    out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="is a symbolic link .* qlin replaces only regular files, even with `force`"):
        check_output(out, force=force)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "output {p} is a directory"),
    (lambda p: os.mkfifo(p), "output {p} is a FIFO (named pipe); qlin writes only regular files, even with `force`"),
], ids=["directory", "fifo"])
def test_check_output_not_a_regular_file(tmp_path, make, message):
    out = tmp_path / "out"
    make(out)
    with pytest.raises(OutputError) as exc:
        check_output(out, force=True)
    assert str(exc.value) == message.format(p=out)


def test_check_output_folder_must_exist_and_be_a_folder(tmp_path):
    with pytest.raises(OutputError) as exc:
        check_output(tmp_path / "no" / "q.safetensors", force=False)
    assert str(exc.value) == f"output folder {tmp_path / 'no'} does not exist"
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(OutputError) as exc:
        check_output(tmp_path / "file" / "q.safetensors", force=False)
    assert str(exc.value) == f"output folder {tmp_path / 'file'} is a file, not a folder"


def test_check_distinct(tmp_path):
    a = tmp_path / "x.json"
    check_distinct([("`output`", tmp_path / "q.safetensors"), ("`report`", a), ("`calib`", None), ("md", None)])
    with pytest.raises(OutputError) as exc:
        check_distinct([("`output`", a), ("`report`", str(a))])
    assert str(exc.value) == f"`report` {a} and `output` {a} are the same file; give each its own path"
    a.write_bytes(b"x")
    os.link(a, tmp_path / "y.json")
    with pytest.raises(OutputError, match="are the same file"):
        check_distinct([("`output`", a), ("`report`", tmp_path / "y.json")])


def test_same_file(tmp_path):
    a = tmp_path / "a"
    a.write_bytes(b"x")
    assert same_file(a, tmp_path / "." / "a")
    assert not same_file(a, tmp_path / "b")  # b does not exist
    (tmp_path / "b").write_bytes(b"x")
    assert not same_file(a, tmp_path / "b")  # same bytes, another file


def test_check_output_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(OutputError) as exc:
        check_output_dir(tmp_path, force=True, inputs=(src / "config.json", None))
    assert str(exc.value) == f"output folder {tmp_path} is or holds the input {src / 'config.json'}; choose another -o"
    with pytest.raises(OutputError) as exc:
        check_output_dir(src, force=False)
    assert str(exc.value) == f"output folder {src} exists; pass `force` to replace it"
    assert check_output_dir(src, force=True) == src  # a model folder: replaced with force
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as exc:
        check_output_dir(other, force=True)
    assert str(exc.value) == (f"output folder {other} is not a model folder (no config.json); qlin replaces only "
                              "model folders, even with `force`")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(OutputError) as exc:
        check_output_dir(tmp_path / "file", force=True)
    assert str(exc.value) == f"output {tmp_path / 'file'} exists and is not a folder; compressed-tensors output is a folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty, force=True) == empty


# ----------------------------------------------------------------------------- checks of inputs


def test_check_file_refuses_a_fifo_without_waiting(tmp_path):
    fifo = tmp_path / "in.safetensors"
    os.mkfifo(fifo)  # opening it to read would wait for a writer
    with pytest.raises(InputError) as exc:
        check_file(fifo, "inputs")
    assert str(exc.value) == f"inputs {fifo} is a FIFO (named pipe), not a regular file; qlin reads only regular files"


def test_check_file_refuses_a_device():
    with pytest.raises(InputError) as exc:
        check_file("/dev/null")
    assert str(exc.value) == "file /dev/null is a character device, not a regular file; qlin reads only regular files"


def test_check_file_refuses_a_safetensors_name_that_is_not_utf8(tmp_path):
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xff.safetensors"))
    path.write_bytes(b"x")
    with pytest.raises(InputError) as exc:
        check_file(path, "source")
    assert str(exc.value) == f"source {path}: its name is not valid UTF-8, which safetensors cannot open; rename it"
    other = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xff.pt"))  # torch.load opens any name
    other.write_bytes(b"x")
    assert check_file(other) == other


def test_size_bytes_of_a_folder_counts_its_files_only(tmp_path):
    (tmp_path / "a").write_bytes(b"123")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"45678")
    assert size_bytes(tmp_path) == 3 and size_bytes(tmp_path / "sub" / "b") == 5
