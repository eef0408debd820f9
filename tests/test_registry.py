"""The kernel registry: what each registered kernel declares, the scheme's validation of kernel
names against it, a kernel registered from outside (chosen by request, packed, run, refused),
`KernelChoice.fallback` on the selection table, and the readers of the registry (the report's
note, the fallback's widening)."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qlin_cli.errors import ConfigError
from qlin_cli.fallback import _wide_scheme
from qlin_cli.kernels import Kernel, KernelChoice, native, registry, select_kernel
from qlin_cli.kernels import fbgemm as fbgemm_room
from qlin_cli.primitives import dequantize
from qlin_cli.qlinear import QuantizedLinear
from qlin_cli.report import layer_note
from qlin_cli.scheme import LayerScheme


def test_every_registered_kernel_declares_itself():
    """One kernel per room, in ROOMS order; each has a name, activations that say which modes it
    serves, a rank of its own, and packs."""
    kernels = registry.kernels()
    assert sorted(k.name for k in kernels) == sorted(registry.ROOMS)
    for kernel in kernels:
        assert isinstance(kernel.name, str) and kernel.name and kernel.name != "auto"
        assert kernel.activations in ("int8", "float"), kernel.name
        assert type(kernel).pack is not Kernel.pack, kernel.name
    ranks = [k.rank for k in kernels]
    assert ranks == sorted(set(ranks))
    assert {k.name for k in kernels if k.low_bit} == {"lowbit", "int4pack"}
    assert {k.name for k in kernels if not k.requestable} == {"dequant"}


def _valid_scheme(kernel: Kernel) -> LayerScheme:
    if kernel.activations == "int8":
        return LayerScheme(kernel=kernel.name)
    return LayerScheme(mode="weight-only", bits=4, group_size=32, kernel=kernel.name) if kernel.low_bit else \
        LayerScheme(mode="weight-only", kernel=kernel.name)


def test_scheme_accepts_exactly_auto_and_the_requestable_kernels():
    names = registry.request_names()
    assert names == ("auto", *(n for n in registry.ROOMS if registry.get(n).requestable))
    for kernel in registry.kernels():
        if kernel.requestable:
            assert _valid_scheme(kernel).kernel == kernel.name
        else:
            with pytest.raises(ConfigError, match=f"use one of {', '.join(names)}$"):
                LayerScheme(mode="weight-only", kernel=kernel.name)
    with pytest.raises(ConfigError, match=f"kernel = 'cublas' is not valid: use one of {', '.join(names)}$"):
        LayerScheme(kernel="cublas")


def test_scheme_checks_the_kernel_against_mode_and_weights():
    with pytest.raises(ConfigError, match="kernel 'int_mm' quantizes activations; weight-only mode takes kernel "
                                          "'auto', 'weight_only', 'lowbit', 'int4pack'$"):
        LayerScheme(mode="weight-only", kernel="int_mm")
    with pytest.raises(ConfigError, match="kernel 'lowbit' needs `mode` weight-only$"):
        LayerScheme(kernel="lowbit")
    with pytest.raises(ConfigError, match="grouped weights take kernel 'auto', 'lowbit' or 'int4pack'$"):
        LayerScheme(group_size=64, kernel="weight_only")
    with pytest.raises(ConfigError, match="takes `bits` 4 with `group_size` 32, 64, 128 or 256$"):
        LayerScheme(bits=4, group_size=48, kernel="int4pack")


class _Fake(Kernel):
    """A kernel from outside qlin: a float matmul on the dequantized weight, for dynamic layers,
    that refuses layers wider than `max_in`."""

    name, activations, rank = "fake", "int8", 5
    max_in = 1 << 20

    def refusal(self, scheme, target):
        return None if target.in_features <= self.max_in else f"fake takes at most {self.max_in} inputs"

    def pack(self, layer, scheme, device, dtype):
        weight = dequantize(layer.weight, layer.scale, layer.zero_point)
        return lambda x: F.linear(x, weight, layer.bias)


@pytest.fixture
def fake():
    kernel = _Fake()
    registry.register(kernel)
    try:
        yield kernel
    finally:
        registry.unregister("fake")


def test_a_kernel_registered_from_outside_is_requested_packed_and_run(fake):
    assert registry.request_names()[-1] == "fake"
    scheme = LayerScheme(kernel="fake")
    linear = nn.Linear(16, 8)
    q = QuantizedLinear.from_float(linear, scheme).pack("cpu")
    assert q.kernel == KernelChoice("fake", "requested", True, False)
    x = torch.randn(5, 16)
    reference = F.linear(x, dequantize(q.weight, q.weight_scale, q.weight_zero_point), q.bias)
    assert torch.equal(q(x), reference)
    with pytest.raises(ValueError, match="registered already"):
        registry.register(_Fake())
    fake.max_in = 8  # refused here: the int8 kernels after it in rank order run it, a reported fallback
    c = select_kernel(scheme, device="cpu", dtype=torch.float32, in_features=16, out_features=8)
    assert c.name in ("onednn", "pertoken", "fbgemm", "int_mm") and c.fallback and c.reason == "fallback: fake takes at most 8 inputs"
    assert select_kernel(LayerScheme(), device="cpu", dtype=torch.float32, in_features=16, out_features=8).name != "fake"


def test_an_unregistered_kernel_is_no_longer_a_valid_request(fake):
    registry.unregister("fake")
    try:
        with pytest.raises(ConfigError, match="kernel = 'fake' is not valid"):
            LayerScheme(kernel="fake")
    finally:
        registry.register(fake)


def _schemes():
    for mode, bits, group, act, kernel in itertools.product(
            ["dynamic", "static", "weight-only"], [8, 4], [None, 32, 48], [None, "tensor"], registry.request_names()):
        try:
            yield LayerScheme(mode=mode, bits=bits, group_size=group, act_granularity=act, kernel=kernel)
        except ConfigError:
            pass


@pytest.mark.parametrize("without", ["nothing", "fused kernels", "fbgemm"])
def test_fallback_is_set_exactly_where_a_choice_falls_back(monkeypatch, without):
    """On a table of schemes, devices, dtypes and shapes (and with parts of the machine taken
    away), `fallback` is True for exactly the choices whose reason says "fallback"; every named
    kernel that is not chosen is a fallback."""
    if without == "fused kernels":
        monkeypatch.setattr(native, "_load", lambda: (None, "turned off by QLIN_NATIVE=0"))
    if without == "fbgemm":
        monkeypatch.setattr(fbgemm_room, "_fbgemm_missing", lambda: "this torch build has no fbgemm quantized engine")
    seen = set()
    for scheme in _schemes():
        for device, dtype, (k, n) in itertools.product(["cpu", "cuda"], [torch.float32, torch.bfloat16],
                                                       [(64, 64), (96, 40)]):
            c = select_kernel(scheme, device=device, dtype=dtype, in_features=k, out_features=n)
            assert c.fallback == c.reason.startswith("fallback"), (scheme, device, dtype, c)
            if scheme.kernel != "auto" and c.name != scheme.kernel:
                assert c.fallback, (scheme, device, dtype, c)
            seen.add(c.fallback)
    assert seen == {True, False}


def test_the_report_note_reads_the_fallback_field():
    """A choice's reason is noted when it is a fallback (the field, not the wording) or when its
    kernel computes in float (the registry's `float_weights`)."""
    odd = KernelChoice("int_mm", "fallback: (only the wording)", True, False)
    assert layer_note("quantized", "", odd) == ""
    flagged = KernelChoice("int_mm", "ran elsewhere", True, True)
    assert layer_note("quantized", "", flagged) == "ran elsewhere"
    assert layer_note("quantized", "subclass", KernelChoice("dequant", "auto: float", False, False)) == \
        "subclass; auto: float; batch-dependent"
    assert layer_note("quantized", "", None) == ""


def test_widening_drops_a_low_bit_kernel_request_only():
    for kernel in ("lowbit", "int4pack"):
        wide = _wide_scheme(LayerScheme(bits=4, group_size=32, kernel=kernel))
        assert (wide.kernel, wide.bits, wide.group_size) == ("auto", 8, None)
    assert _wide_scheme(LayerScheme(mode="weight-only", bits=4, kernel="weight_only")).kernel == "weight_only"
    assert _wide_scheme(LayerScheme(bits=4, kernel="fbgemm")).kernel == "fbgemm"
