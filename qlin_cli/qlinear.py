"""QuantizedLinear: the integer replacement of an `nn.Linear`.

Its buffers are what the qlin file stores for a layer (`weight` int8 `(out, in)` holding B-bit
values, `weight_scale` float32 `()`, `(out,)` or per group `(out, ceil(in / G))`,
`weight_zero_point` int8 of the scale's shape, `bias`; static mode adds `input_scale` float32
`()` and `input_zero_point` int8 `()`, SmoothQuant adds `smooth_scale` float32 `(in,)`), so
`state_dict()` is the file's content, except that the file packs weights of fewer than 8 bits
(qfile.py). The kernel's packed operands are derived from those buffers by `pack()` and never
saved. One copy: where a kernel keeps a tensor in its own layout (its packed object names it in
`absorbed`, e.g. the weight-only panels), the layer drops its own buffer after packing and
rebuilds it exactly from the kernel (`rebuild`) when it is read or saved, so a loaded model holds
the weights once.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

from . import rounding
from .kernels import KernelChoice, LayerTensors, pack, registry, select_kernel
from .primitives import check_finite
from .qmodule import QuantizedModule
from .scheme import LayerScheme

_ROUNDED_AT_ONCE = 1 << 22  # weights rounded to nearest in one block of rows (QuantizedLinear.from_float)

__all__ = ["QuantizedLinear", "pack_all", "compile_model"]


class QuantizedLinear(QuantizedModule):
    """y = x @ dequant(weight).T + bias, computed by an int8 kernel.

    Shapes: input `(..., in_features)` -> output `(..., out_features)`, in the input's dtype.
    `dtype` is the activations' dtype the kernel is chosen for: the float layer's, until the
    model is cast (`model.to(torch.bfloat16)`: the buffers keep their dtypes and the layer is
    packed again for bf16 activations; see qmodule.py).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: LayerScheme,
        *,
        bias: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.dtype = in_features, out_features, scheme, dtype
        sshape = scheme.granularity.scale_shape((out_features, in_features))
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(sshape, dtype=torch.float32))
        self.register_buffer("weight_zero_point", torch.zeros(sshape, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        static = scheme.static
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32) if static else None)
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int8) if static else None)
        smooth = scheme.smooth is not None
        self.register_buffer("smooth_scale", torch.ones(in_features, dtype=torch.float32) if smooth else None)
        self.kernel: KernelChoice | None = None
        self._run = None
        self._any_rank = False
        self._compiled: _Packed | None = None  # this layer's entry in _PACKED (compile_model)
        self._absorbed: tuple[str, ...] = ()  # buffers the packed kernel holds in its own layout (`pack`)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, scheme: LayerScheme, *, name: str = "layer",
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None, smooth_scale: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
    ) -> "QuantizedLinear":
        """Quantize `linear.weight` `(out, in)` with `scheme` (not yet packed).

        `input_qparams` (scale `()`, zero point `()`) are static mode's calibrated activation
        parameters; `smooth_scale` `(in,)` (SmoothQuant's factors, for a scheme with `smooth`)
        multiplies the weight's columns and divides the activations at run time. `hessian`
        `(in, in)` (of the layer's inputs before any `smooth_scale`: `rounding.InputStats`) is
        what a scheme with GPTQ rounding needs; the weights are rounded by the scheme's
        `rounding` (rounding.py).
        """
        w = linear.weight.detach()
        check_finite(w, f"layer {name!r}: weight")
        if linear.bias is not None:
            check_finite(linear.bias, f"layer {name!r}: bias")
        if (smooth_scale is None) != (scheme.smooth is None):
            raise ValueError("a scheme with smooth needs smooth_scale from calibration, and only it")
        if scheme.gptq and hessian is None:
            raise ValueError(f"layer {name!r}: rounding {scheme.rounding} needs the Hessian of its inputs from calibration")
        q = cls(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None, dtype=w.dtype)
        if smooth_scale is not None:
            q.smooth_scale.copy_(smooth_scale)
        # rows rounded to nearest a block at a time where each row has its own scales: the same
        # values, and float temporaries of a block, not of the weight (a 32000 x 2048 head: 16 MB
        # each, not 250 MB); GPTQ and one scale per tensor need the whole weight at once
        whole = scheme.gptq or q.weight_scale.dim() == 0
        step = w.shape[0] if whole else max(1, _ROUNDED_AT_ONCE // max(1, w.shape[1]))
        for i in range(0, w.shape[0], step):
            rows = w[i:i + step]
            if smooth_scale is not None:
                rows = rows.float() * smooth_scale  # (out, in) * (in,)
            if scheme.gptq:  # the inputs the weights meet are x / smooth_scale: H / (s s^T)
                h = hessian if smooth_scale is None else hessian / torch.outer(smooth_scale, smooth_scale).to(hessian)
                values, scale, zp = rounding.gptq(rows, h, scheme, name)
            else:
                values, scale, zp = rounding.round_to_nearest(rows, scheme, name)
            q.weight[i:i + step].copy_(values)
            scales = (q.weight_scale, q.weight_zero_point) if whole else (q.weight_scale[i:i + step], q.weight_zero_point[i:i + step])
            scales[0].copy_(scale.reshape(scales[0].shape))
            scales[1].copy_(zp.reshape(scales[1].shape))
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        if scheme.static:
            if input_qparams is None:
                raise ValueError("static mode needs input_qparams from calibration")
            q.input_scale.copy_(input_qparams[0])
            q.input_zero_point.copy_(input_qparams[1])
        return q

    def pack(self, device: torch.device | str = "cpu") -> "QuantizedLinear":
        """Move the buffers to `device`, choose this machine's kernel and prepare its operands."""
        self._restore_absorbed()  # (needs the kernel that holds them)
        self._run = None  # not packed twice by the move (_moved)
        self.to(device)
        self.kernel = select_kernel(
            self.scheme, device=device, dtype=self.dtype, in_features=self.in_features,
            out_features=self.out_features,
        )
        act = None if self.input_scale is None else (self.input_scale, self.input_zero_point)
        layer = LayerTensors(self.weight, self.weight_scale, self.weight_zero_point, self.bias, act, self.smooth_scale)
        self._run = pack(self.kernel, layer, self.scheme, device=device, dtype=self.dtype)
        self._any_rank = getattr(self._run, "takes_any_rank", False)
        self._compiled = None
        self._absorb()
        return self

    def _moved(self, device: torch.device) -> None:
        if self._run is not None:  # packed for another device or activation dtype
            self.pack(device)

    # one copy of the weights -------------------------------------------------------------------
    def _absorb(self) -> None:
        """Drop the buffers the packed kernel holds in its own layout (`absorbed`): it rebuilds them."""
        self._absorbed = tuple(n for n in getattr(self._run, "absorbed", ()) if self._buffers.get(n) is not None)
        for name in self._absorbed:
            del self._buffers[name]

    def _restore_absorbed(self) -> None:
        """Put the absorbed buffers back, rebuilt from the kernel, in their registration order."""
        if not self._absorbed:
            return
        rebuilt = {name: self._run.rebuild(name) for name in self._absorbed}
        rest = dict(self._buffers)
        self._buffers.clear()
        for name in ("weight", "weight_scale", "weight_zero_point"):
            if name in rebuilt:
                self._buffers[name] = rebuilt[name]
        self._buffers.update(rest)
        self._absorbed = ()

    def __getattr__(self, name: str):
        absorbed = self.__dict__.get("_absorbed", ())
        if name in absorbed:  # a buffer the kernel holds: rebuilt exactly on each read
            return self.__dict__["_run"].rebuild(name)
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._absorbed:  # the file's tensors, in the order the buffers were registered
            tail = {k: destination.pop(k) for k in list(destination) if k.startswith(prefix) and
                    k[len(prefix):] not in self._absorbed and "." not in k[len(prefix):]}
            for name in self._absorbed:
                destination[prefix + name] = self._run.rebuild(name)
            destination.update(tail)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        packed = self._absorbed
        self._restore_absorbed()  # loading writes into the buffers; the kernel is packed again after
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if packed:
            self.pack(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._run is None:
            raise RuntimeError("QuantizedLinear used before pack(); call quantize_model or load_quantized")
        if x.requires_grad:  # int8 kernels have no gradient; an input that requires grad (after a
            # float embedding) must not reach their in-place and out= ops under autograd. Only then:
            # entering no_grad costs a few us a call, a third of a small layer's time at batch 1
            if torch.is_grad_enabled():  # the output cannot carry x's gradient: say so
                _warn_no_gradient()
            with torch.no_grad():
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # under compile_model: one opaque op in the graph instead of a graph break; torch.export
        # (which also counts as compiling) and a plain torch.compile trace the kernel itself
        if self._compiled is not None and torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            y = torch.ops.qlin.linear(x.reshape(-1, self.in_features), self._compiled.handle)
            return y.reshape(*x.shape[:-1], self.out_features)
        if x.dim() == 2 or self._any_rank:  # (M, in) -> (M, out): the common case, without reshapes
            return self._run(x)
        y = self._run(x.reshape(-1, self.in_features))  # (M, out_features)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = self.kernel.name if self.kernel else "unpacked"
        s = self.scheme
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, mode={s.mode}, "
            f"granularity={s.granularity}" + (f"({s.group_size})" if s.group_size else "")
            + (f", bits={s.bits}" if s.bits != 8 else "") + f", symmetric={s.symmetric}, kernel={kernel}"
            + (", smoothed" if s.smooth is not None else "")
        )


_warned_no_gradient = False


def _warn_no_gradient() -> None:
    """Warn, once per process, that gradients stop at quantized layers. A warning, not an error:
    an inference script that forgot `torch.no_grad()` gets correct outputs (its inputs require
    grad only because a float embedding's weights do), and raising would break it."""
    global _warned_no_gradient
    if not _warned_no_gradient:
        _warned_no_gradient = True
        warnings.warn(
            "QuantizedLinear has no gradient: backward stops at quantized layers (the input's .grad stays None "
            "through them); run under torch.no_grad() or torch.inference_mode(), or train the float model",
            UserWarning, stacklevel=3)


class _Packed:
    """A packed kernel as the `qlin::linear` op finds it: the callable and its output width."""

    def __init__(self, run, out_features: int) -> None:
        self.run, self.out_features, self.handle = run, out_features, next(_HANDLES)
        _PACKED[self.handle] = self


# Packed kernels by handle, for `qlin::linear`: the op's arguments must be tensors and numbers, and
# oneDNN's packed weight is an opaque tensor that compile's fake tensors cannot stand in for. An
# entry lives as long as its layer (weak values; the layer holds its _Packed) and is made by
# compile_model, so eager use registers nothing.
_PACKED: "weakref.WeakValueDictionary[int, _Packed]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("qlin::linear", mutates_args=())
def _linear_op(x: torch.Tensor, handle: int) -> torch.Tensor:
    """A packed layer's kernel on `x` `(M, in)` -> `(M, out)`, as one op that `torch.compile`
    keeps whole (the kernels are prepacked ops and qlin's fused C++, nothing to trace into)."""
    return _PACKED[handle].run(x)


@_linear_op.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], _PACKED[handle].out_features)


def pack_all(layers: list[QuantizedLinear], device: torch.device | str = "cpu") -> None:
    """`pack(device)` every layer. Layers whose kernel packs on one core and releases the GIL
    (`Kernel.packs_on_one_core`: fbgemm's prepack) pack side by side on as many threads as torch
    computes with (BERT-base, 73 layers on 2 cores: 0.10 s against 0.19 s one after the other);
    every other layer on the calling thread: its packing is torch ops that use every core
    already, and on pool threads (each with its own OpenMP team and malloc arena) an 8-layer
    Llama's per-token int8 load took 0.8-0.9 s and peaked at 1.24-1.35x its file, against
    0.6-0.7 s and 1.02-1.04x here; glibc also kept grouped layers' freed packing memory in the
    pool threads' arenas. The packed result does not depend on the thread."""
    pooled = []
    for q in layers:
        choice = select_kernel(q.scheme, device=device, dtype=q.dtype, in_features=q.in_features,
                               out_features=q.out_features)
        if registry.get(choice.name).packs_on_one_core:
            pooled.append(q)
        else:
            q.pack(device)
    workers = min(len(pooled), torch.get_num_threads())
    if workers <= 1:
        for q in pooled:
            q.pack(device)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="qlin-pack") as pool:
        for _ in pool.map(lambda q: q.pack(device), pooled):
            pass


def compile_model(model: nn.Module) -> nn.Module:
    """`torch.compile(model)` with every packed QuantizedLinear one opaque `qlin::linear` op in the
    graph (its kernels are already prepacked ops and fused C++): no graph breaks, so the work
    between the Linear layers (LayerNorm, GELU, residual adds, attention) compiles and fuses.
    Compiling happens on the first call, and again for new input shapes."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            if m._run is None:
                raise RuntimeError("compile_model needs packed layers; call quantize_model or load_quantized first")
            m._compiled = _Packed(m._run, m.out_features)
    return torch.compile(model)
