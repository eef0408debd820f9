"""What a checkpoint's pickle would do, found out without doing it.

torch's weights_only unpickler calls any allowlisted global with the file's own arguments, and
allocates each storage at the size the pickle declares. `scan_pickle` runs the pickle first with
every global replaced by a stand-in class (`_Stub`): nothing is imported, called or allocated,
and qlin refuses a call that torch.save never writes (`nn.Linear(40000, 40000)`,
`bytearray(10**10)`, `torch.Tensor.__new__(cls, 60000, 60000)`), a storage larger than the data
the file holds for it, a zip that inflates far beyond its size, and more storage than
`max_memory` (budget.py).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Callable

from .budget import check_budget, format_size
from .errors import InputError, one_line

__all__ = ["scan_pickle"]


# What a checkpoint's pickle may call while it loads: rebuilding dense tensors and parameters,
# and small containers. torch's weights_only unpickler calls any allowlisted global with the
# file's arguments (nn.Linear(40000, 40000), bytearray(10**10), torch.FloatTensor(60000, 60000));
# torch.save never writes such a call (a module is restored by __new__ and its state).
_SAFE_CALLS = frozenset({
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state", "torch._tensor._rebuild_from_type_v2",
    "collections.OrderedDict", "collections.Counter", "builtins.set", "builtins.complex", "_codecs.encode",
    "torch.device", "torch.Size", "torch.serialization._get_layout",
})
_STORAGE_ITEM_SIZES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
                       "Char": 1, "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8, "Untyped": 1}


class _Unsafe(Exception):
    """What a pickle would do that qlin refuses to do, in words."""


class _Stub:
    """An object a pickle builds, recorded instead of built (see `_scan_pickle`)."""

    global_name = ""
    scan: "_Scan"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.called = args, False
        cls.scan.made.append(obj)
        return obj

    def __init__(self, *args, **kwargs) -> None:  # a call (REDUCE): only known-safe ones
        self.called = True
        if self.global_name not in _SAFE_CALLS:
            shown = ", ".join(repr(a) if isinstance(a, (int, float, str)) else type(a).__name__ for a in args)
            raise _Unsafe(f"it calls {self.global_name}({shown[:80]}) while it loads, which torch.save never writes")

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, item) -> None:
        pass

    def extend(self, items) -> None:
        pass

    def __repr__(self) -> str:
        return self.global_name


class _Scan(pickle.Unpickler):
    """Runs a checkpoint's pickle with every global replaced by a `_Stub` class: nothing is
    imported, called or allocated, and what the pickle would call and which storages (with their
    declared sizes) it would read are recorded."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path = path
        self.made: list[_Stub] = []
        self.storages: dict[str, int] = {}  # key -> declared bytes
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> type:
        full = f"{'builtins' if module == '__builtin__' else module}.{name}"
        if full not in self._classes:
            self._classes[full] = type(name, (_Stub,), {"global_name": full, "scan": self})
        return self._classes[full]

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
            kind = getattr(pid[1], "global_name", "").rpartition(".")[2].removesuffix("Storage")
            numel = pid[4] if isinstance(pid[4], int) else 0
            self.storages[str(pid[2])] = numel * _STORAGE_ITEM_SIZES.get(kind, 8)
        return None

    def check_made(self) -> None:
        """Refuse objects made by __new__ with arguments (NEWOBJ): torch.Tensor.__new__(cls, n, m)
        allocates n * m elements; torch.save passes none, except to nn.Parameter."""
        for obj in self.made:
            if obj.args and not obj.called and obj.global_name != "torch.nn.parameter.Parameter":
                raise _Unsafe(f"it makes a {obj.global_name} from arguments while it loads, which torch.save never writes")


def scan_pickle(path: Path, refuse: Callable[[str], InputError]) -> int:
    """Check what loading the checkpoint at `path` would call and allocate, before torch.load
    does any of it: only known-safe calls, no storage larger than the data that holds it, a zip
    that does not inflate beyond the file (a 4 MB zip can deflate to 4 GB), and no more storage
    than `max_memory`. `refuse(detail)` is the error for a pickle that calls what it may not.
    Returns the bytes of storage the pickle declares."""
    size = path.stat().st_size
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
                inflated = sum(i.file_size for i in infos)
                if inflated > 2 * size + 2**20:
                    raise InputError(
                        f"{path} is a zip archive of {format_size(size)} that inflates to {format_size(inflated)}; "
                        "a PyTorch checkpoint stores its data uncompressed"
                    )
                pkl = [i for i in infos if i.filename.endswith("data.pkl")]
                if len(pkl) != 1:
                    raise InputError(f"{path} is a zip archive but not a PyTorch checkpoint (no single data.pkl)")
                prefix = pkl[0].filename.removesuffix("data.pkl")
                scan = _Scan(io.BytesIO(z.read(pkl[0])), path)
                scan.load()
                scan.check_made()
                records = {i.filename: i.file_size for i in infos}
                for key, nbytes in scan.storages.items():
                    held = records.get(f"{prefix}data/{key}")
                    if held is not None and nbytes > held:
                        raise InputError(
                            f"{path}: storage {key} declares {format_size(nbytes)} but the file holds "
                            f"{format_size(held)} of it"
                        )
        else:  # the legacy format: magic number, protocol, system info, then the object
            with path.open("rb") as f:
                for _ in range(3):
                    _Scan(f, path).load()
                scan = _Scan(f, path)
                scan.load()
                scan.check_made()
            declared = sum(scan.storages.values())
            if declared > size:
                raise InputError(
                    f"{path} declares {format_size(declared)} of storage in a file of {format_size(size)}"
                )
    except InputError:
        raise
    except _Unsafe as exc:
        raise refuse(str(exc)) from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RecursionError, MemoryError, OverflowError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({one_line(exc)})") from None
    declared = sum(scan.storages.values())
    check_budget(declared, str(path))
    return declared
