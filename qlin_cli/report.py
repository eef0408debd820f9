"""What quantization gained and lost, as typed reports: `QuantizeReport`, `EvalReport`,
`InspectReport` (a qlin file) and `FloatInspectReport` (a float checkpoint).

Each report has `to_dict()` (JSON-able: the `--json` output and the `--report` file) and lays
itself out as renderer-neutral parts: `title`, `facts()`, `tables()` (`Table`), `summary()` and
`warnings()`. `to_markdown` renders any report; the CLI renders the same parts with rich;
report_html.py draws a quantize report as one HTML page. What a report carries is typed: frozen
records (`Calibration`, `Probe`, `Smoothing`, `InspectRow`; the fallback's and the sensitivities'
from quantize.py), each with the `to_dict()` its JSON shows. What a layer's "note" says is
decided once, in `layer_note`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import QuantConfig
from .data import BUSY_CORES, Timing
from .errors import InputError
from .files import write_atomic
from .kernels import KEPT_FOR_SPEED, KernelChoice, registry
from .primitives import sums_db
from .quantize import EmbeddingResult, Fallback, LayerResult, Sensitivity
from .rounding import PROPAGATES
from .scheme import PER_CHANNEL, PER_TENSOR, LayerScheme, PerGroup

__all__ = [
    "compare_outputs",
    "shown",
    "LINE_CHARS",
    "OutputComparison",
    "json_safe",
    "shrink",
    "Table",
    "layer_note",
    "Calibration",
    "Probe",
    "Smoothing",
    "InspectRow",
    "QuantizeReport",
    "EvalReport",
    "TextEvalReport",
    "InspectReport",
    "FloatInspectReport",
    "to_markdown",
    "report_json",
    "write_report",
]

class OutputComparison:
    """The error of a test output against a reference, gathered batch by batch in memory that
    does not grow with the samples (`add(reference, test)` per batch of `(n, ...)` outputs,
    `metrics()` at the end): SQNR dB, mean per-sample cosine, max abs error, MSE, and for 2-D
    outputs `(N, C)` the top-1 agreement. The numbers are those of the whole outputs compared
    at once, to float rounding: sums of squares and cosines are added up per batch."""

    SLICE = 2**20  # values per float64 temporary

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None  # (samples so far, ...)
        self.signal = self.noise = self.squares = self.cosines = self.max_abs = 0.0
        self.values = self.agree = 0

    def add(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        ref, out = reference.detach().float(), test.detach().float()
        if ref.shape != out.shape:
            raise InputError(f"outputs differ in shape: {tuple(ref.shape)} vs {tuple(out.shape)}")
        if self.shape is not None and tuple(ref.shape[1:]) != self.shape[1:]:
            raise InputError(f"the outputs change shape between batches: {self.shape[1:]} per sample, then "
                             f"{tuple(ref.shape[1:])}")
        n = ref.shape[0]
        self.shape = (n + (self.shape[0] if self.shape else 0), *ref.shape[1:])
        flat_r, flat_o = ref.reshape(n, -1), out.reshape(n, -1)
        width = flat_r.shape[1]
        rows = max(1, self.SLICE // max(width, 1))  # float64 copies of a few samples at a time,
        cols = max(1, self.SLICE // rows)  # or of a part of one (a sample of 1024 tokens' logits)
        for i in range(0, n, rows):
            dot = norm_r = norm_o = torch.zeros(min(rows, n - i), dtype=torch.float64)
            for c in range(0, width, cols):
                r, o = flat_r[i : i + rows, c : c + cols].double(), flat_o[i : i + rows, c : c + cols].double()
                dot, norm_r, norm_o = dot + (r * o).sum(1), norm_r + (r * r).sum(1), norm_o + (o * o).sum(1)
                self.squares += float((r - o).pow_(2).sum())
            # cosine_similarity's formula (eps 1e-12), its sums taken a part at a time
            self.cosines += float((dot / (norm_r * norm_o).clamp_min(1e-24).sqrt()).sum())
        diff = ref - out
        self.signal += float(torch.linalg.vector_norm(ref)) ** 2  # float32 norms, as sqnr_db
        self.noise += float(torch.linalg.vector_norm(diff)) ** 2
        if diff.numel():
            self.max_abs = max(self.max_abs, float(torch.linalg.vector_norm(diff, float("inf"))))  # no |diff| copy
        self.values += diff.numel()
        if ref.dim() == 2:
            self.agree += int((ref.argmax(-1) == out.argmax(-1)).sum())

    def metrics(self) -> dict[str, float | None]:
        samples = self.shape[0] if self.shape else 0
        return {
            "sqnr_db": sums_db(self.signal, self.noise),
            "cosine": self.cosines / samples if samples else math.nan,
            "max_abs_err": self.max_abs,
            "mse": self.squares / self.values if self.values else 0.0,
            "top1_agreement": self.agree / samples if self.shape is not None and len(self.shape) == 2 and samples else None,
        }


def compare_outputs(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float | None]:
    """Error of `test` against `reference` `(N, ...)` (OutputComparison in one batch): SQNR dB,
    mean per-sample cosine, max abs error, MSE, and for 2-D outputs `(N, C)` the top-1 agreement."""
    comparison = OutputComparison()
    comparison.add(reference, test)
    return comparison.metrics()


def json_safe(obj: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by strings 'inf' / '-inf' / 'nan'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def fmt(value: Any, digits: int = 2) -> str:
    """A cell: "-" for None, fixed digits for floats, "(a, b)" for shapes."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def shrink(before: int, after: int) -> str:
    """How a size changed, in words: "3.75x smaller", or "did not shrink: 1.14x larger"."""
    if after < before:
        return f"{before / after:.2f}x smaller"
    if after == before:
        return "did not shrink: the same size"
    return f"did not shrink: {after / max(before, 1):.2f}x larger"


SHOWN_CHARS = 300  # the most characters of one value a person is shown (JSON keeps every one)
LINE_CHARS = 1000  # of one line (a fact, a summary line or a warning, which may hold a value cut to SHOWN_CHARS)


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` as a person is shown it: whole up to `limit` characters, else its start and how
    long it is. Names, metadata and reasons come from files, and a file may hold a 50 MB string
    (rich took minutes to lay one out); `--json` keeps them whole."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters; --json shows all)"


@dataclass(frozen=True)
class Table:
    """A table as both renderers draw it (Markdown here, rich in the CLI): cells are text."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: frozenset[str] = frozenset()  # columns aligned right

    def shown(self) -> "Table":
        """This table with its title and every cell cut to `LINE_CHARS` (a cell may hold a value
        its report cut to `SHOWN_CHARS`)."""
        return Table(shown(self.title, LINE_CHARS), self.columns,
                     tuple(tuple(shown(c, LINE_CHARS) for c in row) for row in self.rows), self.numeric)


def layer_note(status: str, reason: str, choice: KernelChoice | None) -> str:
    """The one "note" of a layer in every table: why it is float; for a quantized layer how its
    function was captured (an nn.Linear subclass), why its kernel is not the one asked for (a
    fallback) or computes in float, and whether its rows depend on the batch."""
    if status != "quantized":
        return reason
    parts = [reason] if reason else []
    if choice is not None and (choice.fallback or registry.get(choice.name).float_weights):
        parts.append(choice.reason)
    if choice is not None and not choice.batch_invariant:
        parts.append("batch-dependent")
    return "; ".join(parts)


class _Report:
    """The parts every report lays out; see the module docstring."""

    title: str = ""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def facts(self) -> list[str]:
        return []

    def tables(self) -> list[Table]:
        return []

    def summary(self) -> list[str]:
        return []

    def warnings(self) -> list[str]:
        return []


@dataclass(frozen=True)
class Calibration:
    """The data a quantize run calibrated on (static ranges, SmoothQuant factors, each layer's
    output SQNR)."""

    file: str | None  # the `calib` or `calib_text` file; None: the probe
    samples: int
    batch_size: int
    used_for: str  # "calibration", SmoothQuant factors from the probe, or "measuring the first batch"
    text: str | None = None  # `calib_text`: what the text became (tokens, windows or lines)

    def to_dict(self) -> dict[str, Any]:
        text = {} if self.text is None else {"text": self.text}
        return {"file": self.file, "samples": self.samples, "batch_size": self.batch_size, **text,
                "used_for": self.used_for}


@dataclass(frozen=True)
class Probe:
    """The model-level error: the float and the int8 model on the probe batch."""

    description: str  # what the probe batch is
    compared: str | None  # where in the model's output the compared tensor was found
    note: str  # why it was not measured ("" when it was)
    metrics: dict[str, float | None] | None = None  # compare_outputs, when measured

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "compared": self.compared, "note": self.note, **(self.metrics or {})}


@dataclass(frozen=True)
class Smoothing:
    """SmoothQuant in a quantize run."""

    alpha: tuple[float, ...]  # the alphas used, ascending
    layers: int  # layers smoothed
    default: int  # of them, by qlin's default (not asked for)
    data: str  # what the factors came from
    folded: int | None = None  # compressed-tensors: layers folded into a norm (else None)

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": list(self.alpha), "layers": self.layers, "default": self.default, "data": self.data,
                "folded": self.folded}


def _row_dict(r: LayerResult) -> dict[str, Any]:
    """A quantize report's layer row: the result's keys, the weight shape `(out, in)` and the
    scale shape its scheme gives."""
    shape = (r.plan.out_features, r.plan.in_features)
    scheme = r.plan.scheme
    return {**r.to_dict(), "weight_shape": list(shape),
            "scale_shape": None if scheme is None else list(scheme.granularity.scale_shape(shape))}


@dataclass
class QuantizeReport(_Report):
    """What `qlin quantize` did: the layers, the model-level error on a probe, the sizes."""

    source: str
    source_kind: str
    output: str
    format: str
    config: QuantConfig
    device: str
    calibration: Calibration | None
    layers: tuple[LayerResult, ...]
    probe: Probe
    fallback: Fallback | None  # --min-sqnr
    size_float_bytes: int
    size_int8_bytes: int
    notes: tuple[str, ...] = ()  # warnings, e.g. a skip pattern that matches no layer
    sensitivity: Sensitivity | None = None  # --min-sqnr or --sensitivity (the ranking: with --sensitivity)
    smoothing: Smoothing | None = None
    embeddings: tuple[EmbeddingResult, ...] = ()  # with `embeddings`: one per nn.Embedding
    # what each layer's calibration statistics come from (block by block: sequential.PROPAGATION_NOTES)
    statistics_from: str = PROPAGATES

    @property
    def title(self) -> str:
        return f"qlin quantize {self.source} -> {self.output}"

    def totals(self) -> dict[str, Any]:
        quantized = [r for r in self.layers if r.status == "quantized"]
        kernels: dict[str, int] = {}
        for r in quantized:
            kernels[r.kernel] = kernels.get(r.kernel, 0) + 1
        return {
            "layers_total": len(self.layers),
            "layers_quantized": len(quantized),
            "layers_skipped": len(self.layers) - len(quantized),
            "linear_bytes_float": sum(r.bytes_float for r in self.layers),
            "linear_bytes_int8": sum(r.bytes_int8 for r in self.layers),
            "size_float_bytes": self.size_float_bytes,
            "size_int8_bytes": self.size_int8_bytes,
            "compression": self.size_float_bytes / self.size_int8_bytes,
            "kernels": dict(sorted(kernels.items())),
            "embeddings_quantized": sum(e.entry.quantized for e in self.embeddings),
            "embedding_bytes_float": sum(e.bytes_float for e in self.embeddings),
            "embedding_bytes_int8": sum(e.bytes_int8 for e in self.embeddings),
        }

    def _ranking(self) -> Sensitivity | None:
        """The sensitivities when their ranking was asked for (--sensitivity)."""
        s = self.sensitivity
        return s if s is not None and s.ranking is not None else None

    def sensitivity_db(self) -> dict[str, float]:
        """Each measured layer's latest sensitivity (dB) by name: what the fallback went by."""
        return {} if self.sensitivity is None else self.sensitivity.by_layer()

    def to_dict(self) -> dict[str, Any]:
        fallback = None if self.fallback is None else {**self.fallback.to_dict(), "sensitivity_db": self.sensitivity_db()}
        ranking = self._ranking()
        return {
            "source": self.source, "source_kind": self.source_kind, "output": self.output, "format": self.format,
            "config": self.config.to_dict(), "device": self.device,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "layers": [_row_dict(r) for r in self.layers], "probe": self.probe.to_dict(), "fallback": fallback,
            "smoothing": None if self.smoothing is None else self.smoothing.to_dict(),
            "embeddings": [e.to_dict() for e in self.embeddings],
            **({} if ranking is None else {"sensitivity": ranking.to_dict()}),
            "statistics_from": self.statistics_from, "totals": self.totals(), "warnings": list(self.notes),
        }

    def tables(self) -> list[Table]:
        static = any(r.plan.scheme is not None and r.plan.scheme.static for r in self.layers)
        low_bit = any(r.plan.scheme is not None and r.plan.scheme.bits != 8 for r in self.layers)
        calibrated = self.calibration is not None
        rounded = self.rounded()
        cols = ["layer", "weight shape", "scale shape"] + (["bits"] if low_bit else []) + ["kernel"]
        cols += ["rounding", "weight SQNR dB (rtn)"] if rounded else []
        cols += ["weight SQNR dB"]
        cols += ["output SQNR dB (rtn)"] if rounded and calibrated else []
        cols += ["output SQNR dB"] if calibrated else []
        cols += ["input range", "input scale"] if static else []
        cols += ["bytes float -> int8", "note"]
        rows = []
        for r in self.layers:
            d = _row_dict(r)
            cells = [r.name or "(root)", fmt(d["weight_shape"]), fmt(d["scale_shape"])]
            cells += [str(r.plan.scheme.bits) if r.plan.scheme is not None else "-"] if low_bit else []
            cells += [r.kernel or "float"]
            if rounded:  # what round-to-nearest gave the same layer, beside what its method gave
                cells += [r.rounding or "-", fmt(d.get("rtn_weight_sqnr_db", d["weight_sqnr_db"]))]
            cells += [fmt(d["weight_sqnr_db"])]  # from the row: an exact layer's infinite SQNR reads 999
            cells += [fmt(d.get("rtn_output_sqnr_db", d["output_sqnr_db"]))] if rounded and calibrated else []
            cells += [fmt(d["output_sqnr_db"])] if calibrated else []
            if static:
                rng = r.input_range
                cells += [f"[{rng[0]:.3g}, {rng[1]:.3g}]" if rng else "-",
                          f"{r.input_scale:.3g} (z={r.input_zero_point})" if r.input_scale is not None else "-"]
            note = layer_note(r.status, r.plan.reason, r.choice)
            rows.append((*cells, f"{r.bytes_float:,} -> {r.bytes_int8:,}", note))
        for e in self.embeddings:  # the same columns: an int8 table per row is weight-only, gathered
            d, n = e.to_dict(), e.entry.num_embeddings
            cells = [e.entry.name, fmt([n, e.entry.embedding_dim]), fmt([n]) if e.entry.quantized else "-"]
            cells += ["8" if e.entry.quantized else "-"] if low_bit else []
            cells += ["gather" if e.entry.quantized else "float"]
            cells += ["rtn" if e.entry.quantized else "-", fmt(d["weight_sqnr_db"])] if rounded else []
            cells += [fmt(d["weight_sqnr_db"])]
            cells += ["-"] if rounded and calibrated else []
            cells += ["-"] if calibrated else []
            cells += ["-", "-"] if static else []
            note = "nn.Embedding, int8 per row" if e.entry.quantized else f"nn.Embedding: {e.entry.reason}"
            rows.append((*cells, f"{e.bytes_float:,} -> {e.bytes_int8:,}", note))
        numeric = frozenset(c for c in cols if "SQNR" in c or "bytes" in c or "input" in c)
        tables = [Table(self.title, tuple(cols), tuple(rows), numeric)]
        s = self._ranking()
        if s is not None:
            title = (f"sensitivity on {s.data}: the model's output SQNR with only this layer in int8, most "
                     f"sensitive first (all layers in int8: {fmt(s.all_int8_sqnr_db)} dB)")
            moved = {st.layer: st.to for st in (() if self.fallback is None else self.fallback.steps)}
            notes = {"float": "kept float by --min-sqnr", "8-bit": "widened to 8 bits by --min-sqnr"}
            rows = tuple((r.layer or "(root)", fmt(r.alone_sqnr_db), notes.get(moved.get(r.layer), ""))
                         for r in s.ranking)
            tables.append(Table(title, ("layer", "output SQNR dB, alone", "note"), rows, frozenset({"output SQNR dB, alone"})))
        return tables

    def rounded(self) -> bool:
        """Whether any layer was rounded otherwise than to nearest (GPTQ, AWQ): the table then
        shows each layer's method and what round-to-nearest gave it."""
        return any(r.rounding not in (None, "rtn") for r in self.layers)

    def summary(self) -> list[str]:
        """Totals, the model-level error and the fallback steps, one line each."""
        t, probe = self.totals(), self.probe
        size = shrink(t["size_float_bytes"], t["size_int8_bytes"])
        lines = [
            f"layers: {t['layers_quantized']} of {t['layers_total']} quantized, {t['layers_skipped']} kept float",
            f"file size: {t['size_float_bytes']:,} -> {t['size_int8_bytes']:,} bytes ({size}); "
            f"Linear weights: {t['linear_bytes_float']:,} -> {t['linear_bytes_int8']:,} bytes"
            + (f"; embeddings ({t['embeddings_quantized']} of {len(self.embeddings)} int8 per row): "
               f"{t['embedding_bytes_float']:,} -> {t['embedding_bytes_int8']:,} bytes" if self.embeddings else ""),
        ]
        m = probe.metrics
        if m is not None:
            lines.append(
                f"model output on {probe.description} ({probe.compared}): SQNR {fmt(m['sqnr_db'])} dB, "
                f"cosine {fmt(m['cosine'], 5)}, max abs err {m['max_abs_err']:.3g}"
            )
        else:
            lines.append(f"model output: not measured ({probe.note})")
        sm = self.smoothing
        if sm is not None:
            alpha = ", ".join(f"{a:g}" for a in sm.alpha)
            by_default = f", {sm.default} by default (--no-smooth turns it off)" if sm.default else ""
            line = f"SmoothQuant alpha {alpha} on {sm.layers} layers{by_default}, factors from {sm.data}"
            if sm.folded is not None:
                line += (f"; compressed-tensors: folded into the norm before {sm.folded} of them, the other "
                         f"{sm.layers - sm.folded} exported without it (see each layer's note)")
            lines.append(line)
        if self.rounded():
            methods = sorted({r.rounding for r in self.layers if r.rounding not in (None, "rtn")})
            lines.append(f"rounding {', '.join(methods)}: calibration statistics from the {self.statistics_from}")
        fb = self.fallback
        if fb is not None:
            lines.append(
                f"accuracy fallback to {fb.target_sqnr_db:g} dB: all int8 gave {fb.initial_sqnr_db:.2f} dB"
                + "".join(f"; {st.layer} {st.to} -> {st.sqnr_db_after:.2f} dB" for st in fb.steps)
            )
        return lines

    def warnings(self) -> list[str]:
        """The notes (e.g. a skip pattern that matches no layer), and a note when `auto` kept layers
        in float for speed (the file is then barely smaller)."""
        lines = [f"warning: {n}" for n in self.notes]
        slow = [r for r in self.layers if r.status != "quantized" and r.plan.reason.startswith(KEPT_FOR_SPEED)]
        if not slow:
            return lines
        return lines + [f"note: {len(slow)} of {len(self.layers)} Linear layers are too small for int8 to be faster than "
                f"float and were kept float (kernel auto); an explicit --kernel (e.g. fbgemm) quantizes every layer"]


@dataclass
class EvalReport(_Report):
    """The float and the int8 model on the same inputs: errors, agreement, accuracy, latency."""

    source: str  # the two files compared (named in the title, not in to_dict)
    quantized: str
    compared: str  # where in the model's output the compared tensor was found
    samples: int
    output_shape: list[int]
    metrics: dict[str, float | None]  # compare_outputs
    accuracy_float: float | None
    accuracy_int8: float | None
    timing: Timing  # (float, int8) latencies, the batch size timed, the other processes' load
    threads: int
    size_float_bytes: int
    size_int8_bytes: int
    kernels: dict[str, int]
    device: str
    source_matches: bool  # the qlin file records this source's sha256
    compile_s: dict[str, float] | None = None  # with --compile: the first call of each model (it compiles)

    @property
    def title(self) -> str:
        return f"qlin eval: {self.source} vs {self.quantized} on {self.samples} samples ({self.compared})"

    def latency(self, which: int) -> dict[str, float]:
        """min, median and max ms of one forward of model `which` (0 float, 1 int8)."""
        return dict(zip(("min", "median", "max"), self.timing.latencies_ms[which]))

    @property
    def speedup(self) -> float:
        """The float model's median latency over the int8 model's."""
        return self.timing.latencies_ms[0][1] / self.timing.latencies_ms[1][1]

    def to_dict(self) -> dict[str, Any]:
        t = self.timing
        return {
            "compared": self.compared, "samples": self.samples, "output_shape": self.output_shape, **self.metrics,
            "accuracy_float": self.accuracy_float, "accuracy_int8": self.accuracy_int8,
            "latency_float_ms": self.latency(0)["median"], "latency_int8_ms": self.latency(1)["median"],
            "speedup": self.speedup, "batch_size": t.batch_size,
            "latency_ms": {"float": self.latency(0), "int8": self.latency(1)}, "timed_forwards": t.forwards,
            "other_load_cores": t.other_load_cores,
            "threads": self.threads, "size_float_bytes": self.size_float_bytes,
            "size_int8_bytes": self.size_int8_bytes, "kernels": self.kernels, "device": self.device,
            "source_matches": self.source_matches,
            **({} if self.compile_s is None else {"compile_s": self.compile_s}),
        }

    def tables(self) -> list[Table]:
        m, t = self.metrics, self.timing

        def spread(which: int) -> str:
            return " / ".join(f"{v:.3f}" for v in t.latencies_ms[which])

        rows = (
            ("SQNR dB", fmt(m["sqnr_db"])), ("cosine (mean per sample)", fmt(m["cosine"], 6)),
            ("max abs error", f"{m['max_abs_err']:.4g}"), ("MSE", f"{m['mse']:.4g}"),
            ("top-1 agreement", fmt(m["top1_agreement"], 4)),
            ("accuracy float", fmt(self.accuracy_float, 4)), ("accuracy int8", fmt(self.accuracy_int8, 4)),
            (f"latency float ms, min / median / max (batch {t.batch_size}, {self.threads} threads, "
             f"{t.forwards} forwards)", spread(0)),
            ("latency int8 ms, min / median / max", spread(1)),
            ("speedup (medians)", f"{self.speedup:.2f}x"),
            ("size float bytes", f"{self.size_float_bytes:,}"),
            ("size int8 bytes", f"{self.size_int8_bytes:,} ({shrink(self.size_float_bytes, self.size_int8_bytes)})"),
            ("kernels", ", ".join(f"{k} x{v}" for k, v in self.kernels.items())),
            *(() if self.compile_s is None else (
                ("compile s (first call, not timed above)", f"float {self.compile_s['float']:.1f}, int8 {self.compile_s['int8']:.1f}"),
            )),
        )
        return [Table(self.title, ("metric", "value"), rows, frozenset({"value"}))]

    def warnings(self) -> list[str]:
        notes = [] if self.source_matches else ["note: the qlin file records another source file (sha256 differs)"]
        busy = self.timing.other_load_cores
        if busy is not None and busy >= BUSY_CORES:
            notes.append(f"warning: other processes used {busy:.2f} CPU cores on average while qlin timed the models: "
                         "the latencies are slower and noisier than this machine's own")
        return notes


@dataclass
class TextEvalReport(_Report):
    """The float and the int8 model on a text (`qlin eval --text`): for a causal LM the
    perplexity of each on the same windows and the top-1 next-token agreement; for an encoder
    the cosine of each line's embedding and the nearest-neighbour agreement among the lines."""

    source: str
    quantized: str
    text: str
    kind: str  # "causal-lm" or "encoder"
    tokens: int
    samples: int  # windows (causal LM) or lines (encoder)
    max_length: int
    stride: int | None  # causal LM
    scored_tokens: int | None  # causal LM: targets scored
    truncated_lines: int | None  # encoder: lines longer than max_length
    metrics: dict[str, float]  # text.lm_scores or text.embedding_scores
    seconds_float: float  # wall time of each model over the whole text
    seconds_int8: float
    batch_size: int
    threads: int
    size_float_bytes: int
    size_int8_bytes: int
    kernels: dict[str, int]
    device: str
    source_matches: bool

    @property
    def title(self) -> str:
        what = f"{self.samples} windows of {self.max_length} tokens, stride {self.stride}" if self.kind == "causal-lm" \
            else f"{self.samples} lines"
        return f"qlin eval: {self.source} vs {self.quantized} on {self.text} ({self.tokens:,} tokens, {what})"

    def to_dict(self) -> dict[str, Any]:
        shape = {"windows": self.samples, "stride": self.stride, "scored_tokens": self.scored_tokens} \
            if self.kind == "causal-lm" else {"lines": self.samples, "truncated_lines": self.truncated_lines}
        return {
            "text": self.text, "model_kind": self.kind, "tokens": self.tokens, "max_length": self.max_length,
            **shape, **self.metrics, "seconds_float": self.seconds_float, "seconds_int8": self.seconds_int8,
            "batch_size": self.batch_size, "threads": self.threads, "size_float_bytes": self.size_float_bytes,
            "size_int8_bytes": self.size_int8_bytes, "kernels": self.kernels, "device": self.device,
            "source_matches": self.source_matches,
        }

    def tables(self) -> list[Table]:
        m = self.metrics
        if self.kind == "causal-lm":
            rows: tuple[tuple[str, str], ...] = (
                (f"perplexity float ({self.scored_tokens:,} tokens scored)", fmt(m["perplexity_float"], 3)),
                ("perplexity int8", fmt(m["perplexity_int8"], 3)),
                ("perplexity int8 / float", fmt(m["perplexity_ratio"], 4)),
                ("top-1 next-token agreement", fmt(m["next_token_agreement"], 4)),
            )
        else:
            rows = (
                ("embedding cosine, mean over lines", fmt(m["embedding_cosine_mean"], 6)),
                ("embedding cosine, min", fmt(m["embedding_cosine_min"], 6)),
                ("nearest-neighbour agreement", fmt(m["neighbour_agreement"], 4)),
            )
        rows += (
            (f"time float s (batch {self.batch_size}, {self.threads} threads)", fmt(self.seconds_float, 3)),
            ("time int8 s", fmt(self.seconds_int8, 3)),
            ("size float bytes", f"{self.size_float_bytes:,}"), ("size int8 bytes", f"{self.size_int8_bytes:,}"),
            ("kernels", ", ".join(f"{k} x{v}" for k, v in self.kernels.items())),
        )
        return [Table(self.title, ("metric", "value"), rows, frozenset({"value"}))]

    def warnings(self) -> list[str]:
        notes = [] if self.source_matches else ["note: the qlin file records another source file (sha256 differs)"]
        if self.truncated_lines:
            notes.append(f"note: {self.truncated_lines} of {self.samples} lines cut to {self.max_length} tokens")
        return notes


@dataclass(frozen=True)
class InspectRow:
    """One layer of a quantized model as `qlin inspect` shows it: a Linear layer (its plan entry;
    when quantized, its tensors, scheme and this machine's kernel) or an embedding table
    (`embedding`: when quantized, int8 per row, weight-only, gathered)."""

    name: str
    status: str
    reason: str
    weight_shape: tuple[int, int]  # (out, in); an embedding's (num_embeddings, embedding_dim)
    aliases: tuple[str, ...] = ()
    embedding: bool = False
    # quantized: the weight's stored dtype, the scale's and zero point's shapes, the scale's range
    weight_dtype: str | None = None
    scale_shape: tuple[int, ...] | None = None
    zero_point_shape: tuple[int, ...] | None = None
    scale_min: float | None = None
    scale_max: float | None = None
    scheme: LayerScheme | None = None  # a quantized Linear layer's
    # the kernel it runs on here, why, and whether its rows depend on the batch (an embedding: gather)
    choice: KernelChoice | None = None
    input_scale: float | None = None  # static
    input_zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.weight_dtype is not None

    @property
    def kernel(self) -> str | None:
        return None if self.choice is None else self.choice.name

    @property
    def scheme_keys(self) -> dict[str, Any]:
        """The scheme's keys as the table reads them (an int8 table: channel, symmetric, weight-only)."""
        if self.scheme is not None:
            return self.scheme.to_dict()
        return {"granularity": "channel", "symmetric": True, "mode": "weight-only", "smooth": None, "observer": None}

    def to_dict(self) -> dict[str, Any]:
        head = {"name": self.name, "status": self.status, "reason": self.reason,
                **({"kind": "embedding"} if self.embedding else {}),
                "weight_shape": list(self.weight_shape), "aliases": list(self.aliases)}
        if not self.quantized:
            return head
        tensors = {"weight_dtype": self.weight_dtype, "scale_shape": list(self.scale_shape),
                   "zero_point_shape": None if self.zero_point_shape is None else list(self.zero_point_shape)}
        c = self.choice
        kernel = {"kernel": c.name, "kernel_reason": c.reason, "batch_invariant": c.batch_invariant}
        scale = {"scale_min": self.scale_min, "scale_max": self.scale_max}
        if self.embedding:
            return {**head, **tensors, "granularity": "channel", "symmetric": True, **scale, **kernel,
                    "mode": "weight-only", "smooth": None}
        static = {} if self.input_scale is None else {"input_scale": self.input_scale,
                                                      "input_zero_point": self.input_zero_point}
        return {**head, **tensors, **self.scheme.to_dict(), **scale, **kernel, **static}


@dataclass
class InspectReport(_Report):
    """A quantized model qlin wrote (a qlin file or compressed-tensors folder): its metadata,
    config, and every layer's tensors, scheme and kernel here."""

    path: str
    metadata: dict[str, str]  # all but config and plan
    config: QuantConfig
    layers: list[InspectRow]
    tensors: int
    size_bytes: int
    verified: bool
    kind: str = "qlin"  # or "compressed-tensors": a folder qlin wrote, read back through its plan

    @property
    def title(self) -> str:
        what = "" if self.kind == "qlin" else f" ({self.kind} folder qlin wrote)"
        tables = sum(r.embedding for r in self.layers)
        return f"{self.path}{what}: {len(self.layers) - tables} Linear layers" + (f", {tables} embeddings" if tables else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "kind": self.kind, "metadata": self.metadata, "config": self.config.to_dict(),
            "layers": [r.to_dict() for r in self.layers], "tensors": self.tensors, "size_bytes": self.size_bytes, "verified": self.verified,
        }

    def facts(self) -> list[str]:
        return [*(f"{k}: {shown(v)}" for k, v in self.metadata.items()), f"config: {json.dumps(self.config.to_dict())}"]

    def tables(self) -> list[Table]:
        cols = ("layer", "weight", "scale shape", "zero point shape", "granularity", "symmetric",
                "scale min", "scale max", "kernel here", "note")
        rows = []
        for r in self.layers:
            name = r.name or "(root)"
            if r.status != "quantized":
                why = shown(r.reason if r.reason.startswith(KEPT_FOR_SPEED) else f"float: {r.reason}")
                rows.append((name, fmt(r.weight_shape), *["-"] * 7, why))
                continue
            s = r.scheme_keys
            notes = [layer_note(r.status, r.reason, None if r.embedding else r.choice)]
            if r.embedding:
                notes.append("nn.Embedding, int8 per row")
            if s["mode"] == "static":
                notes.append(f"static input scale {r.input_scale:.3g}, zero point {r.input_zero_point} ({s['observer']})")
            rounding = s.get("rounding", "rtn")
            if s["smooth"] is not None:
                notes.append(f"AWQ factors per layer (alpha {s['smooth']})" if "awq" in rounding
                             else f"SmoothQuant alpha {s['smooth']}")
            if rounding != "rtn":
                gptq = (f" (damp {s['gptq_damp']:g}, block {s['gptq_block_size']}"
                        + (", act-order" if s["act_order"] else "") + ")") if "gptq" in rounding else ""
                notes.append(f"rounding {rounding}{gptq}")
            rows.append((
                name, f"{r.weight_dtype} {fmt(r.weight_shape)}", fmt(r.scale_shape),
                fmt(r.zero_point_shape), s["granularity"],
                fmt(s["symmetric"]), f"{r.scale_min:.3g}", f"{r.scale_max:.3g}", r.kernel, "; ".join(n for n in notes if n),
            ))
        return [Table(self.title, cols, tuple(rows))]

    def summary(self) -> list[str]:
        return [f"payload sha256 verified: {self.metadata['payload_sha256']}"] if self.verified else []


@dataclass
class FloatInspectReport(_Report):
    """A float checkpoint: its Linear layers (or 2-D float weights) and the scale shape each
    would get per tensor and per channel."""

    path: str
    kind: str
    note: str
    layers: list[tuple[str, tuple[int, ...], str]]  # (name, weight shape (out, in), type)
    size_bytes: int
    group_size: int | None = None  # also list the per-group scale shape (out, ceil(in / G))

    @property
    def title(self) -> str:
        return f"{self.path}: {self.kind}, {self.note}"

    def _shapes(self, shape: tuple[int, ...]) -> dict[str, list[int]]:
        out = {"scale_shape_per_tensor": list(PER_TENSOR.scale_shape(shape)),
               "scale_shape_per_channel": list(PER_CHANNEL.scale_shape(shape))}
        if self.group_size is not None:
            out["scale_shape_per_group"] = list(PerGroup(self.group_size).scale_shape(shape))
        return out

    def to_dict(self) -> dict[str, Any]:
        layers = [{"name": name, "weight_shape": list(shape), "type": typ, **self._shapes(shape)}
                  for name, shape, typ in self.layers]
        return {"path": self.path, "kind": self.kind, "note": self.note, "layers": layers, "size_bytes": self.size_bytes,
                "group_size": self.group_size}

    def tables(self) -> list[Table]:
        rows = tuple((name or "(root)", fmt(shape), *(fmt(v) for v in self._shapes(shape).values()))
                     for name, shape, _ in self.layers)
        cols = ("layer", "weight shape", "scale shape per tensor", "scale shape per channel")
        if self.group_size is not None:
            cols += (f"scale shape per group of {self.group_size}",)
        return [Table(self.title, cols, rows)]


def _markdown_table(t: Table) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    return [
        f"| {' | '.join(t.columns)} |",
        "|" + "|".join("---:" if c in t.numeric else "---" for c in t.columns) + "|",
        *(f"| {' | '.join(cell(c) for c in row)} |" for row in t.rows),
    ]


def to_markdown(report: _Report) -> str:
    """Any report as Markdown: the title, its facts, its tables, its summary and warnings."""
    lines = [f"# {shown(report.title)}", ""]
    if report.facts():
        lines += [*(f"- {shown(line, LINE_CHARS)}" for line in report.facts()), ""]
    for t in report.tables():
        lines += [*_markdown_table(t.shown()), ""]
    lines += [f"- {shown(line, LINE_CHARS)}" for line in (*report.summary(), *report.warnings())]
    return "\n".join(lines).rstrip("\n") + "\n"


def report_json(report: _Report) -> str:
    """The report as the JSON text `--json` prints and `--report` writes."""
    return json.dumps(json_safe(report.to_dict()), indent=2) + "\n"


def write_report(report: _Report, path: Path, *, force: bool) -> tuple[Path, ...]:
    """Write the report as JSON at `path` and as Markdown beside it (`.md`), atomically (an HTML
    page instead: report_html.write_html)."""
    md = path.with_suffix(".md")
    write_atomic(path, report_json(report).encode(), force=force)
    write_atomic(md, to_markdown(report).encode("utf-8", "surrogateescape"), force=force)  # file names as given
    return path, md
