"""Each kernel against a float reference built from the dequantized weights, exact integer
emulations, the CUDA shape rules (padding) exercised on CPU, and kernel selection."""

import pytest
import torch
import torch.nn.functional as F

from qlin_cli import QuantConfig, quantize_model
from qlin_cli.kernels import SMALL_LAYER, KernelChoice, LayerTensors, kept_float_for_speed, pack, select_kernel
from qlin_cli.kernels.common import reduce_range
from qlin_cli.kernels.fbgemm import _fbgemm_unusable
from qlin_cli.kernels.int_mm import INT_MM_RULES, IntMMRules, _IntMM
from qlin_cli.kernels import native, pertoken, registry
from qlin_cli.kernels.onednn import _onednn_missing
from qlin_cli.kernels.registry import Target
from qlin_cli.primitives import choose_qparams, dequantize, quantize, quantize_activations, sqnr_db
from qlin_cli.scheme import PER_CHANNEL, PER_TENSOR, LayerScheme

KERNELS = [("int_mm", "token"), ("int_mm", "tensor"), ("fbgemm", "token"), ("fbgemm", "tensor"), ("onednn", "token"),
           ("pertoken", "token"), ("weight_only", None), ("dequant", None)]


def _layer(out_f=96, in_f=80, gran=PER_CHANNEL, sym=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.linspace(0.2, 2.0, out_f)[:, None] / in_f**0.5
    b = torch.randn(out_f, generator=g)
    s, z = choose_qparams(w, gran, sym)
    return quantize(w, s, z, sym), s, z, b


def _choice(name, act):
    return KernelChoice(name, "test", act != "tensor", False)


def _pack(name, act, q, s, z, b, device="cpu", dtype=torch.float32, smooth=None):
    """Kernel `name` packed for the layer (q, s, z, b), its activations per token, per tensor
    (`act` "token", "tensor") or float (None: weight-only), divided by `smooth` `(K,)` if given."""
    if act is None:
        scheme = LayerScheme(mode="weight-only")
    else:
        scheme = LayerScheme(act_granularity=act, smooth=None if smooth is None else 0.5)
    return pack(_choice(name, act), LayerTensors(q, s, z, b, smooth=smooth), scheme, device=device, dtype=dtype)


def _runnable(name, device, act="token"):
    """Whether kernel `name` runs a layer with activations `act` on `device` here (its registry
    refusal: fbgemm's per-token codes saturate without VNNI, onednn needs VNNI, ...)."""
    scheme = LayerScheme(mode="weight-only") if act is None else LayerScheme(act_granularity=act)
    return registry.get(name).refusal(scheme, Target(torch.device(device), torch.float32, 80, 96)) is None


@pytest.mark.parametrize("name, act", KERNELS)
@pytest.mark.parametrize("gran", [PER_TENSOR, PER_CHANNEL], ids=str)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_kernel_matches_dequantized_float_reference(name, act, gran, sym, device):
    if not _runnable(name, device, act):
        pytest.skip(f"{name} does not run here")
    q, s, z, b = _layer(gran=gran, sym=sym)
    x = torch.randn(33, q.shape[1], generator=torch.Generator().manual_seed(1))
    run = _pack(name, act, q, s, z, b, device=device)
    y = run(x.to(device)).cpu()
    assert y.shape == (33, q.shape[0]) and y.dtype == torch.float32
    ref = F.linear(x, dequantize(q, s, z), b)
    # float activations: only float rounding; int8 activations: ~ 40 dB on Gaussian inputs
    bound = 80.0 if name in ("weight_only", "dequant") else 35.0
    assert sqnr_db(ref, y) > bound


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("sym", [True, False])
def test_int_mm_equals_exact_integer_emulation(per_token, sym):
    q, s, z, b = _layer(sym=sym)
    x = torch.randn(17, q.shape[1], generator=torch.Generator().manual_seed(2))
    run = _pack("int_mm", "token" if per_token else "tensor", q, s, z, b)
    qx, a, c = quantize_activations(x, per_token)
    zcol = z.long().reshape(-1, 1) if z.dim() else z.long()  # (N, 1) or ()
    acc = qx.long() @ (q.long() - zcol).T  # exact integer (M, N)
    wsum = dequantize(q, s, z).double().sum(dim=1)  # (N,): what the activation offset c adds
    expected = acc.double() * a.double() * s.double() + c.double() * wsum + b.double()
    assert torch.allclose(run(x).double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 13, 7), (1, 16, 8), (40, 8, 24), (5, 33, 1)])
@pytest.mark.parametrize("sym", [True, False])
def test_cuda_shape_rules_pad_without_changing_results(shape, sym):
    """CUDA's _int_mm wants M > 16 and K, N multiples of 8: packing pads K and N, running pads M.
    The padded path (forced here on CPU) is bit-identical to the unpadded one."""
    m, k, n = shape
    q, s, z, b = _layer(out_f=n, in_f=k, sym=sym)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    plain = _pack("int_mm", "token", q, s, z, b)
    padded = _IntMM(q, s, z, b, True, INT_MM_RULES["cuda"])
    assert padded.wt.shape[0] % 8 == 0 and padded.wt.shape[1] % 8 == 0
    assert torch.equal(plain(x), padded(x))
    assert INT_MM_RULES["cuda"] == IntMMRules(8, 8, 17)


@pytest.mark.parametrize("name, act", [("int_mm", "token"), ("fbgemm", "token"), ("onednn", "token"), ("pertoken", "token"),
                                       ("weight_only", None)])
def test_batch_invariant_kernels_give_bit_identical_rows(name, act, device):
    """A row's output alone and inside any batch (other rows 1000x larger) is bit-identical."""
    if not _runnable(name, device, act):
        pytest.skip(f"{name} does not run here")
    q, s, z, b = _layer(out_f=64, in_f=48)
    run = _pack(name, act, q, s, z, b, device=device)
    row = torch.randn(1, 48, generator=torch.Generator().manual_seed(4)).to(device)
    alone = run(row)
    for batch in (1, 7, 32, 300):
        others = torch.randn(batch, 48, generator=torch.Generator().manual_seed(batch)).to(device) * 1000
        for pos in (0, batch // 2, batch):
            full = torch.cat([others[:pos], row, others[pos:]])
            assert torch.equal(run(full)[pos : pos + 1], alone), (batch, pos)


@pytest.mark.parametrize("name", ["int_mm", "fbgemm", "onednn", "pertoken"])
def test_batch_invariance_holds_for_odd_shapes_threads_and_chunks(name):
    """Large enough for the elementwise ops to split rows between threads at odd places, and for
    the fbgemm path to cut the batch into chunks: a row's result still never changes."""
    if name == "fbgemm" and not FBGEMM_TOKEN:
        pytest.skip("per-token fbgemm needs a VNNI x86 CPU")
    if name == "onednn" and not ONEDNN:
        pytest.skip(f"onednn: {_onednn_missing(torch.device('cpu'), torch.float32)}")
    if name == "pertoken" and not PERTOKEN:
        pytest.skip("pertoken: no SIMD GEMM built here")
    q, s, z, b = _layer(out_f=1031, in_f=333)
    run = _pack(name, "token", q, s, z, b)
    x = torch.randn(1100, 333, generator=torch.Generator().manual_seed(8)) * torch.rand(1100, 1) * 10
    full = run(x)
    for i in (0, 511, 512, 777, 1099):
        assert torch.equal(run(x[i : i + 1]), full[i : i + 1]), i
        assert torch.equal(run(x[i:]), full[i:]), i


def test_kernels_that_are_not_batch_invariant_say_so():
    """Float GEMMs block differently by batch size, and per-tensor activation scales follow the
    largest row: these kernels are reported as batch-dependent."""
    assert not _select(act_granularity="tensor").batch_invariant
    assert not _select(request="int_mm", act_granularity="tensor").batch_invariant


def test_per_tensor_activations_depend_on_the_batch():
    q, s, z, b = _layer(out_f=64, in_f=48)
    row = torch.randn(1, 48, generator=torch.Generator().manual_seed(4))
    big = torch.randn(8, 48) * 1000
    for name in ("fbgemm", "int_mm"):
        run = _pack(name, "tensor", q, s, z, b)
        assert not torch.equal(run(torch.cat([row, big]))[:1], run(row))


def test_output_dtype_follows_input_dtype():
    q, s, z, b = _layer()
    x = torch.randn(4, q.shape[1], dtype=torch.bfloat16)
    for name, act in [("int_mm", "token"), ("weight_only", None), ("dequant", None)]:
        run = _pack(name, act, q, s, z, b, dtype=torch.bfloat16)
        assert run(x).dtype == torch.bfloat16


def _select(request="auto", mode="dynamic", act_granularity="token", **kw):
    """select_kernel for a scheme with these keys (a forced kernel is its `request`)."""
    scheme = LayerScheme(mode=mode, kernel=request, act_granularity=act_granularity)
    args = dict(device="cpu", dtype=torch.float32, in_features=768, out_features=768)
    args.update(kw)
    return select_kernel(scheme, **args)


FBGEMM_TOKEN = _fbgemm_unusable(torch.device("cpu"), torch.float32) is None and not reduce_range()
ONEDNN = _onednn_missing(torch.device("cpu"), torch.float32) is None
PERTOKEN = pertoken.missing(torch.device("cpu"), torch.float32) is None
PER_TOKEN_HERE = "onednn" if ONEDNN else "pertoken" if PERTOKEN else "fbgemm" if FBGEMM_TOKEN else "int_mm"
# static: fbgemm's prepacked GEMM on VNNI CPUs, qlin's own without VNNI, else torch's _int_mm
STATIC_HERE = "fbgemm" if FBGEMM_TOKEN else "pertoken" if PERTOKEN and reduce_range() else "int_mm"


def test_auto_selection_table():
    c = _select()  # per-token: fused oneDNN on VNNI CPUs, qlin's own GEMM on AVX2 ones, else torch's ops
    assert (c.name, c.batch_invariant, c.fallback) == (PER_TOKEN_HERE, True, False)
    c = _select(device="cuda")
    assert (c.name, c.batch_invariant) == ("int_mm", True)
    c = _select(mode="static", act_granularity="tensor")
    assert (c.name, c.batch_invariant) == (STATIC_HERE, True)
    c = _select(act_granularity="tensor")
    assert (c.name, c.batch_invariant) == ("fbgemm", False)
    c = _select(mode="weight-only", act_granularity=None)
    assert (c.name, c.batch_invariant) == ("weight_only", True)
    c = _select(request="int_mm", act_granularity="tensor")
    assert (c.name, c.batch_invariant, c.reason) == ("int_mm", False, "requested")
    assert _select() == _select()  # deterministic


@pytest.mark.parametrize("isa, no_vnni, picked", [("avx2", True, "pertoken"), ("avx2", False, "not pertoken"),
                                                  ("avx512_vnni", False, "not pertoken"), ("scalar", True, "pertoken"),
                                                  ("scalar", False, "not pertoken")])
def test_static_layers_take_qlins_gemm_on_cpus_without_vnni(monkeypatch, isa, no_vnni, picked):
    """Both branches of the choice, whatever this CPU is: without VNNI (fbgemm's static GEMM would
    saturate, torch's CPU _int_mm is a plain loop) `auto` gives static layers qlin's GEMM, its
    scalar loops too where the build has no SIMD ones; with VNNI it leaves them to fbgemm; on
    CUDA and at 65,536 input features or more, int_mm. A request for `pertoken` takes a static layer anywhere on CPU."""
    if not PERTOKEN:
        pytest.skip("qlin's fused kernels do not run here")
    monkeypatch.setattr(pertoken, "isa", lambda: isa)
    monkeypatch.setattr(pertoken, "reduce_range", lambda: no_vnni)
    c = _select(mode="static", act_granularity="tensor")
    if picked == "pertoken":
        assert (c.name, c.batch_invariant, c.fallback) == ("pertoken", True, False)
        assert c.reason == f"auto: static int8 activations, qlin's {isa} GEMM"
    elif picked == "int_mm":
        assert c.name == "int_mm"
    else:
        assert c.name != "pertoken"
    assert _select(mode="static", act_granularity="tensor", device="cuda").name == "int_mm"
    wide = _select(mode="static", act_granularity="tensor", in_features=65536)
    assert wide.name != "pertoken"
    asked = _select(mode="static", act_granularity="tensor", request="pertoken")
    assert (asked.name, asked.reason) == ("pertoken", "requested")
    refused = _select(mode="static", act_granularity="tensor", request="pertoken", in_features=65536)
    assert refused.name != "pertoken" and "fewer than 65536 input features" in refused.reason


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_a_refused_request_falls_back_to_what_auto_would_pick(monkeypatch, isa):
    """fbgemm asked for per-token or static layers on a CPU without VNNI (its codes would
    saturate): the other kernels are asked in auto's order, so qlin's GEMM (ranked before fbgemm)
    takes them, with SIMD loops or without (its scalar loops: 8-15x faster than torch's int_mm
    loop, RESULTS.md "scalar-build"); the reason is fbgemm's."""
    if not PERTOKEN:
        pytest.skip("qlin's fused kernels do not run here")
    import qlin_cli.kernels.fbgemm as fbgemm_room

    monkeypatch.setattr(fbgemm_room, "reduce_range", lambda: True)
    monkeypatch.setattr(pertoken, "reduce_range", lambda: True)
    monkeypatch.setattr(pertoken, "isa", lambda: isa)
    for mode, act in (("dynamic", "token"), ("static", "tensor")):
        c = _select(request="fbgemm", mode=mode, act_granularity=act)
        assert c.name == "pertoken" and c.fallback and c.batch_invariant, mode
        assert c.reason == "fallback: full-range uint8 activations can saturate fbgemm without VNNI"
    c = _select(request="fbgemm", act_granularity="tensor", dtype=torch.float64)  # per tensor: int_mm alone
    assert c.name == "int_mm" and c.fallback


def test_small_layers_are_kept_float_at_plan_time_never_by_the_loading_machine():
    """Below SMALL_LAYER weights int8 loses to float on CPU (benchmarks/RESULTS.md): `auto` keeps
    such a layer float, decided from its shape and scheme alone (the plan records it), and says
    why with the shape as (out, in). Kernel selection, which runs on the loading machine, never
    swaps a dynamic or static layer to a float matmul: every machine quantizes its activations."""
    dynamic = LayerScheme()
    for k, n in [(64, 32), (128, 512), (512, 255)]:
        why = kept_float_for_speed(dynamic, k, n)
        assert why.startswith("kept float for speed") and f"({n}, {k})" in why and "131,072" in why
        for device in ("cpu", "cuda"):
            c = _select(in_features=k, out_features=n, device=device)
            assert c.name != "dequant" and c.batch_invariant, (k, n, device)
    assert SMALL_LAYER == {"dynamic": 128 * 1024, "static": 64 * 1024}
    assert kept_float_for_speed(dynamic, 256, 512) is None  # exactly SMALL_LAYER weights
    static = LayerScheme(mode="static")
    assert "65,536" in kept_float_for_speed(static, 255, 256) and kept_float_for_speed(static, 256, 256) is None
    for request in ("onednn", "fbgemm", "int_mm"):  # an explicit request quantizes any size
        assert kept_float_for_speed(LayerScheme(kernel=request), 64, 32) is None
    for scheme in (LayerScheme(mode="weight-only"), LayerScheme(bits=4, group_size=32)):  # no activation cost
        assert kept_float_for_speed(scheme, 64, 32) is None
    assert _select(in_features=64, out_features=32, mode="weight-only", act_granularity=None).name == "weight_only"


@pytest.mark.skipif(not FBGEMM_TOKEN, reason="per-token fbgemm needs a VNNI x86 CPU")
def test_fbgemm_per_token_rows_do_not_depend_on_the_chunking():
    """Rows are processed `rows` at a time; any chunk size gives bit-identical results."""
    q, s, z, b = _layer(out_f=40, in_f=56)
    run = _pack("fbgemm", "token", q, s, z, b)
    x = torch.randn(1000, 56, generator=torch.Generator().manual_seed(5))
    assert run.rows == 512
    whole = run(x)
    for rows in (1, 7, 64, 999):
        run.rows = rows
        assert torch.equal(run(x), whole), rows


@pytest.mark.skipif(not FBGEMM_TOKEN, reason="per-token fbgemm needs a VNNI x86 CPU")
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_fbgemm_and_int_mm_compute_the_same_per_token_scheme(sym):
    """Both kernels quantize each row onto the same 256 levels (only rounding ties may differ)."""
    q, s, z, b = _layer(sym=sym)
    x = torch.randn(64, q.shape[1], generator=torch.Generator().manual_seed(6)) + 0.5
    fb = _pack("fbgemm", "token", q, s, z, b)(x)
    im = _pack("int_mm", "token", q, s, z, b)(x)
    assert sqnr_db(im, fb) > 60


@pytest.mark.parametrize("name", ["int_mm", "fbgemm", "onednn", "pertoken"])
def test_one_sided_inputs_use_the_whole_int8_range(name, device):
    """ReLU/GELU outputs are one-sided: asymmetric per-token activations give them 255 steps.
    This layer: 49.6 dB (both kernels); symmetric per-token int8 would give it 43.9 dB."""
    if not _runnable(name, device, "token"):
        pytest.skip(f"{name} does not run here")
    q, s, z, b = _layer()
    x = F.gelu(torch.randn(128, q.shape[1], generator=torch.Generator().manual_seed(7)) * 2)
    y = _pack(name, "token", q, s, z, b, device=device)(x.to(device)).cpu()
    assert sqnr_db(F.linear(x, dequantize(q, s, z), b), y) > 48


@pytest.mark.parametrize("keys", [dict(), dict(mode="static", act_granularity="tensor"),
                                  dict(mode="dynamic", group_size=32), dict(request="pertoken")])
def test_float16_layers_get_the_kernels_of_float32_ones(keys):
    """qlin's C++ kernels take float16 rows (converted to float32 and the output rounded back):
    a float16 model's int8 layers no longer fall to torch's plain-loop CPU `_int_mm` (4.5-38x
    slower than the float16 layer at one token, RESULTS.md "fp16-layers")."""
    keys = dict(keys)
    scheme = dict(mode=keys.pop("mode", "dynamic"), act_granularity=keys.pop("act_granularity", "token"),
                  request=keys.pop("request", "auto"))
    if "group_size" in keys:
        s = LayerScheme(mode="dynamic", bits=4, group_size=32)
        c16, c32 = (select_kernel(s, device="cpu", dtype=dt, in_features=768, out_features=768)
                    for dt in (torch.float16, torch.float32))
    else:
        c16, c32 = (_select(**scheme, dtype=dt) for dt in (torch.float16, torch.float32))
    assert (c16.name, c16.fallback, c16.batch_invariant) == (c32.name, c32.fallback, c32.batch_invariant)
    if PERTOKEN:
        assert c16.name != "int_mm" and not c16.fallback


def test_a_float16_model_runs_the_float32_paths_bits_rounded_once():
    """End to end: a float16 model quantized with the defaults runs the kernel a float32 one
    gets, in float16; each layer's output is its float32 result rounded to float16 (one rounding,
    bit for bit), a row's result does not depend on the batch, and the model stays close to its
    float16 self."""
    g = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(512, 384), torch.nn.ReLU(), torch.nn.Linear(384, 512)).half()
    x = (torch.randn(7, 512, generator=g) * 2).half()
    with torch.inference_mode():
        ref = model(x)
        quantize_model(model, QuantConfig())
        assert [model[i].kernel.name for i in (0, 2)] == [PER_TOKEN_HERE] * 2
        y = model(x)
        assert y.dtype == torch.float16 and sqnr_db(ref.float(), y.float()) > 30
        assert torch.equal(torch.cat([model(x[i:i + 1]) for i in range(7)]), y)
        if PER_TOKEN_HERE in ("pertoken", "onednn"):
            many = (torch.randn(40, 512, generator=g) * 2).half()  # onednn: its three calls above 16 rows
            for rows in (x, many):
                h = model[0](rows)
                assert torch.equal(h, model[0](rows.float()).half())
            assert torch.equal(model(many)[:7], model(many[:7]))


@pytest.mark.parametrize("act", ["tensor", "token", "static"])
def test_fbgemm_runs_half_precision_rows_as_their_float32_copies(act):
    """fbgemm's ops take float32: a bfloat16 or float16 row runs as its float32 copy and the
    result is rounded once to the row's dtype, bit for bit (packed directly: this CPU's refusal
    of full-range codes does not matter to the identity)."""
    if _fbgemm_unusable(torch.device("cpu"), torch.float32) is not None:
        pytest.skip("fbgemm does not run here")
    q, s, z, b = _layer(out_f=40, in_f=64, seed=5)
    scheme = LayerScheme(mode="static" if act == "static" else "dynamic",
                         act_granularity="tensor" if act == "static" else act)
    tensors = LayerTensors(q, s, z, b, (torch.tensor(0.02), torch.tensor(-3)) if act == "static" else None)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(6))
    ref = F.linear(x, dequantize(q, s, z), b)
    for dtype in (torch.bfloat16, torch.float16):
        run = pack(KernelChoice("fbgemm", "test", act != "tensor", False), tensors, scheme, device="cpu", dtype=dtype)
        xh = x.to(dtype)
        y = run(xh)
        assert y.dtype == dtype and torch.equal(y, run(xh.float()).to(dtype)), dtype
        assert sqnr_db(ref, y.float()) > 20, dtype  # 7-bit codes without VNNI; a scale this static layer fits
        if act != "tensor":  # fixed activation parameters: a row's result is its own
            assert torch.equal(torch.cat([run(xh[i:i + 1]) for i in range(6)]), y), dtype


def test_fbgemm_falls_back_with_a_reason_where_it_cannot_run():
    c = _select(request="fbgemm", act_granularity="tensor", device="cuda")
    assert c.name == "int_mm" and c.fallback and "CPU only" in c.reason
    c = _select(request="fbgemm", act_granularity="tensor", dtype=torch.float64)
    assert c.name == "int_mm" and "float32, bfloat16 or float16" in c.reason
    for dtype in (torch.bfloat16, torch.float16):  # converted to float32 and back, not int_mm's plain loop
        c = _select(act_granularity="tensor", dtype=dtype)
        assert c.name == "fbgemm" and not c.fallback, dtype
    c = _select(act_granularity="tensor", device="cuda")  # auto: no fbgemm on CUDA, int_mm
    assert c.name == "int_mm" and not c.fallback


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_weight_only_on_a_device_that_cannot_run_it_falls_back_to_dequant():
    c = _select(mode="weight-only", act_granularity=None, device="cuda")
    assert c.name == "dequant" and c.fallback and "_weight_int8pack_mm cannot run" in c.reason
    assert not c.batch_invariant


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_cpu():
    q, s, z, b = _layer()
    x = torch.randn(40, q.shape[1])
    for name, act in [("int_mm", "token"), ("weight_only", None)]:
        cpu = _pack(name, act, q, s, z, b)(x)
        gpu = _pack(name, act, q, s, z, b, device="cuda")(x.cuda()).cpu()
        assert sqnr_db(cpu, gpu) > 60


def test_no_warnings_reach_the_user():
    """Quantized-tensor creation is deprecated in torch; the kernel module keeps its warnings."""
    import warnings

    q, s, z, b = _layer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, act in KERNELS:
            _pack(name, act, q, s, z, b)(torch.randn(3, q.shape[1]))
    assert [str(w.message) for w in caught] == []


# the fused oneDNN kernel (kernels/onednn.py, native.py) ----------------------------------------

needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f"onednn: {_onednn_missing(torch.device('cpu'), torch.float32)}")


@needs_onednn
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
def test_onednn_equals_the_torch_op_path_to_float_rounding(sym, smooth):
    """The fused kernel computes the fbgemm per-token path's codes bit for bit; only the order of
    the float epilogue differs: output SQNR between them > 100 dB."""
    q, s, z, b = _layer(out_f=300, in_f=200, sym=sym)
    g = torch.Generator().manual_seed(9)
    sm = torch.rand(200, generator=g) + 0.5 if smooth else None
    x = torch.randn(77, 200, generator=g) * torch.rand(77, 1, generator=g) * 5
    fused = _pack("onednn", "token", q, s, z, b, smooth=sm)(x)
    torch_ops = _pack("fbgemm", "token", q, s, z, b, smooth=sm)(x)
    assert fused.shape == torch_ops.shape == (77, 300)
    assert sqnr_db(torch_ops, fused) > 100


@needs_onednn
def test_onednn_codes_are_the_fbgemm_path_codes():
    """quantize_rows against the torch-op formula of the fbgemm path, code for code, on rows with
    ties, constants, zeros and tiny ranges."""
    from qlin_cli.kernels import native

    kernels = native.load()
    g = torch.Generator().manual_seed(10)
    x = torch.randn(40, 83, generator=g)
    x[1] = 0.0
    x[2] = 3.5
    x[3] = torch.arange(83) / 82 * 255  # exact ties
    x[4] *= 1e-30
    sm = torch.rand(83, generator=g) + 0.5
    for smooth in (None, sm):
        xs = x if smooth is None else x / smooth
        codes, a, c, rowsum = kernels.quantize_rows(x, torch.empty(0) if smooth is None else smooth)
        lo = xs.amin(1, keepdim=True)
        width = (xs.amax(1, keepdim=True) - lo).clamp_min(2.0**-40)
        inv_s = torch.tensor(1.0) / torch.tensor(1.0 / 255, dtype=torch.float32)
        expect = ((xs - lo) * width.reciprocal() * inv_s).round().clamp(0, 255).to(torch.uint8)
        assert torch.equal(codes, expect)
        assert torch.equal(a, (width / 255).reshape(-1)) and torch.equal(c, lo.reshape(-1))
        assert torch.equal(rowsum, codes.sum(1).float())


@needs_onednn
def test_every_layer_quantizes_its_own_input(monkeypatch):
    """Q, K and V read one tensor, each quantizes it (no codes are shared or kept between calls),
    so two models reading one buffer refilled through numpy (same address, shape, strides and
    version) each compute on what the buffer holds now."""
    from qlin_cli.kernels import native

    kernels = native.load()
    calls = []

    class Counting:
        def quantize_rows(self, x, smooth):
            calls.append(x.data_ptr())
            return kernels.quantize_rows(x, smooth)

        epilogue_ = staticmethod(kernels.epilogue_)
        pertoken_linear, pertoken_max_rows = staticmethod(kernels.pertoken_linear), kernels.pertoken_max_rows

    monkeypatch.setattr(native, "load", lambda: Counting())
    model_a = [_pack("onednn", "token", *_layer(out_f=64, in_f=48, seed=i)) for i in range(3)]
    model_b = [_pack("onednn", "token", *_layer(out_f=64, in_f=48, seed=10 + i)) for i in range(3)]
    rows = kernels.pertoken_max_rows + 1  # the three-call path (fewer rows are one call)
    buf = torch.randn(rows, 48)
    [run(buf) for run in model_a]
    assert len(calls) == 3
    buf.numpy()[:] *= 3  # refilled behind torch's back: its version does not move
    after = [run(buf) for run in model_b]
    assert len(calls) == 6
    assert all(torch.equal(y, run(buf.clone())) for y, run in zip(after, model_b))  # what a fresh tensor gives


@needs_onednn
def test_a_packed_onednn_layer_deep_copies():
    import copy

    run = _pack("onednn", "token", *_layer())
    x = torch.randn(5, 80)
    assert torch.equal(copy.deepcopy(run)(x), run(x))


def test_onednn_request_falls_back_with_a_reason():
    c = _select(request="onednn", act_granularity="tensor")
    assert c.name == "fbgemm" and c.fallback and "per-token layers only" in c.reason
    c = _select(request="onednn", mode="static", act_granularity="tensor")
    assert c.name == STATIC_HERE and c.fallback
    c = _select(request="onednn", device="cuda")
    assert c.name == "int_mm" and c.fallback and "CPU only" in c.reason
    c = _select(request="onednn", dtype=torch.float64)
    assert c.fallback and "float32, bfloat16 or float16" in c.reason


def test_without_the_fused_kernels_auto_runs_the_torch_op_path_and_says_why(monkeypatch):
    from qlin_cli.kernels import native

    monkeypatch.setattr(native, "_load", lambda: (None, "no C++ compiler (c++) on PATH"))
    c = _select()
    assert c.name == ("fbgemm" if FBGEMM_TOKEN else "int_mm") and not c.fallback
    if FBGEMM_TOKEN:
        assert c.reason.endswith("(not fused: no C++ compiler (c++) on PATH)")
    c = _select(request="onednn")
    assert c.name != "pertoken" and c.fallback  # the one-call kernel needs the compiled module too
    assert c.reason == "fallback: " + _onednn_missing(torch.device("cpu"), torch.float32)
    assert "no C++ compiler" in c.reason or "VNNI" in c.reason  # the first thing missing here
    assert native.load() is None


@pytest.mark.parametrize("vnni, isa, expect", [
    (True, "avx512_vnni", "onednn"),   # oneDNN's u8 GEMM is exact with VNNI
    (False, "avx2", "pertoken"),       # without it: qlin's own exact AVX2 GEMM
    (False, "scalar", "pertoken"),     # no SIMD loops built: its scalar ones, 8-15x torch's _int_mm loop
    (True, "scalar", "onednn"),        # VNNI: oneDNN's GEMM above 16 rows whatever qlin's build
])
def test_per_token_kernel_follows_the_cpus_flags(monkeypatch, vnni, isa, expect):
    """Both branches of the CPU-dependent choice, whatever this CPU is: per-token layers run
    `onednn` where the CPU has VNNI, `pertoken` on CPUs without it, even where its build has no
    SIMD loops (fbgemm's per-token codes saturate without VNNI too, and int_mm, the other choice,
    is torch's plain CPU loop: RESULTS.md "scalar-build")."""
    from qlin_cli.kernels import common, fbgemm, onednn

    if not ONEDNN and vnni and not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        pytest.skip("this torch build has no oneDNN quantized linear")
    monkeypatch.setattr(native, "_load", lambda: (_FakeNative(isa), None))
    for room in (common, onednn, fbgemm, pertoken):
        if hasattr(room, "reduce_range"):
            monkeypatch.setattr(room, "reduce_range", lambda: not vnni)
    c = _select()
    assert (c.name, c.batch_invariant, c.fallback) == (expect, True, False)
    if expect == "pertoken":
        assert c.reason == (f"auto: per-token int8 activations, qlin's {isa} GEMM "
                            "(onednn: full-range uint8 activations can saturate without VNNI)")
    assert _select(dtype=torch.bfloat16).name == expect  # bf16 activations: the same kernels
    assert _select(act_granularity="tensor").name == "fbgemm"  # per tensor: not these kernels


class _FakeNative:
    """Stands in for the compiled module where only its build facts are read."""

    def __init__(self, isa):
        self.pertoken_isa, self.pertoken_max_rows = isa, 16



@pytest.mark.parametrize("shape", [(0, 64), (7, 1), (1000, 3000), (3, 1 << 21)])
def test_weight_int_sums_are_exact_across_blocks(shape):
    """`weight_int_sums` sums blocks of rows into one output (several blocks for (1000, 3000), a
    row a block past 1M columns): exact int32, equal to torch's int64 sum, -128 included."""
    from qlin_cli.kernels.common import weight_int_sums

    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    if w.numel():
        w[0] = -128
    got = weight_int_sums(w)
    assert got.dtype == torch.int32 and tuple(got.shape) == (shape[0],)
    assert torch.equal(got.long(), w.long().sum(dim=1))
