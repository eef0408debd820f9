"""Model inputs and running models on them (qlin_cli.data)."""

from dataclasses import dataclass

import pytest
import torch

from qlin_cli.data import batches, first_tensor, median_latency_ms
from qlin_cli.errors import InputError


@dataclass
class Out:
    loss: torch.Tensor | None
    logits: torch.Tensor


def test_first_tensor_of_structured_outputs():
    t = torch.ones(2)
    assert first_tensor(t) == (t, "output")
    assert first_tensor((t, 3))[1] == "output[0]"
    assert first_tensor({"last_hidden_state": t})[1] == "output['last_hidden_state']"
    assert first_tensor(Out(None, t))[1] == "output['logits']"
    assert first_tensor([None, (t,)])[1] == "output[1][0]"
    with pytest.raises(InputError, match="holds no tensor"):
        first_tensor({"a": 1})


def test_batches_slice_tensors_and_dicts():
    x = torch.arange(10)
    assert [b.tolist() for b in batches(x, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    d = {"input_ids": torch.arange(5), "mask": torch.ones(5)}
    assert [len(b["mask"]) for b in batches(d, 2)] == [2, 2, 1]


def test_latency_is_measured_for_each_model():
    models = [torch.nn.Linear(4, 4), torch.nn.Identity()]
    times = median_latency_ms(models, torch.randn(8, 4), batch_size=4, repeats=2)
    assert len(times) == 2 and all(t > 0 for t in times)
