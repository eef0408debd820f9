"""A small hand-written transformer encoder classifier for the 8x8 digits data.

Input: (B, 64) flattened 8x8 images (pixels in [0, 1]), viewed as 8 tokens
(the image rows) of 8 features each. Output: (B, 10) logits.

Attention is written with ``torch.nn.functional.scaled_dot_product_attention``
and plain ``nn.Linear`` layers (no ``nn.MultiheadAttention`` /
``nn.TransformerEncoderLayer``, whose fast paths read the Linear weights
directly and so bypass swapped-in quantized layers).

Usage with qlin::

    qlin quantize sample_models/encoder.safetensors --model sample_models.encoder:build
"""

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
TOKENS = 8
IN_FEATURES = 8
DIM = 128
HEADS = 4
MLP_DIM = 512
DEPTH = 2
CLASSES = 10


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, mlp_dim: int = MLP_DIM):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        qkv = self.qkv(self.ln1(x))  # (B, T, 3D)
        q, k, v = qkv.view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # each (B, H, T, D/H)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H)
        a = a.transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x


class DigitsEncoder(nn.Module):
    def __init__(self, dim: int = DIM, depth: int = DEPTH, heads: int = HEADS,
                 mlp_dim: int = MLP_DIM, classes: int = CLASSES):
        super().__init__()
        self.embed = nn.Linear(IN_FEATURES, dim)
        self.pos_embed = nn.Parameter(torch.zeros(TOKENS, dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], TOKENS, IN_FEATURES)  # 8 rows of 8 pixels
        x = self.embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x).mean(dim=1)
        return self.head(x)


def build() -> DigitsEncoder:
    """Return a fresh, untrained DigitsEncoder (float32, eval mode), seeded.

    The global RNG state of the caller is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = DigitsEncoder()
    return model.eval()
