"""The public import path of the command line's jobs, as Python functions that return typed
reports: `quantize_checkpoint` (taking one `QuantizeOptions`), `inspect_path`,
`evaluate_checkpoint`, `evaluate_text`. They live in `qlin_cli.jobs` (one room each, with the
options and their checks, and the run's data); the CLI only checks its flags, calls one of them
and renders the report.
"""

from __future__ import annotations

from .jobs.evaluate import evaluate_checkpoint, evaluate_text
from .jobs.inspect import inspect_path, is_quantized
from .jobs.options import QuantizeOptions, check_device, default_output
from .jobs.quantize import quantize_checkpoint

__all__ = [
    "QuantizeOptions", "quantize_checkpoint", "inspect_path", "evaluate_checkpoint", "evaluate_text", "default_output",
    "check_device", "is_quantized",
]
