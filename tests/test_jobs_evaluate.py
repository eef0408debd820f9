"""The eval job's label checks and accuracy (jobs/evaluate.py), in isolation."""

import pytest
import torch
from safetensors.torch import save_file

from qlin_cli.errors import InputError
from qlin_cli.jobs.evaluate import _accuracy, _Compared, _read_labels


def labels_file(tmp_path, labels: torch.Tensor):
    save_file({"labels": labels}, tmp_path / "l.safetensors")
    return tmp_path / "l.safetensors"


def test_labels_are_one_integer_class_index_per_sample(tmp_path):
    assert torch.equal(_read_labels(labels_file(tmp_path, torch.tensor([0, 2, 1])), 3), torch.tensor([0, 2, 1]))
    with pytest.raises(InputError, match="has 3 entries but the inputs have 4 samples"):
        _read_labels(labels_file(tmp_path, torch.tensor([0, 2, 1])), 4)
    with pytest.raises(InputError, match="are float32; give integer class indices"):
        _read_labels(labels_file(tmp_path, torch.tensor([0.0, 1.0])), 2)
    with pytest.raises(InputError, match="must be one 1-D tensor"):
        _read_labels(labels_file(tmp_path, torch.zeros(2, 2, dtype=torch.int64)), 2)


def _compared(reference: torch.Tensor, output: torch.Tensor, batch: int = 3) -> _Compared:
    """The two outputs as _compare gathers them, in batches of `batch` samples."""
    done = _Compared(where="logits")
    for i in range(0, reference.shape[0], batch):
        done.add(reference[i : i + batch], output[i : i + batch])
    return done


def test_accuracy_of_each_model_and_labels_outside_the_classes():
    reference = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])  # argmax 0 1 0 1
    output = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.8, 0.2]])  # argmax 0 0 0 0
    labels = torch.tensor([0, 1, 1, 1])
    assert _accuracy(_compared(reference, output), labels, "l") == (0.75, 0.25)
    with pytest.raises(InputError, match=r"1 label\(s\) outside \[0, 2\) .* the first 5 at sample 2"):
        _accuracy(_compared(reference, output), torch.tensor([0, 1, 5, 1]), "l")
    with pytest.raises(InputError, match=r"needs \(samples, classes\) outputs; logits has shape \(4,\)"):
        _accuracy(_compared(reference[:, 0], output[:, 0]), labels, "l")
