"""The `qlin` console script: catch Ctrl-C from the very start, before the heavy imports."""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    # Nothing has been read or written yet: say so and leave, without a traceback.
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        from .cli import main as run  # imports torch, typer and rich
    except KeyboardInterrupt:  # raised by an import itself rather than by the signal
        _interrupted_while_starting(signal.SIGINT, None)
    run()
