"""The `qlin` console script: catch Ctrl-C, SIGTERM and SIGHUP from the very start, before the
heavy imports, end within `GRACE` seconds of one wherever the command is, and give OpenMP a
short spin before torch loads.

Python runs a signal's handler in the main thread between two bytecodes, so a command inside
one long call (a tokenizer on a 50 MB text, a C library's loop) would not see SIGTERM until
the call returns: minutes, or never. A watchdog thread learns of each signal at once (the
signal module writes its number to a pipe, `signal.set_wakeup_fd`); if the process is still
there `GRACE` seconds later, it removes the temporary files and folders the command was
writing (`files.remove_temporaries`), prints the line the command would have printed, and
ends the process with the same exit code (130, 143, 129). One thing it cannot interrupt: a
call that holds the interpreter's lock all along (pure C code that never releases it), where
no Python thread runs; qlin's own long steps release it or run Python code.
"""

import os
import signal
import sys
import threading
import time

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


GRACE = 1.5  # seconds the command has to end by itself after a signal (its handler, cleanup and exit)
INTERRUPTING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_armed = False
_reported = threading.Lock()  # held by whoever says how the command ended: the command, or the watchdog
exit_code: int | None = None  # set by the command (cli.main) once it is done


def claim_report() -> bool:
    """True for the first caller, who then prints how the command ended (the command's own line
    or the watchdog's); always True where no watchdog runs (qlin called in-process)."""
    return not _armed or _reported.acquire(blocking=False)


def interrupted_line(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else f"interrupted ({signal.Signals(signum).name})"


def _interrupted_while_starting(signum, frame):
    # Nothing has been read or written yet: say so and leave, without a traceback.
    if claim_report():
        sys.stderr.write(interrupted_line(signum) + "\n")
        sys.stderr.flush()
    os._exit(128 + signum)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _watch(fd: int) -> None:
    """The watchdog (module docstring): wait for an interrupting signal's number on `fd`, give
    the command `GRACE` seconds, then end the process as the command would have."""
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        signum = next((n for n in data if n in INTERRUPTING), None)
        if signum is not None:
            break
    time.sleep(GRACE)
    if exit_code is not None:  # the command is done and its process is tearing down
        _flush()
        os._exit(exit_code)
    if not claim_report():  # the command is saying how it ended: let it, then leave with its code
        time.sleep(GRACE)
        _flush()
        os._exit(128 + signum if exit_code is None else exit_code)
    files = sys.modules.get("qlin_cli.files")  # not imported yet: no temporary was made
    if files is not None:
        files.remove_temporaries()
    _flush()
    os.write(2, (interrupted_line(signum) + "\n").encode())
    os._exit(128 + signum)


def _arm_watchdog() -> None:
    """Start the watchdog thread and have every caught signal's number written to its pipe."""
    global _armed
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read,), name="qlin-signal-watchdog", daemon=True).start()
    _armed = True


def main() -> None:
    for signum in INTERRUPTING:
        signal.signal(signum, _interrupted_while_starting)
    _arm_watchdog()
    os.environ.update(short_spin(os.environ))
    try:
        from .cli import main as run  # imports torch, typer and rich
    except KeyboardInterrupt:  # raised by an import itself rather than by the signal
        _interrupted_while_starting(signal.SIGINT, None)
    run()
