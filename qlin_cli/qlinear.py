"""QuantizedLinear: the int8 replacement of an `nn.Linear`.

Its buffers are exactly what the qlin file stores for a layer (`weight` int8 `(out, in)`,
`weight_scale` float32 `()` or `(out,)`, `weight_zero_point` int8 of the scale's shape, and
`bias`), so `state_dict()` is the file's content. The kernel's packed operands are derived from
those buffers by `pack()` and never saved.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import Granularity
from .kernels import KernelChoice, pack, select_kernel
from .primitives import check_finite, choose_qparams, quantize

__all__ = ["QuantizedLinear"]


class QuantizedLinear(nn.Module):
    """y = x @ dequant(weight).T + bias, computed by an int8 kernel.

    Shapes: input `(..., in_features)` -> output `(..., out_features)`, in the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        mode: str,
        granularity: Granularity,
        symmetric: bool,
        act_granularity: str | None,
        kernel: str = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.granularity, self.symmetric = mode, granularity, symmetric
        self.act_granularity, self.kernel_request, self.dtype = act_granularity, kernel, dtype
        sshape = granularity.scale_shape((out_features, in_features))
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(sshape, dtype=torch.float32))
        self.register_buffer("weight_zero_point", torch.zeros(sshape, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.kernel: KernelChoice | None = None
        self._run = None

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, mode: str, granularity: Granularity, symmetric: bool,
        act_granularity: str | None, kernel: str = "auto", name: str = "layer",
    ) -> "QuantizedLinear":
        """Quantize `linear.weight` `(out, in)` with the given scheme (not yet packed)."""
        w = linear.weight.detach()
        check_finite(w, f"layer {name!r}: weight")
        if linear.bias is not None:
            check_finite(linear.bias, f"layer {name!r}: bias")
        q = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode,
            granularity=granularity, symmetric=symmetric, act_granularity=act_granularity,
            kernel=kernel, dtype=w.dtype,
        )
        scale, zp = choose_qparams(w, granularity, symmetric)
        q.weight.copy_(quantize(w, scale, zp, symmetric))
        q.weight_scale.copy_(scale)
        q.weight_zero_point.copy_(zp)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def pack(self, device: torch.device | str = "cpu", **pack_options) -> "QuantizedLinear":
        """Move the buffers to `device`, choose this machine's kernel and prepare its operands."""
        self.to(device)
        self.kernel = select_kernel(
            request=self.kernel_request, mode=self.mode, act_granularity=self.act_granularity,
            device=device, dtype=self.dtype, in_features=self.in_features,
            out_features=self.out_features,
        )
        self._run = pack(
            self.kernel, self.weight, self.weight_scale, self.weight_zero_point, self.bias,
            act_granularity=self.act_granularity, device=device, dtype=self.dtype, **pack_options,
        )
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._run is None:
            raise RuntimeError("QuantizedLinear used before pack(); call quantize_model or load_quantized")
        y = self._run(x.reshape(-1, self.in_features))  # (M, out_features)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = self.kernel.name if self.kernel else "unpacked"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
            f"granularity={self.granularity}, symmetric={self.symmetric}, kernel={kernel}"
        )
