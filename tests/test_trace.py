"""What torch.jit.trace and torch.export do with a qlin model, per kernel: the
sample MLP and a transformers model built from a config. Where they work, the traced or exported
program gives the eager model's outputs bit for bit; where they cannot, qlin says why in one
sentence instead of torch's error from deep inside the kernel."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import load_digits_mlp
from qlin_cli import QuantConfig, quantize_model
from qlin_cli.kernels import native
from qlin_cli.kernels.fbgemm import FBGEMM_UNTRACEABLE
from qlin_cli.kernels.onednn import ONEDNN_UNTRACEABLE
from qlin_cli.qlinear import QuantizedLinear

X = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))


def _mlp(kernel: str, mode: str = "dynamic"):
    """The sample MLP with every layer on `kernel` (`dequant`, which no one requests: 4-bit
    weight-only groups of 16 where qlin's fused kernels are off, kept as the dequantized float
    weight)."""
    calib = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) if mode == "static" else None
    config = QuantConfig(mode=mode, bits=4, group_size=16) if kernel == "dequant" else QuantConfig(mode=mode, kernel=kernel)
    model = quantize_model(load_digits_mlp(), config, calib=calib).model
    kernels = {m.kernel.name for m in model.modules() if isinstance(m, QuantizedLinear)}
    if kernels != {kernel}:
        pytest.skip(f"the {kernel} kernel does not run here ({kernels})")
    return model


def _trace(model, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values
        return torch.jit.trace(model, args, check_trace=False)


@torch.no_grad()
@pytest.mark.parametrize("kernel, mode", [
    ("int_mm", "dynamic"), ("int_mm", "static"), ("weight_only", "weight-only"), ("dequant", "weight-only"),
])
def test_torch_ops_kernels_trace_and_export(kernel, mode, monkeypatch):
    # dequant: the fallback where the fused kernels cannot be built; weight_only: its torch op
    # (_weight_int8pack_mm) runs where they are not (on CPU it runs qlin's C++ kernel, which is
    # no torch op and does not trace, as lowbit's does not)
    if kernel in ("dequant", "weight_only"):
        monkeypatch.setattr(native, "unavailable_reason", lambda: "turned off for this test")
    model = _mlp(kernel, mode)
    expected = model(X)
    assert torch.equal(_trace(model, X)(X), expected)
    assert torch.equal(torch.export.export(model, (X,)).module()(X), expected)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fbgemm_exports_but_does_not_trace(mode):
    model = _mlp("fbgemm", mode)
    assert torch.equal(torch.export.export(model, (X,)).module()(X), model(X))
    with pytest.raises(RuntimeError) as exc:
        _trace(model, X)
    assert FBGEMM_UNTRACEABLE in str(exc.value)


@torch.no_grad()
@pytest.mark.parametrize("kernel, mode", [("onednn", "dynamic"), ("pertoken", "dynamic"), ("pertoken", "static")])
def test_fused_kernels_neither_trace_nor_export(kernel, mode):
    model = _mlp(kernel, mode)
    with pytest.raises(RuntimeError) as exc:
        _trace(model, X)
    assert ONEDNN_UNTRACEABLE in str(exc.value)
    with pytest.raises(RuntimeError) as exc:
        torch.export.export(model, (X,))
    assert ONEDNN_UNTRACEABLE in str(exc.value)
    assert model(X).shape == (8, 10)  # the eager model still runs


@torch.no_grad()
def test_a_transformers_model_exports():
    """A BERT classifier built from a config, every Linear on int_mm: torch.export gives the
    eager logits bit for bit."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = quantize_model(transformers.BertForSequenceClassification(config).eval(), QuantConfig(kernel="int_mm")).model
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = model(**inputs).logits
    exported = torch.export.export(model, (), inputs).module()
    assert torch.equal(exported(**inputs).logits, expected)
