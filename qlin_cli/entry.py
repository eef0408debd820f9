"""The `qlin` console script: catch Ctrl-C, SIGTERM and SIGHUP from the very start, before the
heavy imports, and give OpenMP a short spin before torch loads."""

import os
import signal
import sys

# OpenMP's idle threads spin at every barrier before they sleep: GNU libgomp (torch's Linux
# wheels) 300,000 turns by default, LLVM's libomp 200 ms. On cores that other processes share,
# the spinning thread holds a core the thread it waits for needs, and a forward takes several
# times its quiet time. A short spin keeps the quiet speed and loses little when loaded
# (benchmarks/spin.py, RESULTS.md "spin"). libomp's KMP_BLOCKTIME counts whole milliseconds in
# older releases (a millisecond is already a long spin), so there it is 0: sleep at once.
# Set before torch loads, because both runtimes read them once when they start.
SPIN_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
SHORT_SPIN = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}


def short_spin(environ) -> dict[str, str]:
    """The variables `qlin` sets before torch loads: `SHORT_SPIN`, or none where the user set any
    of `SPIN_VARIABLES` (a user's choice of wait policy is kept whole)."""
    return {} if any(name in environ for name in SPIN_VARIABLES) else dict(SHORT_SPIN)


def _interrupted_while_starting(signum, frame):
    # Nothing has been read or written yet: say so and leave, without a traceback.
    name = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
    sys.stderr.write(f"interrupted{name}\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted_while_starting)
    os.environ.update(short_spin(os.environ))
    try:
        from .cli import main as run  # imports torch, typer and rich
    except KeyboardInterrupt:  # raised by an import itself rather than by the signal
        _interrupted_while_starting(signal.SIGINT, None)
    run()
