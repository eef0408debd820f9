"""qlin's fused C++ kernels (native.py, native_kernels.cpp): where the module is cached and what
its name depends on, why qlin runs without it (turned off, no compiler, a failed build) and that
it says so once, `quantize_rows` / `epilogue_` against their torch formulas, and the kernels'
test files passed by the build for the instruction set this CPU lacks. (`lowbit_linear` has its
own tests in test_lowbit.py.)"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch

import other_build
from conftest import qlin_env
from qlin_cli.kernels import native

KERNELS = native.load()
needs_native = pytest.mark.skipif(KERNELS is None, reason=f"qlin's fused kernels are not built here: "
                                                           f"{native.unavailable_reason()}")
MIN_SCALE = 2.0**-40  # primitives.MIN_SCALE: the width of a constant row


# ----------------------------------------------------------------------------- the build's cache


def test_the_cache_folder_is_qlin_cache_dir_else_xdg_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("QLIN_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert native._cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("QLIN_CACHE_DIR", "")  # set but empty: not a folder
    assert native._cache_dir() == tmp_path / "xdg" / "qlin"
    monkeypatch.delenv("QLIN_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert native._cache_dir() == tmp_path / "home" / ".cache" / "qlin"


def test_the_module_name_changes_with_source_flags_compiler_torch_python_and_cpu(monkeypatch, tmp_path):
    """A module built for one source, compiler, torch, Python or CPU is never loaded by another:
    each is part of the hashed name, and the same inputs give the same name."""
    monkeypatch.setenv("QLIN_CACHE_DIR", str(tmp_path))
    path = native._module_path("// source", "c++")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert path.parent == tmp_path
    assert re.fullmatch(r"qlin_native_[0-9a-f]{16}" + re.escape(suffix), path.name), path.name
    assert native._module_path("// source", "c++") == path
    names = {path, native._module_path("// source 2", "c++"), native._module_path("// source", "clang++")}
    monkeypatch.setattr(native, "CFLAGS", (*native.CFLAGS, "-g"))
    names.add(native._module_path("// source", "c++"))
    monkeypatch.setattr(native.torch, "__version__", "0.0.0")
    names.add(native._module_path("// source", "c++"))
    monkeypatch.setattr(native.sys, "version", "3.0.0 (another Python)")
    names.add(native._module_path("// source", "c++"))
    monkeypatch.setattr(native, "_cpu", lambda: "model name : another CPU")
    names.add(native._module_path("// source", "c++"))
    assert len(names) == 7


def test_the_cpu_key_is_the_model_name_and_flags_once_each():
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    lines = native._cpu().splitlines()
    assert lines and len(lines) == len(set(lines))  # one line per distinct value, not one per core
    assert {ln.split(":")[0].strip() for ln in lines} <= set(native.CPU_KEYS)
    assert any(ln.startswith(("flags", "Features")) for ln in lines)


def test_an_arm_cpu_is_named_by_its_part_and_features():
    """ARM's /proc/cpuinfo has no "model name" line on most kernels: two ARM CPUs (here a
    Neoverse N1 and a V1, same implementer) must not share a -march=native module."""
    def arm(part, features):
        core = (f"processor\t: {{}}\nBogoMIPS\t: 243.75\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
                f"CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: {part}\nCPU revision\t: 1\n\n")
        return "".join(core.format(i) for i in range(4))
    n1, v1 = arm("0xd0c", "fp asimd aes crc32 asimddp"), arm("0xd40", "fp asimd aes crc32 asimddp sve bf16 i8mm")
    assert native._cpu(n1) != native._cpu(v1) and len(native._cpu(n1).splitlines()) == 6  # once each, not per core
    assert "0xd0c" in native._cpu(n1) and "asimddp" in native._cpu(n1)
    assert native._cpu("processor\t: 0\n") == f"{platform.machine()} {platform.processor()}"


@needs_native
def test_the_loaded_module_is_the_one_named_for_this_source_and_machine():
    cxx = os.environ.get("CXX", "c++")
    path = native._module_path(native.SOURCE.read_text(), cxx)
    assert Path(KERNELS.__file__) == path and path.is_file()
    assert all(hasattr(KERNELS, name) for name in ("quantize_rows", "epilogue_", "lowbit_linear"))
    assert native.unavailable_reason() is None and native.load() is KERNELS  # built once, loaded once


# ----------------------------------------------------------------------------- running without it

WARNING = ("qlin runs without its fused kernels ({}): per-token and static int8 layers use torch ops (the same "
           "results to float rounding, but slower) and low-bit weight-only layers their dequantized float weight\n")


def test_qlin_native_0_turns_the_kernels_off_and_says_why_once(tmp_path):
    """In a fresh process: nothing is built or loaded, every call answers None, the reason is
    the environment variable, and the warning is given once, not once per call."""
    code = "from qlin_cli.kernels import native; print(native.load(), native.load(), native.unavailable_reason(), sep='|')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=qlin_env(QLIN_NATIVE="0", QLIN_CACHE_DIR=str(tmp_path / "cache")))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "None|None|turned off by QLIN_NATIVE=0\n"
    assert done.stderr == WARNING.format("turned off by QLIN_NATIVE=0")
    assert not (tmp_path / "cache").exists()


def _load_afresh(monkeypatch, tmp_path, cxx: str):
    """`native._load` as a process that has not loaded the kernels yet would run it, with
    compiler `cxx` and its cache in `tmp_path / "cache"`."""
    monkeypatch.setenv("QLIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.delenv("QLIN_NATIVE", raising=False)
    return native._load.__wrapped__()


def test_without_a_compiler_the_reason_names_it(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-such-c++")
    assert _load_afresh(monkeypatch, tmp_path, missing) == (None, f"no C++ compiler ({missing}) on PATH")
    assert not (tmp_path / "cache").exists()


def test_a_failed_build_gives_the_compilers_first_error_and_leaves_no_file(monkeypatch, tmp_path):
    """A compiler that writes half a module and fails: the reason quotes its first error line,
    and the cache holds nothing a later run could load."""
    cxx = tmp_path / "bad-c++"
    cxx.write_text("#!/bin/sh\n"
                   "while [ $# -gt 0 ]; do [ \"$1\" = -o ] && echo half > \"$2\"; shift; done\n"
                   "echo 'In file included from x.cpp:' >&2\n"
                   "echo 'x.cpp:3:1: error: expected declaration' >&2\n"
                   "echo 'x.cpp:9:1: error: another one' >&2\n"
                   "exit 1\n")
    cxx.chmod(0o755)
    module, reason = _load_afresh(monkeypatch, tmp_path, str(cxx))
    assert module is None
    assert reason == f"the fused kernels could not be built (RuntimeError: {cxx} failed: x.cpp:3:1: error: expected declaration)"
    # no module: only the record that qlin's flags failed (the portable build failed too)
    full = native._module_path(native.SOURCE.read_text(), str(cxx))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{full.name}.failed"]


def test_a_compiler_that_refuses_qlins_flags_builds_the_portable_kernels(monkeypatch, tmp_path, caplog):
    """A compiler without OpenMP (Apple's clang, a clang without libomp) or without
    -march=native for this CPU: the portable build follows (neither flag: the scalar loops on
    one thread), qlin says so, and later runs load it without trying qlin's flags again until
    the `.failed` record is deleted. The compiler here is a script that refuses -fopenmp and
    otherwise writes its output; loading is stubbed (what it wrote is no module)."""
    cxx = tmp_path / "no-openmp-c++"
    log = tmp_path / "flags.log"
    cxx.write_text("#!/bin/sh\n"
                   f"echo \"$*\" >> {log}\n"
                   "case \" $* \" in *' -fopenmp '*) echo \"clang: error: unsupported option '-fopenmp'\" >&2; exit 1;; esac\n"
                   "while [ $# -gt 0 ]; do [ \"$1\" = -o ] && echo built > \"$2\"; shift; done\n")
    cxx.chmod(0o755)
    loaded = []
    monkeypatch.setattr(native, "_import", lambda path: loaded.append(path) or f"module {path.name}")
    monkeypatch.setattr(native, "_self_check", lambda module: None)  # no module to run: the build is checked here
    with caplog.at_level("INFO", logger="qlin"):
        module, reason = _load_afresh(monkeypatch, tmp_path, str(cxx))
    source = native.SOURCE.read_text()
    full, portable = native._module_path(source, str(cxx)), native._module_path(source, str(cxx), portable=True)
    assert (module, reason) == (f"module {portable.name}", None) and portable != full
    first, second = log.read_text().splitlines()
    assert " -march=native " in f" {first} " and " -fopenmp " in f" {first} "
    assert " -march=native " not in f" {second} " and " -fopenmp " not in f" {second} " and " -O3 " in f" {second} "
    assert "unsupported option '-fopenmp'" in Path(f"{full}.failed").read_text() and not full.exists()
    assert any("portable fused kernels" in r.getMessage() and f"{full}.failed" in r.getMessage() for r in caplog.records)
    assert _load_afresh(monkeypatch, tmp_path, str(cxx)) == (f"module {portable.name}", None)  # a later run
    assert len(log.read_text().splitlines()) == 2  # built nothing
    Path(f"{full}.failed").unlink()  # retry qlin's flags: refused again, the portable module still serves
    assert _load_afresh(monkeypatch, tmp_path, str(cxx)) == (f"module {portable.name}", None)
    assert len(log.read_text().splitlines()) == 3 and Path(f"{full}.failed").exists()


def test_a_module_that_fails_its_self_check_fails_the_suite_instead_of_skipping_it():
    """Kernel tests skip where the kernels cannot be had (no compiler); a module that computes
    wrongly must not turn into such skips and a green run: this test fails with the check's
    reason instead."""
    reason = native.unavailable_reason()
    assert reason is None or "give wrong results" not in reason, reason


def _wrong(names: str, fault):
    """The module built here, with each kernel of `names` (a space-separated list) replaced by
    `fault(real, *args)`."""
    fake = types.SimpleNamespace(**{a: getattr(KERNELS, a) for a in dir(KERNELS) if not a.startswith("__")})
    for name in names.split():
        setattr(fake, name, lambda *args, real=getattr(KERNELS, name): fault(real, *args))
    return fake


def _one_ulp_off(real, *args):  # the last output one float32 step off
    y = real(*args).clone()
    y.view(-1)[-1:] = torch.nextafter(y.view(-1)[-1:], torch.tensor(float("inf")))
    return y


def _vector_paths_off(real, *args):  # the paths but the scalar one (`path` last) one step off
    return real(*args) if args[-1] == 1 else _one_ulp_off(real, *args)


def _codes_off_by_one(real, x, *args):  # the same wrong sums on every path (GCC 12.2's kind of fault)
    return real(x + 0.5 * (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 255, *args)


@needs_native
@pytest.mark.parametrize("name, fault, reason", [
    ("pertoken_linear", _one_ulp_off, "pertoken_linear, 1 row(s)"),
    ("_pertoken_linear_scalar", _one_ulp_off, "pertoken_linear, 1 row(s)"),
    ("pertoken_linear _pertoken_linear_scalar", _codes_off_by_one, "pertoken_linear, 1 row(s)"),
    ("static_linear", _one_ulp_off, "static_linear, 1 row(s)"),
    ("lowbit_linear", _vector_paths_off, "lowbit_linear, 4 bits, 1 row(s)"),
    ("lowbit_linear", _codes_off_by_one, "lowbit_linear, 4 bits, 1 row(s)"),
    ("lowbit_dynamic_linear", _vector_paths_off, "lowbit_dynamic_linear, 1 row(s)"),
    ("lowbit_dynamic_linear", _codes_off_by_one, "lowbit_dynamic_linear, 1 row(s)"),
])
def test_a_module_that_computes_wrongly_is_not_used(monkeypatch, name, fault, reason):
    """A module whose vector loops part from its scalar ones by one float32 step, or whose
    loops all compute the same wrong sums, is not loaded: `_load` answers None with the failed
    check (and the module's path) as the reason, so qlin runs the torch-op path and says why.
    The module built here passes the same checks."""
    assert native._self_check(KERNELS) is None
    monkeypatch.setattr(native, "_import", lambda path: _wrong(name, fault))
    module, why = native._load.__wrapped__()
    assert module is None
    assert why.startswith(f"the fused kernels built here give wrong results ({reason}; ") and why.endswith(".so)")


def test_the_build_flags_of_each_kind_and_platform(monkeypatch):
    assert native._flags() == [*native.CFLAGS, "-fopenmp"]
    assert native._flags(portable=True) == [f for f in native.CFLAGS if f != "-march=native"]
    monkeypatch.setattr(native.platform, "system", lambda: "Darwin")  # as torch's extensions link there
    assert native._flags()[-2:] == native._flags(portable=True)[-2:] == ["-undefined", "dynamic_lookup"]


def test_the_warning_is_given_once_per_reason(caplog):
    native._say_once.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="qlin"):
            for _ in range(3):
                native._say_once("reason one")
            native._say_once("reason two")
        assert [r.getMessage() for r in caplog.records] == [WARNING.format("reason one").rstrip("\n"),
                                                            WARNING.format("reason two").rstrip("\n")]
    finally:
        native._say_once.cache_clear()


# ----------------------------------------------------------------------------- quantize_rows


def _rows(seed=0, m=37, k=83):
    """Rows of very different ranges (M, K), with a constant row, a zero row and a tiny one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10 + torch.randn(m, 1, generator=g)
    x[1] = 0.0
    x[2] = -3.25
    x[4] *= 1e-30
    return x


@needs_native
def test_quantize_rows_maps_each_row_onto_0_255_within_half_a_step():
    """u = round((x - lo) / width * 255): x ~ a * u + c with a = width / 255, c = lo, to half a
    step; each row with a range uses both ends of [0, 255]; the row sums are the codes' sums."""
    x = _rows()
    codes, a, c, rowsum = KERNELS.quantize_rows(x, torch.empty(0))
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and a.shape == c.shape == rowsum.shape == (37,)
    lo, hi = x.amin(1), x.amax(1)
    assert torch.equal(c, lo)
    assert torch.equal(a, (hi - lo).clamp_min(MIN_SCALE) / 255)
    error = (a[:, None] * codes.double() + c[:, None] - x.double()).abs()  # (M, K)
    assert bool((error <= a.double()[:, None] * (0.5 + 1e-5)).all())
    ranged = hi - lo >= MIN_SCALE  # not the constant rows, nor the one narrower than the smallest width
    assert torch.equal(codes.amin(1)[ranged], torch.zeros(int(ranged.sum()), dtype=torch.uint8))
    assert torch.equal(codes.amax(1)[ranged], torch.full((int(ranged.sum()),), 255, dtype=torch.uint8))
    assert torch.equal(rowsum, codes.sum(1).float())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_is_its_formula_bit_for_bit(dtype):
    """Codes, a, c and row sums against the formula in float32 torch ops (one rounding each):
    u = clamp(rne(((x - lo) * (1 / width)) * INV_S), 0, 255), on rows of 1 to 83 values (the
    vector loops' widths and tails), with zeros of both signs at a row's ends (lo or hi a zero:
    -0.0 and 0.0 are equal, the first one met is kept), NaN skipped by min and max."""
    inv_s = 1.0 / torch.tensor(1.0 / 255.0, dtype=torch.float32)  # fbgemm's reciprocal, in float32
    g = torch.Generator().manual_seed(4)
    for k in (1, 7, 8, 9, 16, 17, 31, 83):
        x = (torch.randn(6, k, generator=g) * 3).to(dtype)
        x[1] = x[1].abs()
        # lo a zero, 0.0 met first (at k = 1), -0.0 after it at k = 8 and 16: lane 0 of the 8-lane
        # and of the 16-lane vectors, which their lane merge meets before k = 1's lane
        x[1, min(1, k - 1)], x[1, 8 % k], x[1, 16 % k] = 0.0, -0.0, -0.0
        x[2] = -x[2].abs()
        x[2, min(1, k - 1)], x[2, 8 % k], x[2, 16 % k] = -0.0, 0.0, 0.0  # hi a zero, the other way round
        x[3, k // 2] = float("nan")  # one NaN: min and max skip it (its code is what the CPU gives)
        if k > 32:  # a NaN in the lane that holds the row's min and max so far, larger values after it
            x[4, :2] = torch.tensor([-99.0, 99.0])
            x[4, 16:18] = float("nan")
        codes, a, c, rowsum = KERNELS.quantize_rows(x, torch.empty(0))
        xf = x.float()
        assert k <= 32 or (float(c[4]) == -99.0 and a[4] == torch.tensor(198.0) / 255)
        for m in range(6):
            row = xf[m]
            lo, hi = torch.tensor(float("inf")), torch.tensor(float("-inf"))
            for v in row:  # the scalar loop's order
                lo = v if v < lo else lo
                hi = v if v > hi else hi
            width = (hi - lo).clamp_min(MIN_SCALE)
            u = torch.round(((row - lo) * (1.0 / width)) * inv_s).clamp(0, 255)
            live = ~row.isnan()
            assert torch.equal(codes[m][live], u[live].to(torch.uint8)), (k, m)
            assert c[m].view(torch.int32) == lo.view(torch.int32) and a[m] == width / 255, (k, m)
            if bool(live.all()):
                assert rowsum[m] == float(u.sum()), (k, m)


@needs_native
def test_a_constant_or_tiny_row_gets_code_0_and_the_smallest_width():
    x = _rows()
    codes, a, c, _ = KERNELS.quantize_rows(x, torch.empty(0))
    for row, value in ((1, 0.0), (2, -3.25), (4, float(x[4].min()))):
        assert int(codes[row].max()) == 0 and float(c[row]) == value
        assert float(a[row]) == pytest.approx(MIN_SCALE / 255, rel=1e-6)


@needs_native
def test_quantize_rows_divides_by_the_smoothing_factors_first():
    """SmoothQuant's division folded into the pass gives the codes of the divided rows, bit for bit."""
    x = _rows(seed=1)
    smooth = torch.rand(83, generator=torch.Generator().manual_seed(2)) + 0.25
    fused = KERNELS.quantize_rows(x, smooth)
    divided = KERNELS.quantize_rows((x / smooth).contiguous(), torch.empty(0))
    assert all(torch.equal(f, d) for f, d in zip(fused, divided))
    assert not torch.equal(fused[0], KERNELS.quantize_rows(x, torch.empty(0))[0])


@needs_native
def test_a_rows_codes_do_not_depend_on_the_other_rows():
    x = _rows(seed=3, m=64, k=1000)  # rows over the AVX-512 width and a tail
    codes, a, c, rowsum = KERNELS.quantize_rows(x, torch.empty(0))
    for i in (0, 5, 63):
        one = KERNELS.quantize_rows(x[i : i + 1].contiguous(), torch.empty(0))
        assert torch.equal(one[0][0], codes[i]) and float(one[1]) == float(a[i]) and float(one[3]) == float(rowsum[i])


@needs_native
@pytest.mark.parametrize("args, message", [
    (lambda x: (x.double(), torch.empty(0)), "quantize_rows: x must be a contiguous float32 or bfloat16 CPU (M, K) tensor"),
    (lambda x: (x.t(), torch.empty(0)), "quantize_rows: x must be a contiguous float32 or bfloat16 CPU (M, K) tensor"),
    (lambda x: (x[0], torch.empty(0)), "quantize_rows: x must be a contiguous float32 or bfloat16 CPU (M, K) tensor"),
    (lambda x: (x, torch.ones(82)), "quantize_rows: smooth must be contiguous float32 (K,)"),
    (lambda x: (x, torch.ones(83, dtype=torch.float64)), "quantize_rows: smooth must be contiguous float32 (K,)"),
])
def test_quantize_rows_refuses_operands_it_cannot_read(args, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        KERNELS.quantize_rows(*args(_rows()))


# ----------------------------------------------------------------------------- epilogue_


def _epilogue_operands(m=9, n=70, seed=4):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(-50_000, 50_000, (m, n), generator=g).float()  # int32 GEMM results, as float
    a, c = torch.rand(m, generator=g) * 1e-3, torch.randn(m, generator=g)
    rowsum = torch.randint(0, 255 * 100, (m,), generator=g).float()
    wsum, bias, zs = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g) * 1e-2
    return y, a, c, wsum, bias, rowsum, zs


def _reference(y, a, c, wsum, bias, rowsum, zs):
    """y[m, n] = a[m] * (y[m, n] - rowsum[m] * zs[n]) + c[m] * wsum[n] + b[n], in float64."""
    y, a, c, wsum, rowsum = y.double(), a.double(), c.double(), wsum.double(), rowsum.double()
    if zs.numel():
        y = y - rowsum[:, None] * zs.double()[None, :]
    out = a[:, None] * y + c[:, None] * wsum[None, :]
    return out + bias.double()[None, :] if bias.numel() else out


@needs_native
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("zs", [True, False], ids=["asym", "sym"])
def test_epilogue_rescales_in_place_to_the_formula(bias, zs):
    y, a, c, wsum, b, rowsum, z = _epilogue_operands()
    b, z = (b if bias else torch.empty(0)), (z if zs else torch.empty(0))
    expect = _reference(y, a, c, wsum, b, rowsum, z)
    out = KERNELS.epilogue_(y, a, c, wsum, b, rowsum, z, None)
    assert out.data_ptr() == y.data_ptr()  # in place
    assert torch.allclose(out.double(), expect, rtol=1e-6, atol=1e-6 * float(expect.abs().max()))
    if bias:
        assert not torch.allclose(out.double(), _reference(y, a, c, wsum, torch.empty(0), rowsum, z), atol=1e-3)


@needs_native
def test_epilogue_into_out_leaves_y_unchanged():
    y, a, c, wsum, b, rowsum, z = _epilogue_operands()
    before = y.clone()
    out = torch.empty_like(y)
    got = KERNELS.epilogue_(y, a, c, wsum, b, rowsum, z, out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(y, before)
    assert torch.equal(out, KERNELS.epilogue_(y.clone(), a, c, wsum, b, rowsum, z, None))


@needs_native
@pytest.mark.parametrize("change, message", [
    (lambda o: {**o, "a": o["a"][:-1]}, "epilogue_: shapes do not fit"),
    (lambda o: {**o, "wsum": o["wsum"][:-1]}, "epilogue_: shapes do not fit"),
    (lambda o: {**o, "bias": o["bias"][:-1]}, "epilogue_: bias"),
    (lambda o: {**o, "zs": o["zs"].double()}, "epilogue_: zero points"),
    (lambda o: {**o, "y": o["y"].double()}, "epilogue_: y must be contiguous float32 (M, N)"),
    (lambda o: {**o, "out": torch.empty(70, 9).t()}, "epilogue_: out must be contiguous float32 or bfloat16 (M, N)"),
])
def test_epilogue_refuses_operands_that_do_not_fit(change, message):
    y, a, c, wsum, b, rowsum, z = _epilogue_operands()
    o = change({"y": y, "a": a, "c": c, "wsum": wsum, "bias": b, "rowsum": rowsum, "zs": z, "out": None})
    with pytest.raises(RuntimeError, match=re.escape(message)):
        KERNELS.epilogue_(o["y"], o["a"], o["c"], o["wsum"], o["bias"], o["rowsum"], o["zs"], o["out"])


# ------------------------------------------------------------- the other instruction set's build

KERNEL_TESTS = ("test_native.py", "test_pertoken_kernel.py", "test_lowbit.py", "test_lowbit_dynamic.py")
# their tests of what lies around the kernels (the CLI, an export, a process without them), which
# the other build adds nothing to
NOT_KERNELS = ("test_transformers_llama_end_to_end_and_its_compressed_tensors_export",
               "test_cli_quantize_inspect_eval_on_the_sample_model", "test_qlin_native_0_turns_the_kernels_off_and_says_why_once")


@needs_native
def test_the_build_for_the_other_instruction_set_passes_the_kernel_tests(request):
    """Both sides of native_kernels.cpp's `#ifdef`s are tested on any x86 CPU: the kernels' test
    files pass against the build for the instruction set this CPU lacks (other_build.py), in a
    subprocess; they compare every vector path bit for bit with the scalar path and the torch
    references. (Its first run found the AVX-512 row min/max losing a lane's minimum to a NaN
    and keeping a zero's other sign: no AVX-512 CPU had run those loops since they changed.)"""
    planned = other_build.plan()
    if isinstance(planned, str):
        pytest.skip(planned)
    started = getattr(request.config, "qlin_other_build", None)  # conftest's background build
    if started is not None:
        started.wait(timeout=other_build.TIMEOUT_S)
    tests = [str(Path(__file__).with_name(name)) for name in KERNEL_TESTS]
    done = other_build.run(*planned, *tests, "-k", f"not ({' or '.join(NOT_KERNELS)})")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed", summary) and not re.search(r"\b\d+ (failed|error)", summary), summary

