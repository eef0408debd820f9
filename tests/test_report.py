"""Metrics and report rendering."""

import math
from dataclasses import dataclass

import pytest
import torch

from qlin_cli.errors import InputError
from qlin_cli.report import batches, compare_outputs, first_tensor, json_safe, median_latency_ms, to_markdown


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


def test_compare_outputs_numbers():
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out = torch.tensor([[0.5, 0.0], [0.0, 2.0]])
    m = compare_outputs(ref, out)
    assert math.isclose(m["sqnr_db"], 10 * math.log10(5 / 0.25), rel_tol=1e-6)
    assert math.isclose(m["max_abs_err"], 0.5) and math.isclose(m["mse"], 0.25 / 4)
    assert math.isclose(m["cosine"], 1.0) and m["top1_agreement"] == 1.0
    m = compare_outputs(ref, torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
    assert m["top1_agreement"] == 0.5 and math.isclose(m["cosine"], 0.5)
    assert compare_outputs(torch.ones(2, 3, 4), torch.ones(2, 3, 4))["top1_agreement"] is None
    with pytest.raises(InputError, match="differ in shape"):
        compare_outputs(torch.ones(2, 3), torch.ones(3, 2))


def test_batches_slice_tensors_and_dicts():
    x = torch.arange(10)
    assert [b.tolist() for b in batches(x, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    d = {"input_ids": torch.arange(5), "mask": torch.ones(5)}
    assert [len(b["mask"]) for b in batches(d, 2)] == [2, 2, 1]


def test_latency_is_measured_for_each_model():
    models = [torch.nn.Linear(4, 4), torch.nn.Identity()]
    times = median_latency_ms(models, torch.randn(8, 4), batch_size=4, repeats=2)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_json_safe_and_markdown():
    assert json_safe({"a": [float("inf"), -float("inf"), 1.0]}) == {"a": ["inf", "-inf", 1.0]}
    report = {
        "source": "m.pt", "output": "m.int8.safetensors", "config": {"mode": "dynamic"},
        "totals": {"size_float_bytes": 400, "size_int8_bytes": 100, "compression": 4.0,
                   "linear_bytes_float": 300, "linear_bytes_int8": 80, "layers_quantized": 1, "layers_total": 2,
                   "layers_skipped": 1},
        "probe": {"sqnr_db": 41.5, "cosine": 0.99999, "description": "8 samples", "compared": "output",
                  "max_abs_err": 0.01},
        "fallback": {"target_sqnr_db": 40.0, "initial_sqnr_db": 38.5, "final_sqnr_db": 41.5,
                     "steps": [{"layer": "head", "alone_sqnr_db": 30.0, "sqnr_db_after": 41.5}]},
        "layers": [
            {"name": "fc", "status": "quantized", "weight_shape": [4, 8], "scale_shape": [4], "kernel": "int_mm",
             "weight_sqnr_db": 44.0, "output_sqnr_db": 41.0, "bytes_float": 144, "bytes_int8": 56, "reason": "",
             "kernel_reason": "auto"},
            {"name": "head", "status": "skipped", "weight_shape": [2, 4], "scale_shape": None, "kernel": None,
             "weight_sqnr_db": None, "bytes_float": 40, "bytes_int8": 40, "reason": "matches --skip 'head'"},
        ],
    }
    md = to_markdown(report)
    assert "| fc | (4, 8) | (4,) | int_mm | 44.00 | 41.00 | 144 -> 56 | auto |" in md
    assert "| head | (2, 4) | - | float | - | - | 40 -> 40 | matches --skip 'head' |" in md
    assert "SQNR 41.50 dB" in md and "4.00x smaller" in md
    assert "- accuracy fallback to 40 dB: all int8 gave 38.50 dB; head float -> 41.50 dB" in md
