"""QuantizedEmbedding: an `nn.Embedding` whose table is int8, one scale per row (weight-only).

A lookup gathers int8 rows and dequantizes only those: `out[..., :] = s[id] * q[id, :]`, in the
table's float dtype. Nothing else of the model changes: activations stay float.

Buffers (what the qlin file stores for an embedding `<name>`): `weight` int8
`(num_embeddings, embedding_dim)` with values in [-127, 127] and `weight_scale` float32
`(num_embeddings,)`, s = amax(|row|) / 127 (symmetric: the zero point is 0 and not stored). An
all-zero row (a padding row) gets a tiny positive scale and stays exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .primitives import check_finite, choose_qparams, quantize
from .qmodule import QuantizedModule
from .scheme import PER_CHANNEL

__all__ = ["QuantizedEmbedding"]


class QuantizedEmbedding(QuantizedModule):
    """ids `(...)` int64 -> rows `(..., embedding_dim)` in `dtype`, gathered from an int8 table
    (`model.to(torch.bfloat16)` makes the rows bf16; the table and its scales stay as stored)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.dtype = padding_idx, dtype
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32))

    @classmethod
    @torch.no_grad()
    def from_float(cls, embedding: nn.Embedding, *, name: str = "embedding") -> "QuantizedEmbedding":
        """Quantize `embedding.weight` `(num, dim)` per row (symmetric int8)."""
        w = embedding.weight.detach()
        check_finite(w, f"embedding {name!r}: weight")
        q = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx, dtype=w.dtype)
        scale, zero_point = choose_qparams(w, PER_CHANNEL, symmetric=True)  # (num,) each, zero point 0
        q.weight.copy_(quantize(w, scale, zero_point, True))
        q.weight_scale.copy_(scale)
        return q

    def dequantized(self) -> torch.Tensor:
        """The whole table as float32 `(num, dim)`: what a lookup of every id returns."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)  # (..., dim) int8: only the rows asked for
        return (rows.float() * self.weight_scale[ids].unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, int8 per row"
