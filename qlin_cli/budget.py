"""Memory budgets: how many bytes of tensors one input file may make qlin hold, checked before
the memory is touched (safetensors headers, pickles' declared storages and calls, every tensor's
logical size).

Two limits apply. What is plausible for the file: data a file declares must be in the file (a
storage or tensor may not be larger than the bytes that hold it). And what the user allows:
`max_memory` (`--max-memory`), by default half of this machine's physical memory, bounds the
bytes of tensors that any one input describes. The jobs in api.py set it for their run with
`limit`; library calls outside a job get the default.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
from typing import Iterator

from .errors import ConfigError, InputError

__all__ = ["default_max_memory", "max_memory", "limit", "parse_size", "format_size", "check_budget"]

_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("qlin_max_memory", default=None)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def default_max_memory() -> int:
    """Half of this machine's physical memory: quantizing a model holds about twice its float
    size (the float model, the int8 one, one layer's temporaries), so a file that describes more
    than that could not be quantized here anyway (8 GiB where the size cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def max_memory() -> int:
    """The limit in force: the one `limit` set, or the default."""
    value = _LIMIT.get()
    return default_max_memory() if value is None else value


@contextlib.contextmanager
def limit(nbytes: int | None) -> Iterator[None]:
    """Make `nbytes` (None: the default) the limit within the block."""
    if nbytes is not None and (not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 1):
        raise ConfigError(f"`max_memory` {nbytes!r}: give a positive number of bytes")
    token = _LIMIT.set(nbytes)
    try:
        yield
    finally:
        _LIMIT.reset(token)


def parse_size(text: str) -> int:
    """Bytes from '8GB', '512MiB', '1.5G' or '1000000' (decimal units, binary with 'i')."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise ConfigError(f"`max_memory` {text!r}: give a size such as 8GB, 512MiB or 1000000 (bytes)")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"`max_memory` {text!r}: give a positive size, e.g. 8GB")
    return int(value)


def format_size(nbytes: int | float) -> str:
    """'3.6 GB', '512.0 MB', '900 bytes' (decimal units)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def check_budget(nbytes: int, what: str) -> None:
    """Refuse `what` (e.g. "inputs x.safetensors") if it describes more than `max_memory` bytes
    of tensors."""
    cap = max_memory()
    if nbytes > cap:
        raise InputError(
            f"{what} holds {format_size(nbytes)} of tensors, more than `max_memory` {format_size(cap)}; "
            "pass a larger `max_memory` if this machine has the memory"
        )
