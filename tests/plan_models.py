"""Small models for test_plan.py and test_quantize.py: nn.Linear subclasses (affine or not) and a
model with a shared Linear, a subclass and a MultiheadAttention."""

import torch
import torch.nn as nn


class ScaledLinear(nn.Linear):
    """A unit-scaling style layer: its forward is not x @ W.T + b."""

    def forward(self, x):
        return super().forward(x) / self.in_features**0.5


class GainLinear(nn.Linear):
    """Output times a learned scalar, plus a constant: still affine."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        return self.gain * nn.functional.linear(x, self.weight) + 0.5


class SquashLinear(nn.Linear):
    """Not affine: tanh of the linear map."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16, bias=False))])
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 4), "b": self.shared})
        self.scaled = ScaledLinear(16, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        x = self.shared(x) + self.scaled(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.blocks[0](x)
        return self.heads["a"](self.heads["b"](x))
