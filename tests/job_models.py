"""Small models for the job tests (test_jobs_*.py): an MLP, and a model that takes token ids as
a transformers text model does."""

from types import SimpleNamespace

import torch
import torch.nn as nn


def mlp() -> nn.Module:
    """Linear(16, 32), ReLU, Linear(32, 4), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


class TextToy(nn.Module):
    """Takes token ids (a vocabulary of 50, at most 8 positions), as a transformers text model
    does: `main_input_name` and a `config`."""

    main_input_name = "input_ids"

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=50, max_position_embeddings=8)
        self.embed, self.fc = nn.Embedding(50, 16), nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None):
        return self.fc(self.embed(input_ids))
