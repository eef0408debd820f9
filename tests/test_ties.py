"""Tied weights are stored once in the qlin file and tied again on load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from conftest import tamper
from qlin_cli import QuantConfig, load_quantized, quantize_model, save_quantized
from qlin_cli.errors import FormatError
from qlin_cli.qfile import read_qfile

VOCAB, DIM = 1000, 256


class TinyLM(nn.Module):
    """Token embedding -> Linear -> head, the head's weight tied to the embedding (or not)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.body = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.emb(ids))))


def quantized(tie: bool, tmp_path, name: str):
    torch.manual_seed(0)
    model = TinyLM(tie)
    if not tie:  # the same values, untied: the file must hold both copies
        with torch.no_grad():
            model.head.weight.copy_(model.emb.weight)
    res = quantize_model(model, QuantConfig(kernel="fbgemm", skip=("head",)))  # float either way
    return res, save_quantized(res, tmp_path / name)


def test_a_tied_weight_is_stored_once_and_tied_again_on_load(tmp_path):
    res, tied = quantized(True, tmp_path, "tied.safetensors")
    _, untied = quantized(False, tmp_path, "untied.safetensors")
    assert [r.status for r in res.layers] == ["quantized", "skipped"]  # the tied head stays float
    with safe_open(tied, framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "head.weight" not in keys and "emb.weight" in keys
    assert json.loads(meta["ties"]) == {"head.weight": "emb.weight"}
    table = VOCAB * DIM * 4
    saved = untied.stat().st_size - tied.stat().st_size
    assert table <= saved < table + 512  # that tensor, give or take its header entry
    for skeleton in (TinyLM(tie=True), TinyLM(tie=False)):  # tied again even into an untied skeleton
        model = load_quantized(skeleton, tied)
        assert model.head.weight is model.emb.weight
        ids = torch.randint(0, VOCAB, (2, 5))
        with torch.no_grad():
            assert torch.equal(model(ids), res.model(ids))
    tensors = read_qfile(tied).tensors
    assert tensors["head.weight"] is tensors["emb.weight"]


@pytest.mark.parametrize("ties, message", [
    ("[1, 2]", "metadata 'ties' is not a map of tensor names"),
    ("{not json", "metadata 'ties' is not JSON"),
    ('{"head.weight": "nowhere.weight"}', "tie head.weight -> nowhere.weight: no such tensor"),
    ('{"body.bias": "emb.weight"}', "tie body.bias -> emb.weight: the tied name has its own tensor"),
])
def test_damaged_ties_are_refused(tmp_path, ties, message):
    _, path = quantized(True, tmp_path, "tied.safetensors")
    bad = tamper(path, tmp_path / "bad.safetensors", meta={"ties": ties})
    with pytest.raises(FormatError, match=message):
        read_qfile(bad)
