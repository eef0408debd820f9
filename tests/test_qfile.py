"""The qlin file: layout, bit-identical round trips, byte-identical writes, validation."""

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import fbgemm_fallback, load_digits_mlp, load_encoder, tamper
from qlin_cli import QuantConfig, load_quantized, quantize_model, read_qfile, save_quantized
from qlin_cli.errors import FormatError, OutputError
from qlin_cli.files import write_atomic
from qlin_cli.qfile import FORMAT_VERSION

# the encoder's layers are under the size `auto` quantizes (all but fc1/fc2 kept float for speed):
# most configs name the kernel
CONFIGS = [
    QuantConfig(),
    QuantConfig(granularity="tensor", symmetric=False, kernel="fbgemm"),
    QuantConfig(kernel="fbgemm"),
    QuantConfig(mode="weight-only", symmetric=False),
    QuantConfig(skip=("fc1",), kernel="int_mm"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.to_json())
def test_round_trip_is_bit_identical(config, tmp_path, digits_test, device):
    inputs, _ = digits_test
    model = load_encoder()
    result = quantize_model(model, config, device=device)
    path = save_quantized(result, tmp_path / "enc.safetensors", source_name="enc", source_sha256="ab")
    loaded = load_quantized(load_encoder(), path, device=device)
    x = inputs[:50].to(device)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    for a, b in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_layout_matches_the_design(tmp_path):
    result = quantize_model(load_encoder(), QuantConfig(skip=("head",), kernel="fbgemm"))
    path = save_quantized(result, tmp_path / "e.safetensors", source_name="encoder.safetensors", source_sha256="00")
    tensors = load_file(path)
    assert tensors["blocks.0.fc1.weight"].dtype == torch.int8 and tensors["blocks.0.fc1.weight"].shape == (512, 128)
    assert tensors["blocks.0.fc1.weight_scale"].dtype == torch.float32
    assert tensors["blocks.0.fc1.weight_scale"].shape == (512,)
    assert tensors["blocks.0.fc1.weight_zero_point"].dtype == torch.int8
    assert tensors["blocks.0.fc1.bias"].dtype == torch.float32
    assert tensors["head.weight"].dtype == torch.float32 and "head.weight_scale" not in tensors  # skipped
    assert tensors["pos_embed"].shape == (8, 128) and tensors["norm.weight"].dtype == torch.float32
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "qlin" and meta["format_version"] == "2"  # 3 only with int8 embeddings
    assert FORMAT_VERSION == 3
    assert meta["source_name"] == "encoder.safetensors" and meta["torch_version"] == torch.__version__
    assert {"qlin_version", "source_sha256", "config", "plan"} <= set(meta)
    plan = {e["name"]: e for e in json.loads(meta["plan"])}
    assert plan["head"]["status"] == "skipped" and "head" in plan["head"]["reason"]
    assert plan["embed"]["granularity"] == "channel" and plan["embed"]["kernel_request"] == "fbgemm"
    assert json.loads(meta["config"])["skip"] == ["head"]


def test_per_tensor_scales_are_scalars(tmp_path):
    result = quantize_model(load_digits_mlp(), QuantConfig(granularity="tensor", kernel="fbgemm"))
    tensors = load_file(save_quantized(result, tmp_path / "m.safetensors"))
    assert tensors["0.weight_scale"].shape == () and tensors["0.weight_zero_point"].shape == ()


def test_same_input_gives_byte_identical_files(tmp_path):
    digests = set()
    for i in range(2):
        result = quantize_model(load_encoder(), QuantConfig(kernel="fbgemm"))
        path = save_quantized(result, tmp_path / f"{i}.safetensors", source_name="e", source_sha256="x")
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_no_overwrite_without_force_and_no_temp_files(tmp_path):
    target = tmp_path / "out.bin"
    write_atomic(target, b"first", force=False)
    with pytest.raises(OutputError, match="`force`"):
        write_atomic(target, b"second", force=False)
    assert target.read_bytes() == b"first"
    write_atomic(target, b"second", force=True)
    assert target.read_bytes() == b"second"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]
    with pytest.raises(OutputError, match="exists"):
        save_quantized(quantize_model(load_digits_mlp()), target)


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "good.safetensors"
    return save_quantized(quantize_model(load_digits_mlp(), QuantConfig(kernel="fbgemm")), path)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(tensors={"0.weight_scale": torch.ones(256, dtype=torch.float64)}), r"0.weight_scale is torch.float64"),
        (dict(tensors={"0.weight_scale": torch.ones(())}), r"0.weight_scale is torch.float32 \(\), the plan says"),
        (dict(tensors={"2.weight": torch.zeros(256, 256)}), r"2.weight is torch.float32"),
        (dict(drop=("4.weight_zero_point",)), r"layer '4' has no tensor 4.weight_zero_point"),
        (dict(drop=("0.bias",)), r"layer '0': bias missing"),
        (dict(tensors={"9.weight_scale": torch.ones(3)}), r"9.weight_scale belongs to no quantized layer"),
        (dict(tensors={"0.weight_scale": torch.zeros(256)}), r"not finite and positive"),
        (dict(meta={"format_version": "4"}), r"format version 4; this qlin reads up to 3: upgrade"),
        (dict(meta={"format": "other"}), r"not a qlin file"),
        (dict(meta={"plan": "[{"}), r"metadata config/plan is invalid"),
        (dict(meta={"config": '{"mode": "int4"}'}), r"metadata config/plan is invalid"),
        (dict(meta={"plan": '[{"name": 3}]'}), r"plan entry 3 has no valid 'name'"),
    ],
)
def test_tampered_files_are_rejected_with_a_clear_message(good_file, tmp_path, change, message):
    bad = tamper(good_file, tmp_path / "bad.safetensors", **change)
    with pytest.raises(FormatError, match=message):
        read_qfile(bad)


def test_truncated_and_garbage_files(good_file, tmp_path):
    data = good_file.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="not a valid safetensors file"):
            read_qfile(p)


def test_loading_into_the_wrong_skeleton_fails_clearly(good_file):
    with pytest.raises(FormatError, match=r"no nn.Linear '0' of shape \(256, 64\)"):
        load_quantized(torch.nn.Sequential(torch.nn.Linear(3, 3)), good_file)


@pytest.mark.parametrize("how", ["torch.device('meta')", "empty_weights()"])
def test_load_into_a_meta_skeleton(good_file, digits_test, how):
    """A skeleton whose parameters are on the meta device (no 'Cannot copy out of meta
    tensor') loads into the same int8 model as a full one."""
    from qlin_cli import empty_weights
    from sample_models.digits import build_digits_mlp

    with torch.device("meta") if how.startswith("torch") else empty_weights():
        skeleton = build_digits_mlp()
    assert all(p.is_meta for p in skeleton.parameters())
    model = load_quantized(skeleton, good_file)
    x = digits_test[0][:32]
    with torch.no_grad():
        assert torch.equal(model(x), load_quantized(load_digits_mlp(), good_file)(x))
    with torch.device("meta"):
        wrong = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                    torch.nn.ReLU(), torch.nn.Linear(256, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10))
    with pytest.raises(FormatError, match=r"does not fit the model: 2 missing and 0 unexpected tensors \(e.g. '6.bias'\)"):
        load_quantized(wrong, good_file)


def test_empty_weights_restores_parameter_registration():
    from qlin_cli import empty_weights

    with pytest.raises(RuntimeError):
        with empty_weights():
            raise RuntimeError("while building")
    assert not torch.nn.Linear(2, 2).weight.is_meta


def test_payload_sha256_is_recorded_and_verified(good_file, tmp_path):
    qf = read_qfile(good_file, verify=True)
    data = good_file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert qf.metadata["payload_sha256"] == hashlib.sha256(data[8 + n :]).hexdigest()
    flipped = bytearray(data)
    idx = data.index(bytes(qf.tensors["2.weight"][0, :8].view(torch.uint8).tolist()), 8 + n)
    flipped[idx] ^= 0x01  # one bit of an int8 weight: shapes and dtypes still fine
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(flipped))
    assert not torch.equal(read_qfile(bad).tensors["2.weight"], qf.tensors["2.weight"])  # loads unverified
    with pytest.raises(FormatError, match="payload sha256 .* does not match"):
        read_qfile(bad, verify=True)
    with pytest.raises(FormatError, match="does not match"):
        load_quantized(load_digits_mlp(), bad, verify=True)


def test_safetensors_writer_streams_a_file_safetensors_reads_back(tmp_path):
    """qlin writes safetensors itself (streaming, no in-memory copy of the file): every dtype a
    model holds reads back bit for bit with the safetensors library, tensors start aligned to
    their element size, and the bytes do not depend on the dict's order."""
    from qlin_cli.files import safetensors_writer

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randint(-128, 128, (7, 5), generator=gen, dtype=torch.int8),
        "a.scale": torch.rand(7, generator=gen),
        "b.half": torch.randn(3, 3, generator=gen).half(),
        "b.bf16": torch.randn(5, generator=gen).bfloat16(),
        "c.double": torch.randn(2, generator=gen).double(),
        "c.long": torch.arange(3),
        "d.scalar": torch.tensor(0.25),
        "d.empty": torch.zeros(0, 4),
        "d.mask": torch.tensor([True, False, True]),
        "d.u8": torch.arange(5, dtype=torch.uint8),
    }
    paths = []
    for i, items in enumerate([list(tensors.items()), list(reversed(tensors.items()))]):
        paths.append(write_atomic(tmp_path / f"{i}.safetensors", safetensors_writer(dict(items), {"k": "v"}), force=False))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    back = load_file(paths[0])
    assert set(back) == set(tensors)
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape and torch.equal(back[key], t), key
    raw = paths[0].read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0 and header.pop("__metadata__") == {"k": "v"}
    for key, entry in header.items():
        assert entry["data_offsets"][0] % tensors[key].element_size() == 0, key
    with pytest.raises(OutputError, match="complex64.*cannot store"):
        safetensors_writer({"z": torch.zeros(2, dtype=torch.complex64)}, {})


@pytest.mark.parametrize("pooled_kernel", [None, "default"])
def test_only_layers_whose_kernel_packs_on_one_core_pack_on_the_pool(monkeypatch, pooled_kernel):
    """pack_all packs on its thread pool only layers whose kernel packs on one core
    (`packs_on_one_core`: fbgemm's prepack gains from the pool), every other on the calling thread
    (torch ops that use every core already; on pool threads an int8 Llama's load took longer and
    peaked 1.24-1.35x its file, glibc kept grouped layers' packing memory in their arenas).
    Both branches, whichever kernels this machine runs: the default config's kernel is marked."""
    import threading

    from qlin_cli.kernels import registry
    from qlin_cli.qlinear import QuantizedLinear, pack_all

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(512, 512) for _ in range(4))).eval()
    layers = []
    for config in (QuantConfig(), QuantConfig(bits=4, group_size=32), QuantConfig(mode="dynamic", bits=4, group_size=32)):
        layers += [m for m in quantize_model(copy.deepcopy(model), config).model.modules() if isinstance(m, QuantizedLinear)]
    default = layers[0].kernel.name
    assert {q.kernel.name for q in layers[4:]}.isdisjoint({default})
    if pooled_kernel:
        monkeypatch.setattr(type(registry.get(default)), "packs_on_one_core", True)
    where = {}
    pack = QuantizedLinear.pack
    monkeypatch.setattr(QuantizedLinear, "pack", lambda q, device="cpu": (where.__setitem__(id(q), threading.current_thread()), pack(q, device))[1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pack_all(layers)
    finally:
        torch.set_num_threads(threads)
    main = threading.current_thread()
    assert len(layers) == 12 and len(where) == 12
    on_pool = registry.get(default).packs_on_one_core  # (fbgemm's, where it is this machine's default)
    assert on_pool == bool(pooled_kernel) or default == "fbgemm"
    assert [where[id(q)] is main for q in layers] == [not on_pool] * 4 + [True] * 8
    assert {q.kernel.name for q in layers[:4]} == {default}


def test_load_packs_on_threads_with_the_same_results(tmp_path, digits_test):
    """load_quantized packs layers on a thread pool: outputs bit-identical to packing one after
    the other, and the process's warning filters are left as they were."""
    import warnings

    from qlin_cli.kernels.common import reduce_range
    from qlin_cli.qlinear import QuantizedLinear, pack_all

    inputs, _ = digits_test
    result = quantize_model(load_encoder(), QuantConfig(kernel="fbgemm"))
    path = save_quantized(result, tmp_path / "e.safetensors")
    filters = list(warnings.filters)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pooled = load_quantized(load_encoder(), path)
    finally:
        torch.set_num_threads(threads)
    assert warnings.filters == filters
    single = load_quantized(load_encoder(), path)
    layers = [m for m in single.modules() if isinstance(m, QuantizedLinear)]
    fbgemm = fbgemm_fallback() if reduce_range() else "fbgemm"  # without VNNI fbgemm's per-token path falls back
    assert len(layers) > 2 and all(q.kernel.name == fbgemm for q in layers)
    pack_all(layers)  # one worker per torch thread; with 1 thread the plain loop
    with torch.inference_mode():
        assert torch.equal(pooled(inputs[:64]), single(inputs[:64]))


def test_a_file_from_an_earlier_qlin_runs_the_int8_kernel_its_plan_names(digits_test):
    """An earlier qlin marked `auto` layers under 2**17 weights quantized and ran
    them in float on a CPU that loaded the file (51.95 dB with auto against 44.98 dB with
    --kernel fbgemm on the sample MLP). Such a file still loads; now every machine runs what its
    plan says, int8 activations, which is what a file made with the int8 kernel named computes,
    and `inspect` reports that kernel."""
    from qlin_cli.api import inspect_path
    from qlin_cli.primitives import sqnr_db
    from qlin_cli.qlinear import QuantizedLinear

    old = Path(__file__).parent / "data" / "digits_mlp.v1.dynamic.safetensors"
    loaded = load_quantized(load_digits_mlp(), old)
    kernels = {m.kernel.name for m in loaded.modules() if isinstance(m, QuantizedLinear)}
    assert len(kernels) == 1 and kernels <= {"onednn", "pertoken", "fbgemm", "int_mm"}
    assert {row.kernel for row in inspect_path(old).layers} == kernels
    from qlin_cli.primitives import dequantize

    named = quantize_model(load_digits_mlp(), QuantConfig(kernel="fbgemm")).model
    float_matmul = load_digits_mlp()  # what the earlier qlin ran: the dequantized weights in float
    for i in (0, 2, 4):
        q = loaded[i]
        float_matmul[i].weight.data = dequantize(q.weight, q.weight_scale, q.weight_zero_point)
    x = digits_test[0]
    with torch.no_grad():
        got = loaded(x)
        assert sqnr_db(named(x), got) > 90  # the same int8 codes: equal to float rounding
        assert sqnr_db(float_matmul(x), got) < 60  # activations quantized: not the float matmul


def test_load_frees_the_file_tensors_the_kernels_absorbed_before_returning_memory(tmp_path, monkeypatch):
    """When load_quantized hands freed memory back (malloc_trim), no file-shaped int8 weight of a
    weight-only layer (its kernel's panels are the one copy) is still alive: a reference kept past
    the trim left an 8-layer Llama's weight-only model at 1.5x its weights' resident size."""
    import gc

    from qlin_cli import qfile

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 48)).eval()
    path = save_quantized(quantize_model(model, QuantConfig(mode="weight-only")), tmp_path / "m.safetensors")
    alive = []

    def count_weights():
        gc.collect()
        alive.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dtype == torch.int8
                         and tuple(o.shape) in {(96, 64), (48, 96)}))

    monkeypatch.setattr(qfile, "_release_freed_memory", count_weights)
    skeleton = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 48)).eval()
    loaded = load_quantized(skeleton, path)
    assert [m._run.panels.codes.shape for m in loaded.modules() if hasattr(m, "_run")] == [(6, 64, 16), (3, 96, 16)]
    assert alive == [0]


def _norm_mlp(dtype=torch.float32):
    return torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 96), torch.nn.ReLU(),
                               torch.nn.Linear(96, 48)).to(dtype).eval()


def test_load_takes_the_file_s_tensors_without_a_second_copy(tmp_path):
    """load_quantized assigns the file's tensors to the model (load_state_dict(assign=True)) instead
    of copying them into memory allocated for the skeleton: an 8-layer Llama's load peaked at 3.3x
    its int8 file (2,280 MB for 681 MB) with the copy, 1.3x without."""
    torch.manual_seed(0)
    path = save_quantized(quantize_model(_norm_mlp(), QuantConfig(mode="weight-only")), tmp_path / "m.safetensors")
    qf = read_qfile(path)
    held = {k: qf.tensors[k].data_ptr() for k in ("0.weight", "0.bias", "1.bias", "3.bias")}
    from qlin_cli import empty_weights

    with empty_weights():
        skeleton = _norm_mlp()
    loaded = load_quantized(skeleton, qf)
    state = loaded.state_dict()
    assert {k: state[k].data_ptr() for k in held} == held
    assert not any(t.is_meta for t in state.values())
    x = torch.randn(5, 64)
    other = tmp_path / "other.safetensors"  # (`qf`, read_qfile's default, maps `path`)
    other.write_bytes(path.read_bytes())
    from_path = load_quantized(_norm_mlp(), other)  # a real skeleton: the same
    with torch.no_grad():
        assert torch.equal(loaded(x), from_path(x))
    # read, not mapped: a map of the file that the model's tensors kept alive kept every page that
    # loading read resident (2x an int8 weight-only model's panels)
    if Path("/proc/self/maps").exists():
        assert str(other.resolve()) not in Path("/proc/self/maps").read_text()
        assert str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_load_converts_to_the_skeleton_s_dtype_as_a_copy_did(tmp_path):
    """Assigning keeps what copying into the skeleton did: a bfloat16 skeleton gets bfloat16
    float tensors from a float32 file (and runs in bfloat16)."""
    torch.manual_seed(0)
    path = save_quantized(quantize_model(_norm_mlp(), QuantConfig(mode="weight-only")), tmp_path / "m.safetensors")
    loaded = load_quantized(_norm_mlp(torch.bfloat16), path)
    assert {k: v.dtype for k, v in loaded.state_dict().items() if v.is_floating_point()} == {
        "0.weight": torch.bfloat16, "0.bias": torch.bfloat16, "1.weight_scale": torch.float32, "1.bias": torch.bfloat16,
        "3.weight_scale": torch.float32, "3.bias": torch.bfloat16}
    with torch.no_grad():
        assert loaded(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_load_frees_each_layer_s_unpacked_codes_once_its_kernel_packed_them(tmp_path, monkeypatch):
    """A 4-bit file's codes are unpacked to one int8 a weight; load_quantized unpacks a layer's
    just before its kernel packs them, so no other layer's are alive then (the whole file was
    unpacked first, and the state dict, the QFile and the model's targets kept every layer's codes
    until the load returned: 2.2x a 4-bit file's size at the peak)."""
    import gc

    from qlin_cli.qlinear import QuantizedLinear

    torch.manual_seed(0)
    path = save_quantized(quantize_model(_norm_mlp(), QuantConfig(bits=4, group_size=16, mode="weight-only")),
                          tmp_path / "m.safetensors")
    packed_shapes: list[tuple[int, int]] = []
    alive_before: list[int] = []
    pack = QuantizedLinear.pack

    def counting_pack(self, device="cpu"):
        gc.collect()
        alive_before.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)
                                and o.dtype == torch.int8 and not o.is_meta and tuple(o.shape) in {(96, 64), (48, 96)}))
        out = pack(self, device)
        packed_shapes.append((self.out_features, self.in_features))
        return out

    monkeypatch.setattr(QuantizedLinear, "pack", counting_pack)
    loaded = load_quantized(_norm_mlp(), path)
    assert packed_shapes == [(96, 64), (48, 96)] and alive_before == [1, 1]  # the layer's own, no other
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), load_quantized(_norm_mlp(), read_qfile(path))(x))  # unpacked up front: the same


def test_load_swaps_in_layers_that_hold_no_memory_before_the_file_s_tensors(tmp_path, monkeypatch):
    """The quantized layers and int8 tables load_quantized swaps into the skeleton are built on
    the meta device: their buffers are replaced by the file's tensors, and zero-filled ones were
    a whole int8 model's worth of memory at the load's peak (an 8-layer Llama's 4-bit load:
    1,180 -> 775 MB over its imports)."""
    from qlin_cli import qfile
    from qlin_cli.qembedding import QuantizedEmbedding
    from qlin_cli.qlinear import QuantizedLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(300, 64), torch.nn.Linear(64, 96), torch.nn.ReLU(),
                                torch.nn.Linear(96, 48)).eval()
    config = QuantConfig(mode="weight-only", embeddings=True)
    result = quantize_model(model, config)
    assert isinstance(result.model[0], QuantizedEmbedding)
    path = save_quantized(result, tmp_path / "m.safetensors")
    swapped_in: list[tuple[str, bool]] = []
    swap = qfile.swap_module

    def recording_swap(root, name, module):
        swapped_in.append((type(module).__name__, all(t.is_meta for t in module.buffers())))
        return swap(root, name, module)

    monkeypatch.setattr(qfile, "swap_module", recording_swap)
    skeleton = torch.nn.Sequential(torch.nn.Embedding(300, 64), torch.nn.Linear(64, 96), torch.nn.ReLU(),
                                   torch.nn.Linear(96, 48)).eval()
    loaded = load_quantized(skeleton, path)
    assert swapped_in == [("QuantizedLinear", True), ("QuantizedLinear", True), ("QuantizedEmbedding", True)]
    assert not any(t.is_meta for t in loaded.state_dict().values())
    ids = torch.tensor([[1, 7, 299]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), result.model(ids))


def test_read_qfile_can_keep_narrow_weights_as_the_file_packs_them(tmp_path):
    """`unpack=False` leaves a 4-bit layer's weight as the file's uint8 bytes (validated all the
    same); by default it is the canonical int8 values."""
    from qlin_cli.kernels.lowbit import unpack_bits

    torch.manual_seed(0)
    path = save_quantized(quantize_model(_norm_mlp(), QuantConfig(bits=4, group_size=16, mode="weight-only")),
                          tmp_path / "m.safetensors")
    unpacked, packed = read_qfile(path), read_qfile(path, unpack=False)
    assert (packed.tensors["1.weight"].dtype, tuple(packed.tensors["1.weight"].shape)) == (torch.uint8, (96, 32))
    assert (unpacked.tensors["1.weight"].dtype, tuple(unpacked.tensors["1.weight"].shape)) == (torch.int8, (96, 64))
    assert torch.equal(unpack_bits(packed.tensors["1.weight"], 4, 64), unpacked.tensors["1.weight"])
    assert {k for k, v in packed.tensors.items() if not torch.equal(v, unpacked.tensors[k])} == {"1.weight", "3.weight"}


def test_a_shared_4_bit_layer_loads_once_under_both_names(tmp_path):
    """A layer used at two places of the model (one module) keeps its 4-bit codes packed in the
    file under its first name; the load unpacks them once, for the one module both names hold."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(64, 64)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared, torch.nn.Linear(64, 32)).eval()
    result = quantize_model(model, QuantConfig(bits=4, group_size=16, mode="weight-only"))
    path = save_quantized(result, tmp_path / "m.safetensors")
    skeleton_shared = torch.nn.Linear(64, 64)
    skeleton = torch.nn.Sequential(skeleton_shared, torch.nn.ReLU(), skeleton_shared, torch.nn.Linear(64, 32)).eval()
    loaded = load_quantized(skeleton, path)
    assert loaded[0] is loaded[2] and loaded[0]._run is not None
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_a_tie_only_the_skeleton_has_survives_the_load(tmp_path):
    """Assigning gives every key the file's own tensor; a parameter the skeleton shares between
    two modules (the file holds two, no tie recorded) is one parameter again after the load, as
    copying into it kept it."""
    def build():
        return torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)).eval()

    torch.manual_seed(0)
    path = save_quantized(quantize_model(build(), QuantConfig(mode="weight-only")), tmp_path / "m.safetensors")
    assert "ties" not in read_qfile(path).metadata or json.loads(read_qfile(path).metadata["ties"]) == {}
    skeleton = build()
    skeleton[2].weight = skeleton[0].weight  # tied in the skeleton only
    loaded = load_quantized(skeleton, path)
    assert loaded[2].weight is loaded[0].weight


def test_a_qfile_without_an_8_bit_layer_s_weight_is_refused_in_one_line(tmp_path):
    """A QFile (built or edited by a caller) that lacks a quantized layer's weight is refused as a
    misfit, not loaded with the weight left on the meta device."""
    torch.manual_seed(0)
    path = save_quantized(quantize_model(_norm_mlp(), QuantConfig(mode="weight-only")), tmp_path / "m.safetensors")
    qf = read_qfile(path)
    del qf.tensors["1.weight"]
    with pytest.raises(FormatError, match=r"does not fit the model: 1 missing .*'1.weight'"):
        load_quantized(_norm_mlp(), qf)


def test_read_metadata_reads_the_header_alone(tmp_path, monkeypatch):
    """`read_metadata` gives read_qfile's metadata without reading a tensor (eval takes the source's
    sha256 from it after loading), and refuses what read_qfile refuses."""
    from qlin_cli import qfile

    torch.manual_seed(0)
    path = save_quantized(quantize_model(_norm_mlp(), QuantConfig(mode="weight-only")), tmp_path / "m.safetensors")
    expect = read_qfile(path).metadata
    monkeypatch.setattr(qfile, "_read_tensors", lambda *a: pytest.fail("read a tensor"))
    monkeypatch.setattr(qfile, "_mapped_tensors", lambda *a: pytest.fail("read a tensor"))
    assert qfile.read_metadata(path) == expect and "source_sha256" in expect
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(FormatError, match="not a qlin file"):
        qfile.read_metadata(plain)
