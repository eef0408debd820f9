"""Errors a user can cause. The CLI maps each kind to an exit code in one table (cli.py).

A message names an option by its meaning, the keyword a library caller passes, in backticks:
"pass `calib` FILE". The CLI shows it as the flag that sets it ("pass --calib FILE").
"""

from __future__ import annotations

__all__ = ["QlinError", "InputError", "ConfigError", "FormatError", "OutputError", "Terminated", "one_line"]


class QlinError(Exception):
    """A problem the user can fix; its message is one line that says what and how."""


class InputError(QlinError):
    """A source, input or label file is missing, unreadable, unsafe or does not fit the model."""


class ConfigError(QlinError):
    """An option, recipe or combination of options is invalid."""


class FormatError(QlinError):
    """A qlin file is malformed, tampered with, or of an unknown format version."""


class OutputError(QlinError):
    """An output cannot be written (exists without --force, unwritable folder, same as input)."""


class Terminated(BaseException):
    """The process got SIGTERM or SIGHUP (`kill`, systemd, a container runtime, a closed
    terminal). Raised by the CLI's signal handler so that, like KeyboardInterrupt for Ctrl-C, it
    unwinds through every `finally` (temporary files and folders are removed) and no `except
    Exception` stops it; the CLI then exits with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def one_line(exc: BaseException, limit: int = 200) -> str:
    """`exc` for a one-line message: its type and the first line of its text (at most `limit`
    characters), e.g. 'ValueError: bad header', or only its type when it has no text."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit]}" if text else type(exc).__name__
