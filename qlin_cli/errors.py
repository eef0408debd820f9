"""Errors a user can cause. The CLI maps each kind to an exit code in one table (cli.py)."""

from __future__ import annotations

__all__ = ["QlinError", "InputError", "ConfigError", "FormatError", "OutputError"]


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
