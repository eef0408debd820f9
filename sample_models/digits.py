"""Factory for the digits MLP architecture (weights live in digits_mlp.safetensors).

Usage with qlin::

    qlin quantize sample_models/digits_mlp.safetensors --model sample_models.digits:build_digits_mlp
"""

import torch
from torch import nn

SEED = 0


def build_digits_mlp() -> nn.Sequential:
    """Return the untrained 64 -> 256 -> 256 -> 10 MLP (float32, eval mode).

    Initialisation uses a fixed seed inside a forked RNG, so the global RNG
    state of the caller is left untouched and the result is reproducible.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = nn.Sequential(
            nn.Linear(64, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
    return model.eval()
