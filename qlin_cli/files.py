"""Files in and out, whatever their format: checks of inputs and outputs, atomic writes of a file
or a folder, and the streaming safetensors writer (with the tensors it takes from a state dict).

An atomic write goes to a hidden temporary beside the target, `.<name>.qlin-<random hex>.tmp`,
that is synced and then renamed into place: a reader sees the old file (folder) or the whole new
one, never a part, and a Ctrl-C or a full disk leaves the old one as it was and no temporary
behind. Only SIGKILL (or a power cut) can leave a temporary: every write holds a shared lock
(flock) on its folder while its temporary exists, and the next write into that folder that finds
no other qlin writing there (an exclusive lock) removes the temporaries qlin's name marks, saying so.

Outputs are regular files the user named: a path that is a symbolic link, or that lies in /dev,
/proc or /sys (`/dev/stdout`, whatever it links to), is refused, even with `force`, and nothing
but a regular file is ever replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch
from safetensors import safe_open

from .budget import format_size
from .errors import InputError, OutputError

try:
    import fcntl
except ImportError:  # not POSIX: no folder locks, so stale temporaries are left alone
    fcntl = None

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "QLIN_PLAN",
    "check_file",
    "file_sha256",
    "size_bytes",
    "check_output",
    "check_not_system",
    "check_not_link",
    "SYSTEM_FOLDERS",
    "check_distinct",
    "same_file",
    "check_parent",
    "check_output_dir",
    "write_atomic",
    "write_folder_atomic",
    "temporary_name",
    "forget_temporary",
    "SAFETENSORS_DTYPES",
    "MAX_HEADER",
    "TensorEntry",
    "SafetensorsHeader",
    "read_header",
    "HASH_KEYS",
    "tensor_bytes",
    "header_digest",
    "safetensors_writer",
    "SafetensorsStream",
    "Spill",
    "file_tensors",
]

CONFIG_NAME = "config.json"  # what makes a folder a model folder
# what a safetensors file's metadata says it is: `format` = FORMAT for a qlin file; the key
# QLIN_PLAN for the weights file of a compressed-tensors folder qlin wrote (readable back)
FORMAT = "qlin"
QLIN_PLAN = "qlin_plan"

# what a file's content is given as: its bytes, or a function that writes into the open file
Content = bytes | Callable[[BinaryIO], None]

# folders no output may be in, whatever path or link leads there: writing "a file" there means a
# device, a process's file descriptor or a kernel setting (`--report /dev/stdout --force` replaced
# the /dev/stdout link itself with a regular file, for every program on the machine)
SYSTEM_FOLDERS = ("/dev", "/proc", "/sys")

_log = logging.getLogger("qlin")


# ----------------------------------------------------------------------------- checks


def _kind(mode: int) -> str:
    """What a file that is not a regular file or a folder is, in words."""
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def check_file(path: str | Path, what: str = "file") -> Path:
    """`path` as a Path if it is an existing, readable, non-empty regular file; else InputError.
    Devices, FIFOs and sockets are refused without reading them (reading /dev/zero never ends,
    opening a FIFO waits for a writer)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {path} is a {_kind(mode)}, not a regular file; qlin reads only regular files")
    if path.suffix == ".safetensors" and not str(path).isascii():
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{what} {path}: its name is not valid UTF-8, which safetensors cannot open; rename it") from None
    try:  # O_NONBLOCK: should a FIFO take the file's place meanwhile, opening it does not wait
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError:
        raise InputError(f"{what} {path} is not readable (permission denied)") from None
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what} {path} is a {_kind(st.st_mode)}, not a regular file; qlin reads only regular files")
        if st.st_size == 0:
            raise InputError(f"{what} {path} is empty")
    finally:
        os.close(fd)
    return path


MAX_HEADER = 100_000_000  # bytes: safetensors' own limit on a header

# safetensors' dtypes and the bits of one element
_DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
               "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
               "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype as safetensors names it ("F32"), its shape,
    and its bytes [start, end) counted from the end of the header."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype qlin reads this tensor as itself, or None (safetensors reads the rest)."""
        return _TORCH_DTYPES.get(self.dtype)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header (`read_header`)."""

    size: int  # bytes of the header's JSON; the tensors' bytes start at 8 + size
    tensors: dict[str, TensorEntry]  # in the header's order
    metadata: dict[str, str]  # `__metadata__`, {} without one
    raw: dict = field(repr=False, compare=False)  # the JSON object as read, for `header_digest`

    @property
    def nbytes(self) -> int:
        """The bytes of all tensors: what loading the file takes."""
        return sum(e.end - e.start for e in self.tensors.values())


def _entry(key: str, entry: object) -> TensorEntry:
    """A header's entry for tensor `key`, checked: a known dtype, a shape of non-negative ints,
    and data_offsets [start, end] that hold exactly the shape's bytes."""
    try:
        dtype, shape = entry["dtype"], entry["shape"]  # type: ignore[index]
        if dtype not in _DTYPE_BITS or not all(type(d) is int and d >= 0 for d in shape):
            raise TypeError
    except (KeyError, TypeError):
        raise ValueError(f"tensor {key!r} has no valid shape and dtype") from None
    offsets = entry.get("data_offsets")  # type: ignore[union-attr]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise ValueError(f"tensor {key!r} has no valid data_offsets [start, end]")
    bits = math.prod(shape) * _DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        takes = f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits"
        held = offsets[1] - offsets[0]
        raise ValueError(f"tensor {key!r}: {dtype} {list(shape)} takes {takes}, its data_offsets {offsets} hold {held} bytes")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(tensors: dict[str, TensorEntry], data_bytes: int) -> None:
    """The tensors' bytes, in order of their offsets, must follow one another from 0 to the end
    of the file, as safetensors lays them out: no overlap, no gap, nothing after them."""
    end = 0
    for key, e in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != end:
            raise ValueError(
                f"tensor {key!r} starts at byte {e.start} of the data, not at {end} where the one before it ends")
        end = e.end
    if end != data_bytes:
        raise ValueError(f"the tensors take {end} bytes but the file holds {data_bytes} after its header")


def read_header(path: str | Path) -> SafetensorsHeader:
    """The header of the safetensors file at `path`, validated, reading nothing else (safetensors
    maps the whole file, which a sparse file can make any size). ValueError, with one line that
    says what is wrong, for a header length beyond the file or MAX_HEADER, a header that is not a
    JSON object, metadata that is not str -> str, an entry without a known dtype, a shape and
    data_offsets that hold the shape's bytes, or tensors that do not tile the rest of the file."""
    path = Path(path)
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= min(size - 8, MAX_HEADER):
            raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except RecursionError as exc:  # "[[[[...": a RuntimeError, which callers do not expect
            raise ValueError(str(exc)) from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError("the header's __metadata__ is not a map of strings to strings")
    tensors = {key: _entry(key, e) for key, e in header.items() if key != "__metadata__"}
    _check_layout(tensors, size - 8 - n)
    return SafetensorsHeader(n, tensors, metadata, header)


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def size_bytes(path: Path) -> int:
    """The size of a file, or of the files of a folder (not its subfolders)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


def _folder(path: Path) -> Path:
    """The folder `path` is in."""
    return path.parent if str(path.parent) else Path(".")


def same_file(a: str | Path, b: str | Path) -> bool:
    """True if `a` and `b` name one file: the same resolved path, or the same inode (a hard link,
    or another path to it through a bind mount)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


Named = Iterable[tuple[str, "str | Path | None"]]  # (what it is, e.g. "`calib`", its path or None)


def check_output(path: str | Path, *, force: bool, inputs: Named = ()) -> Path:
    """Refuse an output that is one of `inputs` (by path or inode, even with `force`), that
    exists without `force`, that exists and is not a regular file (a device, a FIFO: even with
    `force`), or whose folder is missing. `inputs`: (what, path) pairs, e.g. ("source", p)."""
    path = Path(path)
    check_not_system(path)
    for what, src in inputs:
        if src is not None and same_file(path, src):
            raise OutputError(f"output {path} is the input file {src} ({what}); qlin never writes over an input")
    check_not_link(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"output {path} is a directory")
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"output {path} is a {_kind(mode)}; qlin writes only regular files, even with `force`")
    if mode is not None and not force:
        raise OutputError(f"output {path} exists; pass `force` to overwrite it")
    check_parent(path)
    return path


def check_not_system(path: str | Path) -> None:
    """Refuse an output in /dev, /proc or /sys (`SYSTEM_FOLDERS`), as given or once its links
    are followed (/dev/stdout -> /proc/self/fd/1)."""
    path = Path(path)
    # as given; in the folder its parent's links lead to (the link it would replace); where it leads
    given, real = Path(os.path.abspath(path)), path.resolve()
    for root in SYSTEM_FOLDERS:
        top = Path(root)
        for p in (given, path.parent.resolve() / path.name, real):
            if p == top or top in p.parents:
                where = "" if p == given else f" (it leads to {p})"
                raise OutputError(
                    f"output {path} is in {root}{where}; qlin writes only regular files, never into "
                    f"{', '.join(SYSTEM_FOLDERS)}, even with `force`")


def check_not_link(path: str | Path) -> None:
    """Refuse an output that is a symbolic link: replacing it would destroy the link, writing
    through it would write somewhere the user did not name, and not atomically."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(
            f"output {path} is a symbolic link (to {os.readlink(path)}); qlin replaces only regular files, "
            "even with `force`: give the path of the file itself, or remove the link")


def check_distinct(outputs: Named) -> None:
    """Refuse two outputs of one command that are the same file (`output` x.json and `report`
    x.json would write one over the other)."""
    seen: list[tuple[str, Path]] = []
    for what, path in outputs:
        if path is None:
            continue
        for other_what, other in seen:
            if Path(path) == other or same_file(path, other):
                raise OutputError(f"{what} {path} and {other_what} {other} are the same file; give each its own path")
        seen.append((what, Path(path)))


def check_parent(path: Path) -> None:
    """The folder an output goes into must exist, be a folder and be writable."""
    parent = _folder(path)
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"output folder {parent} is a file, not a folder")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable")


def _within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output_dir(path: str | Path, *, force: bool, inputs: tuple[Path | None, ...] = ()) -> Path:
    """Refuse an output folder that is or holds an input, exists without `force` (or is not a
    model folder, even with it), is a file, or whose parent is missing or not writable."""
    path = Path(path)
    check_not_system(path)
    for src in inputs:
        if src is not None and _within(Path(src), path):
            raise OutputError(f"output folder {path} is or holds the input {src}; choose another -o")
    check_not_link(path)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"output {path} exists and is not a folder; compressed-tensors output is a folder")
        if not force:
            raise OutputError(f"output folder {path} exists; pass `force` to replace it")
        if any(path.iterdir()) and not (path / CONFIG_NAME).is_file():
            raise OutputError(
                f"output folder {path} is not a model folder (no config.json); qlin replaces only model folders, even with `force`"
            )
    check_parent(path)
    return path


# ----------------------------------------------------------------------------- atomic writes


# every temporary name this process chose -> the output it stands for (remove_temporaries)
_TEMPORARIES: dict[str, Path] = {}


def temporary_name(path: Path) -> str:
    """The name of a hidden temporary beside `path` (without its `.tmp`/`.old` ending),
    `.<name>.qlin-<16 hex>`: marked as qlin's, so a later run can tell it from anyone else's. It is
    chosen before anything exists, so a Ctrl-C at any point after it reaches the cleanup
    (mkstemp could be interrupted after creating the file)."""
    name = str(_folder(path) / f".{path.name}.qlin-{secrets.token_hex(8)}")
    _TEMPORARIES[name] = path
    return name


def remove_temporaries() -> None:
    """Remove what this process's writes left of their temporaries, as their own cleanup would:
    a `.tmp` file or folder, and a `.old` folder (put back where the new one did not get in).
    For entry.py's watchdog, which ends a process whose main thread cannot unwind in time."""
    for name, path in list(_TEMPORARIES.items()):
        tmp, old = Path(name + ".tmp"), Path(name + ".old")
        try:
            if old.exists():
                if path.exists():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(old, path)
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                os.unlink(tmp)
        except OSError:
            pass


# qlin's temporaries: `.<name>.qlin-<hex>.tmp` (a file or folder being written) and `.old` (the
# folder a forced folder write moved aside); before the `qlin-` mark they were `.<name>.<hex>.tmp`
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.qlin-[0-9a-f]{16}\.(?P<end>tmp|old)")
_UNMARKED = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{16}\.(?P<end>tmp|old)")


def _remove_stale(folder: Path, target: str) -> list[str]:
    """Remove the temporaries of writes into `folder` that SIGKILL (or a power cut) ended, which no
    qlin is writing now (the caller holds the folder's exclusive lock): qlin's marked ones, and the
    unmarked ones older qlins made for `target`. An `.old` folder whose write never put the new
    folder in place is the previous output: it is put back. What was done, one line each."""
    done = []
    for entry in sorted(os.listdir(folder)):
        m = _TEMPORARY.fullmatch(entry) or _UNMARKED.fullmatch(entry)
        if m is None or (m.re is _UNMARKED and m["name"] != target):
            continue
        p, original = folder / entry, folder / m["name"]
        try:
            st = os.lstat(p)
            if m["end"] == "old" and stat.S_ISDIR(st.st_mode) and not os.path.lexists(original):
                os.rename(p, original)
                done.append(f"put back {original}, which an interrupted qlin run had moved aside to {entry}")
                continue
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if stat.S_ISDIR(st.st_mode) else st.st_size
            shutil.rmtree(p) if stat.S_ISDIR(st.st_mode) else os.unlink(p)
        except OSError:
            continue
        done.append(f"removed {p} ({format_size(size)}), a temporary that an interrupted qlin run left")
    return done


@contextlib.contextmanager
def _writing_in(folder: Path, target: str):
    """Hold a shared lock on `folder` while a write's temporary exists there; first, when no other
    qlin writes there (the exclusive lock is free), remove the stale temporaries (`_remove_stale`),
    each said as a warning. Without locks (not POSIX, a filesystem without flock) nothing is
    removed."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if fcntl is not None else None
    except OSError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # another qlin is writing here: its temporaries are live
            else:
                for line in _remove_stale(folder, target):
                    _log.warning(line, extra={"kind": "warning"})
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except OSError:
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _write_synced(fd: int, content: Content) -> None:
    """Write `content` into the open file descriptor `fd`, close it, and sync it to disk first."""
    with os.fdopen(fd, "w+b") as f:  # readable too: SafetensorsStream hashes what it wrote
        content(f) if callable(content) else f.write(content)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, data: Content, *, force: bool) -> Path:
    """Write `data` (bytes, or a function that writes into the open file) to a temporary file in
    `path`'s folder, then move it into place: readers see the old file or the whole new one,
    never a part. Without `force` an existing file is kept."""
    path = Path(path)
    folder = _folder(path)
    with _writing_in(folder, path.name):
        return _write_atomic(path, folder, data, force=force)


def forget_temporary(name: str) -> None:
    """A write's cleanup is done: `remove_temporaries` has nothing left to do for `name`."""
    _TEMPORARIES.pop(name, None)


def _write_atomic(path: Path, folder: Path, data: Content, *, force: bool) -> Path:
    base = temporary_name(path)
    tmp = base + ".tmp"
    try:
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise OutputError(f"cannot write in {folder}: {exc.strerror}") from None
        _write_synced(fd, data)
        os.chmod(tmp, 0o644)
        if force:
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                mode = stat.S_IFREG
            if stat.S_ISLNK(mode):  # never replace a link (/dev/stdout), a device node or a FIFO
                check_not_link(path)
            if not stat.S_ISREG(mode):
                raise OutputError(f"output {path} is a {_kind(mode)}; qlin writes only regular files, even with `force`")
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobber
            except FileExistsError:
                raise OutputError(f"output {path} exists; pass `force` to overwrite it") from None
            except OSError:
                if os.path.lexists(path):
                    raise OutputError(f"output {path} exists; pass `force` to overwrite it") from None
                os.replace(tmp, path)  # filesystems without hard links
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        forget_temporary(base)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_folder_atomic(path: str | Path, files: dict[str, Content], *, force: bool) -> Path:
    """Write `files` (name -> bytes, or a function that writes the open file) into a temporary
    folder beside `path`, then rename it into place: readers see the old folder or the whole new
    one. An existing folder is replaced only with `force` (it is moved aside, the new one renamed
    in, then the old one removed)."""
    path = Path(path)
    parent = _folder(path)
    with _writing_in(parent, path.name):
        return _write_folder_atomic(path, parent, files, force=force)


def _write_folder_atomic(path: Path, parent: Path, files: dict[str, Content], *, force: bool) -> Path:
    base = temporary_name(path)
    tmp, old = Path(base + ".tmp"), Path(base + ".old")
    try:
        try:
            os.mkdir(tmp, 0o755)
        except OSError as exc:
            raise OutputError(f"cannot write in {parent}: {exc.strerror}") from None
        for name in sorted(files):
            _write_synced(os.open(tmp / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), files[name])
        _fsync_dir(tmp)
        if os.path.lexists(path):
            check_not_link(path)
            if not force:
                raise OutputError(f"output folder {path} exists; pass `force` to replace it")
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if old.exists():
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # the new folder did not get in: put the old one back
                os.rename(old, path)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        forget_temporary(base)
    return path


# ----------------------------------------------------------------------------- safetensors out

# safetensors' names of the dtypes a model holds
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.int64: "I64", torch.float32: "F32", torch.int32: "I32",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}

HASH_KEYS = ("payload_sha256", "header_sha256")  # the metadata that `digests` adds


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (native, i.e. little-endian, order), without a copy
    (writable: reading into it fills the tensor)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_into(f, offset: int, t: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor `t` with the bytes at `offset` of the binary file `f`;
    EOFError where the file ends first."""
    f.seek(offset)
    view, done = tensor_bytes(t), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            name = f.name if isinstance(f.name, str) else "the file"  # (a TemporaryFile's name is its descriptor)
            raise EOFError(f"{name} ends before the tensor at byte {offset} ({len(view)} bytes)")
        done += got


def read_tensor(f, path: Path, header: SafetensorsHeader, key: str) -> torch.Tensor:
    """Tensor `key` of the safetensors file `f` open at `path` (its validated `header`), read into
    memory of its own (safetensors reads the dtypes qlin does not, copied out of its map)."""
    entry = header.tensors[key]
    if entry.torch_dtype is None:
        with safe_open(path, framework="pt") as st:
            return st.get_tensor(key).clone()
    t = torch.empty(entry.shape, dtype=entry.torch_dtype)
    read_into(f, 8 + header.size + entry.start, t)
    return t


def header_digest(header: dict) -> str:
    """sha256 of the header's meaning: every tensor's name, dtype, shape and offsets, and all
    metadata but the two hashes (so renaming or swapping tensors is caught, not only bit flips)."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k not in HASH_KEYS}
    body = {**{k: v for k, v in header.items() if k != "__metadata__"}, "__metadata__": meta}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def utf8_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` fit for a JSON header: a str from a file name that is not UTF-8 holds
    surrogates, which no JSON header may, so the undecodable bytes become \\xNN escapes."""
    return {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for k, v in metadata.items()}


def _header_bytes(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[list[str], dict, bytes]:
    """The canonical layout of tensors `specs` (key -> (dtype, shape)): their order in the file,
    the header (key -> dtype, shape, data_offsets) and the header's bytes with `metadata`."""
    order = sorted(specs, key=lambda k: (-specs[k][0].itemsize, k))
    header: dict[str, dict] = {}
    offset = 0
    for key in order:
        dtype, shape = specs[key]
        if dtype not in SAFETENSORS_DTYPES:
            raise OutputError(f"tensor {key} has dtype {dtype}, which safetensors cannot store")
        end = offset + math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps({"__metadata__": dict(sorted(metadata.items())), **header},
                      separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return order, header, text


def safetensors_writer(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, digests: bool = False
) -> Callable[[BinaryIO], None]:
    """A function that writes `tensors` (contiguous, on CPU, not sharing memory) as a safetensors
    file with a canonical header, so that the same content always gives the same bytes.

    Layout: tensors by element size (largest first, so each starts aligned to its element size
    after the 8-byte-padded header), then by name; the header lists them in that order after the
    sorted `__metadata__`. With `digests`, the metadata gains `payload_sha256` (every byte after
    the header) and `header_sha256` (header_digest). The tensors stream from their own memory
    into the file: safetensors' `save` builds the whole file in memory, and re-heading it took
    two more copies (BERT-base: +530 MB peak RSS and 2 s for a 182 MB file).
    `SafetensorsStream` writes the same bytes from tensors that arrive one at a time.
    """
    metadata = utf8_metadata(metadata)
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    order, header, text = _header_bytes(specs, metadata)
    if digests:
        payload = hashlib.sha256()
        for key in order:
            payload.update(tensor_bytes(tensors[key]))
        meta = {**metadata, "payload_sha256": payload.hexdigest()}
        meta["header_sha256"] = header_digest({**header, "__metadata__": meta})
        _, _, text = _header_bytes(specs, meta)

    def write(f: BinaryIO) -> None:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key in order:
            f.write(tensor_bytes(tensors[key]))

    return write


class SafetensorsStream:
    """Writes, into the open file `f` (readable too: `write_atomic` opens it so), the very bytes
    `safetensors_writer(tensors, metadata, digests=True)` writes, from tensors that arrive one at
    a time in any order (`put`), so that a model larger than memory can be written layer by layer
    as it is quantized. Every tensor's dtype and shape are known up front (`specs`, key -> (dtype,
    shape)): the header is written first with a placeholder payload_sha256 of the same length,
    each tensor goes straight to its offset, and `finish` reads the payload back once, in file
    order, to hash it and rewrite the header in place."""

    _PLACEHOLDER = "0" * 64

    def __init__(self, f: BinaryIO, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.f, self.specs = f, dict(specs)
        self.metadata = {**utf8_metadata(metadata), "payload_sha256": self._PLACEHOLDER}
        order, header, _ = _header_bytes(self.specs, self.metadata)
        self.metadata["header_sha256"] = header_digest({**header, "__metadata__": self.metadata})
        _, self.header, self.text = _header_bytes(self.specs, self.metadata)
        self.start = 8 + len(self.text)
        self.size = header[order[-1]]["data_offsets"][1] if order else 0
        self.missing = set(self.specs)
        f.write(len(self.text).to_bytes(8, "little"))
        f.write(self.text)
        f.truncate(self.start + self.size)

    def put(self, key: str, t: torch.Tensor) -> None:
        """Write tensor `key` (any device or layout; its dtype and shape as the specs say)."""
        dtype, shape = self.specs[key]
        assert key in self.missing and t.dtype == dtype and tuple(t.shape) == tuple(shape), (key, t.dtype, t.shape)
        self.missing.discard(key)
        self.f.seek(self.start + self.header[key]["data_offsets"][0])
        if t.numel():
            self.f.write(tensor_bytes(t.detach().to("cpu").contiguous()))

    def finish(self) -> None:
        """Hash the payload (read back in file order) and write the final header over the first."""
        assert not self.missing, f"tensors never written: {sorted(self.missing)[:3]}"
        self.f.flush()
        self.f.seek(self.start)
        payload = hashlib.file_digest(self.f, "sha256").hexdigest()
        self.metadata["payload_sha256"] = payload
        _, _, text = _header_bytes(self.specs, self.metadata)
        assert len(text) == len(self.text)
        self.f.seek(8)
        self.f.write(text)
        self.f.seek(0, os.SEEK_END)


class Spill:
    """Tensors parked in an unnamed temporary file in `folder` (the output's, so they take the
    disk space the output will take, not memory) until they are written into the output, one at
    a time: the sequential pipeline's layers, whose file header (the final plan) is known only
    once every block is done. The file is gone when the `with` ends, or the process does."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.index: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}

    def __enter__(self) -> "Spill":
        try:
            self.f = tempfile.TemporaryFile(dir=self.folder)
        except OSError as exc:
            raise OutputError(f"cannot write in {self.folder}: {exc.strerror or exc}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def put(self, key: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        offset = self.f.seek(0, os.SEEK_END)
        if t.numel():
            self.f.write(tensor_bytes(t))
        self.index[key] = (offset, t.dtype, tuple(t.shape))

    def drop(self, module: str) -> None:
        """Forget every tensor of module path `module` (its bytes stay in the file)."""
        for key in [k for k in self.index if k.startswith(f"{module}.")]:
            del self.index[key]

    def get(self, key: str) -> torch.Tensor:
        offset, dtype, shape = self.index[key]
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            read_into(self.f, offset, t)
        return t


def tied_keys(items: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """key -> the first earlier key holding the very same tensor (storage, offset, shape, stride,
    dtype): the keys that `file_tensors(..., drop_tied=True)` leaves out, and what each is tied to.
    Meta tensors (a model not loaded, `state_dict(keep_vars=True)`) tie when they are one object."""
    first: dict[tuple, str] = {}
    ties = {}
    for key, t in items:
        if not t.numel():
            continue
        # a meta tensor has no storage to compare (every one is at 0): the same tensor object is the tie
        where = id(t) if t.device.type == "meta" else t.untyped_storage().data_ptr()
        ident = (t.device, where, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in first:
            ties[key] = first[ident]
        else:
            first[ident] = key
    return ties


def file_tensors(
    items: Iterable[tuple[str, torch.Tensor]],
    *,
    skip_prefixes: tuple[str, ...] = (),
    transform: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
    drop_tied: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of a state dict's `items` as `safetensors_writer` takes them: contiguous, on
    CPU, and each owning its memory (a tensor whose storage an earlier one already has is copied).

    `skip_prefixes`: leave out the keys that start with one of them (the other paths of a shared
    module, whose tensors are stored once, under its first path). `transform(key, tensor)`: the
    tensor to store under `key` instead, or None to leave it out. `drop_tied`: leave out a tensor
    that is the very same tensor (storage, offset, shape, stride, dtype) as one named before it,
    as `save_pretrained` does with tied weights; otherwise such a tensor is stored again (a copy).
    """
    out: dict[str, torch.Tensor] = {}
    # (device, storage, offset, shape, stride, dtype) of the tensors kept -> the tensor, held so that
    # its memory is not reused: a tensor `transform` made and dropped after copying (a view made
    # contiguous) would otherwise free its address for the next one, which then looked "tied" to it
    seen: dict[tuple, torch.Tensor] = {}
    storages: set[int] = set()
    for key, t in items:
        if skip_prefixes and key.startswith(skip_prefixes):
            continue
        if transform is not None:
            t = transform(key, t)
            if t is None:
                continue
        t = t.detach()
        if drop_tied and t.numel():
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if ident in seen:
                continue
            seen[ident] = t
        t = t.to("cpu").contiguous()
        if t.numel():
            if t.untyped_storage().data_ptr() in storages:
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out
