"""QuantizedModule: what qlin's quantized layers share when the model around them changes dtype.

A quantized layer's buffers are what the file stores (int8 codes, float32 scales, the bias in
its own dtype). Casting a model (`model.to(torch.bfloat16)`, `.bfloat16()`, `.half()`,
`.float()`) changes the dtype of the layer's activations instead: it takes and returns the new
dtype, and its stored tensors keep theirs, so nothing is rounded away and `save_quantized` writes
the same bytes after the cast. That is how an int8 model runs its non-Linear work (LayerNorm,
attention, GELU, the adds) in bf16: `model.to(torch.bfloat16)`; where the layer's kernel reads and
writes bf16 itself (`onednn`), no conversion pass is added.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

__all__ = ["QuantizedModule"]


class QuantizedModule(nn.Module):
    """An `nn.Module` whose buffers never change dtype; `dtype` is its activations' float dtype."""

    dtype: torch.dtype

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "QuantizedModule":
        # (a kernel may hold every stored tensor itself: lowbit's panels; those run on CPU)
        device = next(iter(self.buffers()), torch.empty(0)).device
        f32 = fn(torch.zeros((), device=device))
        casts = f32.dtype != torch.float32 or fn(torch.zeros((), dtype=torch.float64, device=device)).dtype != torch.float64
        if not casts:  # a move, share_memory_, to_empty: as nn.Module does it
            super()._apply(fn, recurse)
        else:  # a float cast: the stored tensors only move; the activations take the new dtype
            super()._apply(lambda t: t.to(f32.device), recurse)
        before = (self.dtype, device)
        if casts:
            self.dtype = f32.dtype
        if (self.dtype, f32.device) != before:
            self._moved(f32.device)
        return self

    def _moved(self, device: torch.device) -> None:
        """Called after the activations' dtype or the device changed (re-pack a kernel here)."""
