"""The kernel registry: every kernel qlin can run, by name, each described once in its own room.

A kernel is one room (a module of this package) that ends with `KERNEL = SomeKernel()`, an
instance of a `Kernel` subclass, and one line in `ROOMS`. The instance says
- what it is: `name`, `activations` ("int8": dynamic and static modes; "float": weight-only),
  `low_bit` (made for weights under 8 bits or in groups), `requestable`, `float_weights`;
- which schemes naming it are valid (`scheme_problem`) and why it cannot run a layer here
  (`refusal`: this device, dtype, shape, torch build or CPU);
- what it says when a request picks it (`requested`) and what it offers `auto` or a refused
  request (`offer`, asked in `rank` order);
- how it packs a layer (`pack(layer, scheme, device, dtype)`, returning the callable that runs it).

The scheme's validation (`request_names`, `request_problem`), `select_kernel` and `pack`
(select.py), the fallback's widening (`requested_kernel(...).low_bit`) and the report's note
(`get(name).float_weights`) all read it.

The rooms are imported on the first lookup, not at the top of this module: they import
primitives, which imports the scheme, which asks this registry to validate a kernel name.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

if TYPE_CHECKING:
    import torch

    from ..scheme import LayerScheme

__all__ = [
    "ROOMS",
    "KernelChoice",
    "Target",
    "LayerTensors",
    "Kernel",
    "register",
    "unregister",
    "get",
    "kernels",
    "requested_kernel",
    "request_names",
    "request_problem",
    "grouped_kernels",
    "low_bit_layer",
]

# The rooms, in the order kernels are listed (messages, `--kernel`'s choices).
ROOMS = ("onednn", "pertoken", "lowbit_dynamic", "fbgemm", "int_mm", "weight_only", "lowbit", "int4pack", "dequant")


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a layer runs on this machine, and why."""

    name: str  # a registered kernel's name
    reason: str
    # a row's output never depends on the other rows of the batch (tested, not assumed: float
    # GEMMs such as dequant's F.linear block differently by batch size and are not)
    batch_invariant: bool
    fallback: bool  # not what was asked for: a requested kernel that cannot run here, or auto's missing op


@dataclass(frozen=True)
class Target:
    """Where a layer runs: the device, its activations' dtype and its shape `(out_features, in_features)`."""

    device: torch.device
    dtype: torch.dtype
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LayerTensors:
    """A quantized layer's stored tensors, the operands a kernel packs: `weight` int8 `(N, K)`,
    `scale` float32 and `zero_point` int8 `()`, `(N,)` or per group `(N, ceil(K / G))`, `bias`
    `(N,)`, static mode's `input_qparams` (scale `()`, zero point `()`), SmoothQuant's `smooth` `(K,)`."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bias: torch.Tensor | None = None
    input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None
    smooth: torch.Tensor | None = None

    def to(self, device: torch.device) -> "LayerTensors":
        def move(t):
            return None if t is None else t.to(device)

        act = None if self.input_qparams is None else (move(self.input_qparams[0]), move(self.input_qparams[1]))
        return LayerTensors(move(self.weight), move(self.scale), move(self.zero_point), move(self.bias), act,
                            move(self.smooth))


class Kernel:
    """One kernel; each room subclasses it once and registers an instance (`KERNEL`)."""

    name: ClassVar[str]
    activations: ClassVar[str]  # "int8" (modes dynamic and static) or "float" (mode weight-only)
    rank: ClassVar[int]  # `auto` and a refused request's fallback ask kernels in this order, lowest first
    low_bit: ClassVar[bool] = False  # made for weights under 8 bits or in groups; a refused request skips it
    requestable: ClassVar[bool] = True  # a recipe may name it (dequant is only ever a fallback)
    float_weights: ClassVar[bool] = False  # a float matmul on the dequantized weight: the report always says why
    # takes int8 activations times weights with one scale per group (dynamic grouped layers are
    # offered to these kernels only; weight-only kernels say what they take in `scheme_problem`)
    grouped_int8: ClassVar[bool] = False
    # its packing runs on one core and releases the GIL (fbgemm's prepack), so `pack_all` packs
    # such layers side by side on a thread pool; other kernels' packing is torch ops that use
    # every core already, and on pool threads costs time and memory
    packs_on_one_core: ClassVar[bool] = False

    def scheme_problem(self, scheme: LayerScheme) -> str | None:
        """Why a scheme that names this kernel is not valid, or None (its mode is checked apart)."""
        return None

    def refusal(self, scheme: LayerScheme, target: Target) -> str | None:
        """Why this kernel cannot run this layer here, or None."""
        return None

    def batch_invariant(self, scheme: LayerScheme) -> bool:
        """Whether a row's output never depends on the other rows of the batch."""
        return True

    def requested(self, scheme: LayerScheme, target: Target) -> KernelChoice:
        """The choice when a scheme names this kernel and it can run (`refusal` is None)."""
        return KernelChoice(self.name, "requested", self.batch_invariant(scheme), False)

    def offer(self, scheme: LayerScheme, target: Target, why: str | None, fallback: bool) -> KernelChoice | str | None:
        """What this kernel says when `auto` (or a requested kernel that cannot run, `fallback`)
        reaches it: its choice; or None, and `auto` asks the next kernel; or a reason it declines,
        which becomes `why` for the next ones (`why`: the last such reason, or the refused
        request's). The default: never chosen unless named."""
        return None

    def pack(self, layer: LayerTensors, scheme: LayerScheme, device: torch.device,
             dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """Prepare the operands once (`layer` is on `device`); returns `(M, K) -> (M, N)` in the
        input's dtype."""
        raise NotImplementedError


_KERNELS: dict[str, Kernel] = {}
_LOADING = threading.Lock()
_loaded = False


def _load() -> dict[str, Kernel]:
    """The registered kernels; the first call imports the rooms."""
    global _loaded
    if not _loaded:
        with _LOADING:  # packing threads may ask at once
            if not _loaded:
                for room in ROOMS:
                    _add(importlib.import_module(f"{__package__}.{room}").KERNEL)
                _loaded = True
    return _KERNELS


def _add(kernel: Kernel) -> None:
    if kernel.name in _KERNELS or kernel.name == "auto":
        raise ValueError(f"a kernel named {kernel.name!r} is registered already")
    if kernel.activations not in ("int8", "float"):
        raise ValueError(f"kernel {kernel.name!r}: activations must be 'int8' or 'float', not {kernel.activations!r}")
    _KERNELS[kernel.name] = kernel


def register(kernel: Kernel) -> None:
    """Add a kernel from outside the rooms (they are added on the first lookup)."""
    _load()
    _add(kernel)


def unregister(name: str) -> None:
    """Remove the kernel registered as `name`."""
    del _load()[name]


def get(name: str) -> Kernel:
    """The kernel registered as `name`."""
    return _load()[name]


def kernels() -> list[Kernel]:
    """Every registered kernel, in `rank` order."""
    return sorted(_load().values(), key=lambda k: k.rank)


def requested_kernel(scheme: LayerScheme) -> Kernel | None:
    """The kernel `scheme` names, or None for `auto`."""
    return None if scheme.kernel == "auto" else get(scheme.kernel)


def request_names() -> tuple[str, ...]:
    """What a scheme's `kernel` may be: `auto` and every requestable kernel, in listing order."""
    return ("auto", *(k.name for k in _load().values() if k.requestable))


def request_problem(scheme: LayerScheme) -> str | None:
    """Why `scheme`'s kernel request does not fit its mode or its weights, or None; the name
    itself is checked against `request_names` first."""
    kernel = requested_kernel(scheme)
    if kernel is None:
        return None
    if scheme.mode == "weight-only" and kernel.activations != "float":
        takes = [n for n in request_names() if n == "auto" or get(n).activations == "float"]
        return (f"kernel {kernel.name!r} quantizes activations; weight-only mode takes kernel "
                f"{', '.join(map(repr, takes))}")
    if scheme.mode != "weight-only" and kernel.activations == "float":
        return f"kernel {kernel.name!r} needs `mode` weight-only"
    if scheme.mode != "weight-only" and scheme.group_size is not None and not kernel.grouped_int8:
        takes = ["auto", *(k.name for k in _load().values() if k.grouped_int8)]
        return (f"kernel {kernel.name!r} has one weight scale per output channel; grouped dynamic layers take "
                f"kernel {', '.join(map(repr, takes))}")
    return kernel.scheme_problem(scheme)


def grouped_kernels() -> str:
    """The kernel requests that take grouped weights, as a message lists them ('auto', 'lowbit'
    or 'int4pack')."""
    names = ["auto", *(k.name for k in _load().values() if k.low_bit and k.activations == "float")]
    return f"{', '.join(map(repr, names[:-1]))} or {names[-1]!r}"


def low_bit_layer(scheme: LayerScheme) -> bool:
    """A weight-only layer for the low-bit kernels: grouped, 4-bit, or naming one of them."""
    kernel = requested_kernel(scheme)
    return scheme.mode == "weight-only" and (
        scheme.group_size is not None or scheme.bits == 4 or (kernel is not None and kernel.low_bit))
