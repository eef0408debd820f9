"""qlin's fused C++ kernels (`native_kernels.cpp`): built once per machine, loaded on first use.

The per-token int8 path needs a row's min and max, its uint8 codes, a GEMM and a rescale. In
torch ops that is six passes over memory and seven parallel regions per layer; the two C++ loops
here do the passes before and after the GEMM in one parallel region each, with SmoothQuant's
division folded into the first (onednn.py, kernel `onednn`); for a few rows `pertoken_linear` does
the whole layer, GEMM included, in one call. `lowbit_linear` is the weight-only layer (int8
per channel, n-bit per group) over the kernel's own panels (lowbit.py packs them and holds the
torch-op reference).

Build: one `c++` command (compile and link against this torch), into the cache folder
`$QLIN_CACHE_DIR` (default `$XDG_CACHE_HOME/qlin` or `~/.cache/qlin`), under a name that hashes
the source, the flags, the torch and Python versions and the CPU (the code is built for this
CPU), written to a temporary file and renamed into place, so concurrent or interrupted builds
never leave a broken or locked module behind. The first build takes ~25 s; later loads ~0.1 s.
Where the compiler refuses qlin's flags (Apple's clang has no `-fopenmp`, a clang without libomp
cannot link it, an old one may not know `-march=native` on an ARM CPU), a second, portable build
follows without those two: the scalar loops on one thread (the same bits; on the Zen 1 the
scalar loops on two threads ran 8-15x faster than torch's `_int_mm` loop, which is what the
torch-op path runs for per-token layers on a CPU without VNNI), said once;
a `.failed` file beside the module keeps later runs from trying qlin's flags again (delete it to
retry). Where nothing builds (no compiler, no headers, unwritable cache, `QLIN_NATIVE=0`),
`load()` returns None, qlin runs the torch-op path instead (same results to float rounding) and
says why once, through the `qlin` logger.

Before a loaded module serves a layer, `_self_check` runs each kernel on small operands (a few
milliseconds): every instruction set built must give the scalar loops' bits, as the design says
and the tests check, and the scalar loops must match a float64 reference. A compiler that builds
wrong code for this CPU (GCC 12.2 once vectorized a loop of `pertoken_linear` into `vpdpbusd`
wrongly, caught by the tests on an AMD Zen 5) then costs speed, not results: `load()` returns
None, with the failed check as the reason.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import torch

from ..files import forget_temporary, temporary_name
from ..primitives import half_scales
from .common import weight_int_sums, weight_row_sums

__all__ = ["load", "unavailable_reason"]

SOURCE = Path(__file__).with_name("native_kernels.cpp")
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17", "-fPIC", "-shared")
log = logging.getLogger("qlin")


def _cache_dir() -> Path:
    if os.environ.get("QLIN_CACHE_DIR"):
        return Path(os.environ["QLIN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlin"


# /proc/cpuinfo's lines that name a CPU: x86's model and flags; ARM's (no "model name" on most
# Linux kernels) implementer, part, variant, revision and features
CPU_KEYS = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part",
            "CPU revision")


def _cpu(text: str | None = None) -> str:
    """The CPU's model and flags, each distinct line once: a -march=native module runs only where
    it was built, so they are part of its cached name. Without such lines, the machine's name."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    kept = "\n".join(dict.fromkeys(ln for ln in text.splitlines() if ln.startswith(CPU_KEYS)))
    return kept or f"{platform.machine()} {platform.processor()}"


def _flags(portable: bool = False) -> list[str]:
    """The compiler flags of a build: qlin's (`CFLAGS` and OpenMP for the kernels' threads), or
    the portable ones (without `-march=native` and OpenMP). On macOS the linker is told to leave
    Python's symbols to the interpreter, as torch's own extension builds do."""
    flags = [f for f in CFLAGS if not (portable and f == "-march=native")] + ([] if portable else ["-fopenmp"])
    return flags + (["-undefined", "dynamic_lookup"] if platform.system() == "Darwin" else [])


def _module_path(source: str, cxx: str, portable: bool = False) -> Path:
    parts = (source, " ".join(CFLAGS), cxx, torch.__version__, sys.version, _cpu())
    key = "\0".join(parts + (("portable",) if portable else ()))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return _cache_dir() / f"qlin_native_{digest}{sysconfig.get_config_var('EXT_SUFFIX')}"


def _build(path: Path, cxx: str, flags: list[str]) -> None:
    from torch.utils.cpp_extension import include_paths, library_paths

    path.parent.mkdir(parents=True, exist_ok=True)
    base = temporary_name(path)
    tmp = Path(base + ".tmp")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        cxx, *flags, f"-DTORCH_EXTENSION_NAME={path.name.split('.')[0]}", "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-isystem{p}" for p in (*include_paths(), sysconfig.get_paths()["include"])),
        str(SOURCE), "-o", str(tmp),
        *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            errors = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines() or ["?"]
            raise RuntimeError(f"{cxx} failed: {errors[0].strip()[:200]}")
        os.replace(tmp, path)  # atomic: a concurrent loader sees no module or the whole one
    finally:
        if tmp.exists():
            tmp.unlink()
        forget_temporary(base)


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    if os.environ.get("QLIN_NATIVE", "1") == "0":
        return None, "turned off by QLIN_NATIVE=0"
    if not SOURCE.is_file():
        return None, f"{SOURCE.name} is not installed with qlin"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler ({cxx}) on PATH"
    source = SOURCE.read_text()
    path, portable = _module_path(source, cxx), _module_path(source, cxx, portable=True)
    failed = Path(f"{path}.failed")  # qlin's flags failed here once: the portable build serves
    first: Exception | None = None
    try:
        if not path.exists() and not failed.exists():
            log.info("building qlin's fused kernels for this machine (once, ~25 s): %s", path)
            try:
                _build(path, cxx, _flags())
            except RuntimeError as exc:  # the compiler refused qlin's flags: the portable build next
                first = exc
                failed.write_text(f"{exc}\n")
        if not path.exists():
            if not portable.exists():
                log.info("building qlin's portable kernels (no -march=native, no OpenMP) after %s: %s",
                         first or f"the failure {failed} records", portable)
                _build(portable, cxx, _flags(portable=True))
            log.warning("qlin runs its portable fused kernels (built without -march=native and OpenMP: scalar "
                        "loops on one thread, the same results, slower); delete %s to build them with qlin's "
                        "flags again", failed)
            path = portable
        module = _import(path)
    except Exception as exc:  # a compiler or loader problem: qlin runs without the fused kernels
        exc = first or exc
        text = str(exc).strip().splitlines()
        return None, f"the fused kernels could not be built ({type(exc).__name__}: {text[0][:200] if text else ''})"
    wrong = _self_check(module)
    if wrong is not None:
        return None, f"the fused kernels built here give wrong results ({wrong}; {path})"
    return module, None


def _self_check(module) -> str | None:
    """What a loaded module computes wrongly on small operands (rows 1 and 5: decode and batch
    tiles; K = 100: vector loops and their tails), or None: per-token and static int8 (each
    vector path against its scalar twin, bit for bit; the scalar one against float64), 4-bit
    weight-only and W4A8 in groups of 32 with float16 scales and int8 weight-only per channel
    (every path built against the scalar one, bit for bit; that one against float64). It calls
    the module itself (load() would come back here)."""
    from . import lowbit, lowbit_dynamic  # here, not at the top: both import this module

    g = torch.Generator().manual_seed(0)
    n, k = 40, 100
    x = torch.randn(5, k, generator=g)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 0.01 + 1e-3
    b = torch.randn(n, generator=g)
    u, a, c = lowbit_dynamic.dynamic_codes(x)
    seen = (u * a + c).double()  # the activations as the per-token codes give them
    e, z, e32 = torch.empty(0), torch.zeros(n, dtype=torch.int8), torch.empty(0, dtype=torch.int32)
    sums = weight_int_sums(w)

    def off(y: torch.Tensor, ref: torch.Tensor) -> bool:  # further apart than float32 rounding
        return not bool(((y.double() - ref).abs() <= 1e-4 * (ref.abs() + ref.abs().mean())).all())

    def parts(run, y: torch.Tensor, built: list[str]) -> bool:  # a path (0: auto, or one built) not y's bits
        return any(not torch.equal(run(path), y) for path in (0, *(lowbit.PATHS[name] for name in built)))

    for rows in (x[:1], x):
        m = rows.shape[0]
        for wsum_i in (sums, e32):  # AVX2: the vpmaddubsw tiles, then the vpmaddwd ones
            ops = (rows, w, s, weight_row_sums(w, s, z, sums), b, e, e, wsum_i)
            y = module._pertoken_linear_scalar(*ops)
            if not torch.equal(module.pertoken_linear(*ops), y) or off(y, seen[:m] @ (w.double() * s[:, None]).T + b):
                return f"pertoken_linear, {m} row(s)"
        ops = (rows, w, 0.02 * s, 128 * sums, e32, b, torch.tensor([0.02]), 0, sums)  # s_x 0.02, z_x 0
        if not torch.equal(module.static_linear(*ops), module._static_linear_scalar(*ops)):
            return f"static_linear, {m} row(s)"
        for bits, group in ((4, 32), (8, None)):
            q = w.clamp(-7, 7) if bits == 4 else w
            scale = half_scales(torch.rand(n, -(-k // 32), generator=g) * 0.01 + 1e-3) if group else s
            weight = q.double() * (scale.repeat_interleave(32, 1)[:, :k] if group else scale[:, None]).double()
            p = lowbit.to_panels(q, bits, scale, None, group)
            run = lambda path: module.lowbit_linear(rows, p.codes, p.scale, p.zq, b, p.n, p.k, p.group_size, path)
            y = run(1)
            if off(y, rows.double() @ weight.T + b) or parts(run, y, module.lowbit_paths):
                return f"lowbit_linear, {bits} bits, {m} row(s)"
            if group:
                d = lowbit_dynamic.to_dot_panels(q, bits, scale, None, group)
                run = lambda path: module.lowbit_dynamic_linear(rows, d.codes, d.scale, d.zq, d.wsum, b, e, d.n, d.k,
                                                                d.group_size, path)
                y = run(1)
                if off(y, seen[:m] @ weight.T + b) or parts(run, y, module.lowbit_dynamic_paths):
                    return f"lowbit_dynamic_linear, {m} row(s)"
    return None


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load() -> ModuleType | None:
    """The compiled kernels (`quantize_rows`, `epilogue_`, `pertoken_linear`, `lowbit_linear`),
    built on first use; None where they cannot be had (the reason is logged once)."""
    module, reason = _load()
    if module is None:
        _say_once(reason)
    return module


def unavailable_reason() -> str | None:
    """Why the fused kernels cannot run here (said once), or None when they can (builds them
    if needed)."""
    reason = _load()[1]
    if reason is not None:
        _say_once(reason)
    return reason


@functools.cache
def _say_once(reason: str) -> None:
    log.warning("qlin runs without its fused kernels (%s): per-token and static int8 layers use torch "
                "ops (the same results to float rounding, but slower) and low-bit weight-only layers their "
                "dequantized float weight", reason)
