"""Measuring what quantization gained and lost: output metrics, latency, and report rendering.

Reports are plain dicts (JSON-able); `to_markdown` renders the quantize and eval reports.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Iterator

import torch
import torch.nn as nn

from .errors import InputError
from .primitives import sqnr_db

__all__ = [
    "first_tensor",
    "compare_outputs",
    "batches",
    "run_model",
    "median_latency_ms",
    "summary_lines",
    "to_markdown",
    "json_safe",
]

Inputs = torch.Tensor | dict[str, torch.Tensor]


def first_tensor(output: Any, where: str = "output") -> tuple[torch.Tensor, str]:
    """The first tensor of a model output (a tensor, tuple/list, dict or dataclass such as
    transformers' ModelOutput) and a description of where it was found."""
    if isinstance(output, torch.Tensor):
        return output, where
    if isinstance(output, dict):
        items = list(output.items())
    elif dataclasses.is_dataclass(output):
        items = [(f.name, getattr(output, f.name)) for f in dataclasses.fields(output)]
    elif isinstance(output, (tuple, list)):
        items = list(enumerate(output))
    else:
        items = []
    for key, value in items:
        if value is None:
            continue
        try:
            return first_tensor(value, f"{where}[{key!r}]")
        except InputError:
            continue
    raise InputError(f"the model output ({type(output).__name__}) holds no tensor to compare")


def num_samples(inputs: Inputs) -> int:
    return (next(iter(inputs.values())) if isinstance(inputs, dict) else inputs).shape[0]


def batches(inputs: Inputs, batch_size: int) -> Iterator[Inputs]:
    """Slices of `inputs` along the first (sample) dimension."""
    n = num_samples(inputs)
    for start in range(0, n, batch_size):
        if isinstance(inputs, dict):
            yield {k: v[start : start + batch_size] for k, v in inputs.items()}
        else:
            yield inputs[start : start + batch_size]


@torch.no_grad()
def run_model(model: nn.Module, inputs: Inputs, what: str = "model") -> Any:
    """`model(inputs)` (keyword arguments for a dict), with a one-line error if they don't fit."""
    try:
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)
    except InputError:
        raise
    except Exception as exc:
        shape = (
            {k: tuple(v.shape) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(inputs.shape)
        )
        text = str(exc).strip().splitlines()
        raise InputError(
            f"the inputs {shape} do not fit the {what} ({type(exc).__name__}: {text[0][:160] if text else ''})"
        ) from None


def compare_outputs(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float | None]:
    """Error of `test` against `reference` `(N, ...)`: SQNR dB, mean per-sample cosine, max abs
    error, MSE, and for 2-D outputs `(N, C)` the top-1 agreement."""
    ref, out = reference.detach().float(), test.detach().float()
    if ref.shape != out.shape:
        raise InputError(f"outputs differ in shape: {tuple(ref.shape)} vs {tuple(out.shape)}")
    flat_r, flat_o = ref.reshape(ref.shape[0], -1).double(), out.reshape(out.shape[0], -1).double()
    cosine = torch.nn.functional.cosine_similarity(flat_r, flat_o, dim=1, eps=1e-12).mean()
    return {
        "sqnr_db": sqnr_db(ref, out),
        "cosine": float(cosine),
        "max_abs_err": float((ref - out).abs().max()) if ref.numel() else 0.0,
        "mse": float((ref.double() - out.double()).pow(2).mean()) if ref.numel() else 0.0,
        "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).double().mean()) if ref.dim() == 2 else None,
    }


@torch.no_grad()
def median_latency_ms(models: list[nn.Module], inputs: Inputs, batch_size: int, repeats: int = 5) -> list[float]:
    """Median wall time (ms) of one batch for each model, timing the models interleaved (every
    batch goes through each model in turn) after one warm-up pass."""
    samples: list[list[float]] = [[] for _ in models]
    chunks = list(batches(inputs, batch_size))
    for model in models:  # warm-up
        run_model(model, chunks[0])
    for _ in range(repeats):
        for chunk in chunks:
            for i, model in enumerate(models):
                t0 = time.perf_counter()
                run_model(model, chunk)
                samples[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(s) for s in samples]


def json_safe(obj: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by strings 'inf' / '-inf' / 'nan'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def summary_lines(report: dict) -> list[str]:
    """The quantize report's totals, model-level error and fallback steps, one line each."""
    t, probe = report["totals"], report["probe"]
    lines = [
        f"layers: {t['layers_quantized']} of {t['layers_total']} quantized, {t['layers_skipped']} kept float",
        f"file size: {t['size_float_bytes']:,} -> {t['size_int8_bytes']:,} bytes ({t['compression']:.2f}x smaller); "
        f"Linear weights: {t['linear_bytes_float']:,} -> {t['linear_bytes_int8']:,} bytes",
    ]
    if probe.get("sqnr_db") is not None:
        lines.append(
            f"model output on {probe['description']} ({probe['compared']}): SQNR {_fmt(probe['sqnr_db'])} dB, "
            f"cosine {_fmt(probe['cosine'], 5)}, max abs err {probe['max_abs_err']:.3g}"
        )
    else:
        lines.append(f"model output: not measured ({probe.get('note', '')})")
    fb = report.get("fallback")
    if fb is not None:
        lines.append(
            f"accuracy fallback to {fb['target_sqnr_db']:g} dB: all int8 gave {fb['initial_sqnr_db']:.2f} dB"
            + "".join(f"; {st['layer']} float -> {st['sqnr_db_after']:.2f} dB" for st in fb["steps"])
        )
    return lines


def to_markdown(report: dict) -> str:
    """The quantize report as Markdown: summary lines, then one row per layer."""
    lines = [
        f"# qlin quantize report: {report['source']}",
        "",
        f"- output: `{report['output']}`",
        f"- config: `{report['config']}`",
        *(f"- {line}" for line in summary_lines(report)),
        "",
        "| layer | weight shape | scale shape | kernel | weight SQNR dB | output SQNR dB | bytes float -> int8 | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["layers"]:
        note = r["reason"] if r["status"] == "skipped" else (r.get("kernel_reason") or "")
        lines.append(
            f"| {r['name'] or '(root)'} | {_fmt(r['weight_shape'])} | {_fmt(r.get('scale_shape'))} | "
            f"{r.get('kernel') or 'float'} | {_fmt(r.get('weight_sqnr_db'))} | {_fmt(r.get('output_sqnr_db'))} | "
            f"{r['bytes_float']} -> {r['bytes_int8']} | {note} |"
        )
    return "\n".join(lines) + "\n"
