"""The `qlin` console script: catch Ctrl-C, SIGTERM and SIGHUP from the very start, before the
heavy imports."""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    # Nothing has been read or written yet: say so and leave, without a traceback.
    name = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
    sys.stderr.write(f"interrupted{name}\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted_while_starting)
    try:
        from .cli import main as run  # imports torch, typer and rich
    except KeyboardInterrupt:  # raised by an import itself rather than by the signal
        _interrupted_while_starting(signal.SIGINT, None)
    run()
