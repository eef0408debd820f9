"""What a checkpoint's pickle would do, found out without doing it (pickles.py): the storage bytes
an honest checkpoint declares, and the refusals, each with its exact message, of calls torch.save
never writes, objects made from arguments, storages larger than the data that holds them, zips
that inflate far beyond their size, files that are no checkpoint, and more storage than
`max_memory`. Nothing the pickle names is imported, called or allocated."""

from __future__ import annotations

import copyreg
import io
import os
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from qlin_cli import budget
from qlin_cli.budget import format_size
from qlin_cli.errors import InputError
from qlin_cli.pickles import scan_pickle


class Refused(InputError):
    """The error `scan_pickle` is told to raise for a call it refuses."""


def scan(path: Path) -> int:
    return scan_pickle(path, Refused)


def refusal(path: Path) -> str:
    with pytest.raises(Refused) as exc:
        scan(path)
    return str(exc.value)


def error(path: Path) -> str:
    with pytest.raises(InputError) as exc:
        scan(path)
    assert type(exc.value) is InputError  # not the refusal of a call
    return str(exc.value)


class _Call:
    """Pickles as a call of `fn(*args)` (REDUCE), as a crafted file would hold it."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _New:
    """Pickles as `_New.__new__(_New, *args)` (NEWOBJ); the class is renamed in the file."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return copyreg.__newobj__, (_New, *self.args)


def _rewrite(src: bytes, path: Path, edit) -> Path:
    """The zip checkpoint `src` written to `path` with each record's bytes passed through
    `edit(name, data) -> data`."""
    old = zipfile.ZipFile(io.BytesIO(src))
    with zipfile.ZipFile(path, "w") as z:
        for info in old.infolist():
            z.writestr(info, edit(info.filename, old.read(info)))
    return path


def _saved(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


# ----------------------------------------------------------------------------- honest checkpoints


def test_a_state_dict_declares_its_storages_bytes(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.int64), "h": torch.zeros(7, dtype=torch.half)},
               path)
    assert scan(path) == 3 * 4 * 4 + 5 * 8 + 7 * 2


def test_a_storage_shared_by_views_counts_once(tmp_path):
    path = tmp_path / "views.pt"
    t = torch.zeros(100)
    torch.save({"a": t, "b": t[10:20], "c": t.view(10, 10)}, path)
    assert scan(path) == 400


def test_the_legacy_format_declares_its_storages_too(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(10, 10), "i": torch.zeros(3, dtype=torch.int32)}, path,
               _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert scan(path) == 400 + 12


def test_a_whole_pickled_module_passes_the_scan(tmp_path):
    """A module is restored by __new__ without arguments and its state: nothing to refuse.
    (Whether it is loaded at all is the caller's decision: `--trust-pickle`.)"""
    path = tmp_path / "module.pt"
    torch.save(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), path)
    assert scan(path) == 4 * (8 * 16 + 16 + 16 * 4 + 4)


def test_a_stride_0_tensor_declares_only_its_storage(tmp_path):
    """A 30000 x 30000 weight that repeats one element declares 4 bytes of storage: honest for
    the scan (refusing the logical size is the loader's check, sources.py)."""
    path = tmp_path / "stride0.pt"
    torch.save({"w": torch.zeros(1).expand(30000, 30000)}, path)
    assert scan(path) == 4


# ----------------------------------------------------------------------------- calls refused


def test_a_call_torch_save_never_writes_is_refused_unmade(tmp_path):
    """nn.Linear(40000, 40000) would allocate 6.4 GB while the pickle loads."""
    path = tmp_path / "linear.pt"
    torch.save(_Call(nn.Linear, 40000, 40000), path)
    assert refusal(path) == ("it calls torch.nn.modules.linear.Linear(40000, 40000) while it loads, which "
                             "torch.save never writes")


def test_an_allowlisted_global_of_torch_is_refused_when_called(tmp_path):
    """bytearray is on torch's weights_only allowlist; bytearray(10**10) allocates 10 GB."""
    path = tmp_path / "bytearray.pt"
    torch.save({"w": torch.zeros(2), "x": _Call(bytearray, 10**10)}, path)
    assert refusal(path) == ("it calls builtins.bytearray(10000000000) while it loads, which torch.save never "
                             "writes")


def test_a_refused_call_is_never_made(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "system.pt"
    torch.save(_Call(os.system, f"touch {marker}"), path)
    assert refusal(path) == f"it calls posix.system('touch {marker}') while it loads, which torch.save never writes"
    assert not marker.exists()


def test_a_global_of_a_module_that_does_not_exist_is_named_not_imported(tmp_path):
    path = tmp_path / "missing.pt"
    raw = _saved(_Call(nn.Linear, 2, 2))
    _rewrite(raw, path, lambda name, data: data.replace(b"torch.nn.modules.linear\nLinear",
                                                        b"qlin_no_such_module\nThing") if name.endswith("data.pkl")
             else data)
    assert refusal(path) == "it calls qlin_no_such_module.Thing(2, 2) while it loads, which torch.save never writes"


def test_an_object_made_from_arguments_is_refused(tmp_path):
    """torch.Tensor.__new__(torch.Tensor, 60000, 60000) by NEWOBJ: a 14 GB tensor."""
    path = tmp_path / "new.pt"
    raw = _saved({"w": _New(60000, 60000)})
    _rewrite(raw, path, lambda name, data: data.replace(f"{__name__}\n_New".encode(), b"torch\nTensor")
             if name.endswith("data.pkl") else data)
    assert refusal(path) == "it makes a torch.Tensor from arguments while it loads, which torch.save never writes"


# ----------------------------------------------------------------------------- sizes refused


def test_a_storage_larger_than_its_record_is_refused(tmp_path):
    path = tmp_path / "short.pt"
    raw = _saved({"w": torch.zeros(1000)})
    _rewrite(raw, path, lambda name, data: data[:8] if name.endswith("data/0") else data)
    assert error(path) == f"{path}: storage 0 declares 4.0 kB but the file holds 8 bytes of it"


def test_a_legacy_file_that_declares_more_storage_than_it_holds_is_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(1000)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-3900])  # the storage's data cut off after the pickles
    assert error(path) == f"{path} declares 4.0 kB of storage in a file of {format_size(path.stat().st_size)}"


def test_a_zip_that_inflates_far_beyond_its_size_is_refused_unread(tmp_path):
    path = tmp_path / "bomb.pt"
    raw = zipfile.ZipFile(io.BytesIO(_saved({"w": torch.zeros(4)})))
    with zipfile.ZipFile(path, "w") as z:
        for info in raw.infolist():
            if info.filename.endswith("data/0"):
                big = zipfile.ZipInfo(info.filename)
                big.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(big, bytes(8 * 2**20))
            else:
                z.writestr(info, raw.read(info))
    size = path.stat().st_size
    assert size < 2**20
    inflated = sum(i.file_size for i in zipfile.ZipFile(path).infolist())
    assert error(path) == (f"{path} is a zip archive of {format_size(size)} that inflates to {format_size(inflated)}; "
                           "a PyTorch checkpoint stores its data uncompressed")


def test_storage_over_max_memory_is_refused(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(100)}, path)
    with budget.limit(399):
        assert error(path) == (f"{path} holds 400 bytes of tensors, more than `max_memory` 399 bytes; pass a "
                               "larger `max_memory` if this machine has the memory")
    with budget.limit(400):
        assert scan(path) == 400


# ----------------------------------------------------------------------------- not checkpoints


def test_a_zip_without_one_data_pkl_is_no_checkpoint(tmp_path):
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    assert error(path) == f"{path} is a zip archive but not a PyTorch checkpoint (no single data.pkl)"


@pytest.mark.parametrize("data, detail", [
    (b"not a pickle at all", "UnpicklingError: invalid load key, 'n'."),
    (b"", "EOFError: Ran out of input"),
])
def test_bytes_that_are_no_pickle_are_no_checkpoint(tmp_path, data, detail):
    path = tmp_path / "junk.pt"
    path.write_bytes(data)
    assert error(path) == f"{path} is not a readable PyTorch checkpoint ({detail})"
