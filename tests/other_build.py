"""The fused kernels built for the instruction set this CPU lacks, for test_native.py's last test:
with AVX-512 here, `-mno-avx512f` (the AVX2 loops); without, the AVX-512 and VNNI loops with each
intrinsic taken from SIMDe's portable versions (simde-py, in the dev extra; `QLIN_SIMDE_AVX512`
in native_kernels.cpp), at -O1 (50-70 s to build instead of 100, the same IEEE operations).
conftest starts the build in the background when a session's paths include test_native.py, so
that on two cores it compiles beside the session's own build instead of after it. By hand, the
SIMDe flags plus `-DQLIN_SIMDE_NO_VNNI` build an AVX-512 CPU without VNNI (Skylake-SP: AVX-512
rows, the AVX2 int8 loops), which reports "avx2 True"."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

TEST = "test_the_build_for_the_other_instruction_set_passes_the_kernel_tests"  # in test_native.py
INNER = "QLIN_OTHER_BUILD"  # set in the runs of the other build: they start no build of their own
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # a build or the run of its tests: a hung compiler fails the test instead of CI

# argv: the flags (a JSON list), what the build must report ("pertoken_isa lowbit_avx512"), then
# pytest's arguments (none: build only)
RUNNER = """
import json, sys
from qlin_cli.kernels import native
native.CFLAGS = native.CFLAGS + tuple(json.loads(sys.argv[1]))
kernels = native.load()
assert kernels is not None, native.unavailable_reason()
built = f"{kernels.pertoken_isa} {kernels.lowbit_avx512}"
assert built == sys.argv[2], f"built {built}, expected {sys.argv[2]}"
if len(sys.argv) > 3:
    import pytest
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[3:]]))
"""


def plan() -> tuple[tuple[str, ...], str] | str:
    """(flags, what the build reports), or why there is no other build to test here."""
    from importlib.metadata import version

    from qlin_cli.kernels import native

    if os.environ.get(INNER) == "1":
        return "this run is the other build"
    if platform.machine() not in ("x86_64", "AMD64"):
        return "the kernels' vector loops are x86's"
    flags = set(" ".join(ln for ln in native._cpu().splitlines() if ln.startswith("flags")).split())
    if {"avx512f", "avx512bw"} <= flags:
        return ("-mno-avx512f",), "avx2 False"
    try:
        import simde_py
    except ImportError:
        return "simde-py builds the AVX-512 loops on this CPU: pip install -e '.[dev]'"
    # the SIMDe release is part of the flags, so of the cached module's hashed name
    return (("-O1", "-DQLIN_SIMDE_AVX512", f"-DQLIN_SIMDE_PY={version('simde-py')}", "-isystem", simde_py.get_include()),
            "avx512_vnni True")


def wanted(args: list[str], cwd: str | Path) -> bool:
    """Whether pytest's path arguments (`args`, relative to `cwd`) include test_native.py."""
    here = Path(__file__).with_name("test_native.py").resolve()
    for arg in args:
        path = (Path(cwd) / arg.split("::")[0]).resolve()
        if path == here or path in here.parents:
            return True
    return False


def run(flags: tuple[str, ...], expect: str, *pytest_args: str) -> subprocess.CompletedProcess:
    """The runner in a subprocess: the other build (cached beside this one: its name hashes the
    flags), then pytest's arguments against it."""
    return subprocess.run(_command(flags, expect, *pytest_args), env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def start() -> subprocess.Popen | None:
    """The other build, started in the background (None: none here); in a session of its own,
    so that `stop` ends the compiler with it."""
    planned = plan()
    if isinstance(planned, str):
        return None
    return subprocess.Popen(_command(*planned), env=_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(build: subprocess.Popen) -> None:
    try:
        os.killpg(build.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    build.wait()


def _command(flags: tuple[str, ...], expect: str, *pytest_args: str) -> list[str]:
    return [sys.executable, "-c", RUNNER, json.dumps(flags), expect, *pytest_args]


def _env() -> dict[str, str]:
    # the session's own options (--lf, --sw ...) are not the inner run's
    return {**{k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}, INNER: "1"}
