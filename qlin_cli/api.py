"""The three jobs of the command line as Python functions that return report dicts:
`quantize_checkpoint`, `inspect_path`, `evaluate_checkpoint`. The CLI only parses and renders.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from .config import PER_CHANNEL, PER_TENSOR, Granularity, QuantConfig
from .errors import ConfigError, InputError
from .kernels import select_kernel
from .qfile import FORMAT, check_output, load_quantized, read_qfile, save_quantized
from .qlinear import QuantizedLinear
from .report import compare_outputs, first_tensor, median_latency_ms, num_samples, run_model, batches
from .sources import check_file, check_source, load_source, load_tensors, read_checkpoint
from .fallback import quantize_to_target
from .swap import Progress, find_linears, quantize_model
from .export import CT_FORMAT, FORMATS, check_output_dir, save_compressed_tensors
from .hf import HF_KIND, hf_probe_inputs

__all__ = ["quantize_checkpoint", "inspect_path", "evaluate_checkpoint", "default_output", "check_device"]

PROBE_SAMPLES = 64


def default_output(source: Path, format: str = "qlin") -> Path:
    """`<stem>.int8.safetensors` beside the source (a folder's whole name is its stem); for
    `format="compressed-tensors"` the folder `<stem>-int8-compressed-tensors`."""
    stem = source.name if source.is_dir() else source.stem
    if format == CT_FORMAT:
        return source.with_name(f"{stem}-int8-compressed-tensors")
    return source.with_name(f"{stem}.int8.safetensors")


def check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: use cpu or cuda")
    return dev


def _probe_inputs(model: nn.Module, inputs_path: Path | None) -> tuple[Any, str]:
    """A probe batch: the first samples of `inputs_path`, or a seeded random normal batch of 8
    rows sized for the first Linear layer."""
    if inputs_path is not None:
        inputs = load_tensors(inputs_path, "inputs")
        n = min(PROBE_SAMPLES, num_samples(inputs))
        return next(batches(inputs, n)), f"{n} samples of {inputs_path.name}"
    tokens = hf_probe_inputs(model)  # a transformers text model takes token ids
    if tokens is not None:
        ids = tokens["input_ids"]
        return tokens, f"random token ids {tuple(ids.shape)} with an all-ones attention mask"
    in_features = find_linears(model)[0][1].in_features
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, in_features, generator=gen), f"a random normal batch (8, {in_features})"


def _layer_rows(records) -> list[dict]:
    rows = []
    for r in records:
        d = r.to_dict()
        d["weight_shape"] = [r.out_features, r.in_features]
        d["scale_shape"] = (
            list(Granularity(r.granularity).scale_shape((r.out_features, r.in_features)))
            if r.status == "quantized" else None
        )
        rows.append(d)
    return rows


@torch.no_grad()
def quantize_checkpoint(
    source_path: str | Path,
    output: str | Path | None = None,
    config: QuantConfig | None = None,
    *,
    model: str | None = None,
    trust_pickle: bool = False,
    inputs: str | Path | None = None,
    calib: str | Path | None = None,
    calib_samples: int | None = None,
    batch_size: int = 32,
    min_sqnr: float | None = None,
    eval_inputs: str | Path | None = None,
    device: str = "cpu",
    force: bool = False,
    format: str = "qlin",
    progress: Progress | None = None,
    calib_progress: Progress | None = None,
) -> dict:
    """Load a float checkpoint (or a Hugging Face model folder), quantize it, write the qlin file
    (or, with `format="compressed-tensors"`, a compressed-tensors model folder) and return the
    report.

    `inputs` is the probe batch for the model-level error; `calib` the calibration data
    (static mode and SmoothQuant need it), of which the first `calib_samples` are used.
    `min_sqnr` keeps the most sensitive layers in float until the output SQNR on `eval_inputs`
    (or on the calibration data) reaches it.
    """
    config = config or QuantConfig()
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    source_path = check_source(source_path)
    output = Path(output) if output is not None else default_output(source_path, format)
    if format == CT_FORMAT:
        if config.smooth is not None:
            raise ConfigError(
                "--format compressed-tensors cannot express SmoothQuant (no per-input-channel factor): drop --smooth"
            )
        check_output_dir(output, force=force, inputs=(source_path, *(Path(p) for p in (inputs, calib, eval_inputs) if p)))
    else:
        check_output(output, force=force, inputs=(source_path,))
    dev = check_device(device)
    if batch_size < 1 or (calib_samples is not None and calib_samples < 1):
        raise ConfigError("--batch-size and --calib-samples must be at least 1")
    if config.needs_calibration and calib is None:
        what = "static mode" if config.mode == "static" else "SmoothQuant (--smooth)"
        raise ConfigError(f"{what} needs calibration data: pass --calib FILE (inputs the model takes)")
    if inputs is not None:
        inputs = check_file(inputs, "inputs")
    if calib_samples is not None and calib is None:
        raise ConfigError("--calib-samples needs --calib FILE")
    if min_sqnr is not None and eval_inputs is None and calib is None:
        raise ConfigError("--min-sqnr measures the model on data: pass --eval-inputs FILE or --calib FILE")
    calib_data = None
    if calib is not None:
        calib_data = load_tensors(calib, "calibration data")
        if calib_samples is not None:
            calib_data = next(batches(calib_data, calib_samples))
        calib_data = _to_device(calib_data, dev)
    source = load_source(source_path, model=model, trust_pickle=trust_pickle)
    float_model = source.model.to(dev)
    if not find_linears(float_model):
        raise InputError(f"{source_path}: the model has no nn.Linear layer to quantize")
    probe, description = _probe_inputs(float_model, inputs)
    probe = _to_device(probe, dev)
    try:
        reference, compared = first_tensor(run_model(float_model, probe))
        reference = reference.clone()
        probe_note = ""
    except InputError as exc:
        if inputs is not None:
            raise
        reference, compared, probe_note = None, None, f"{exc}; pass --inputs FILE to measure it"
    common = dict(calib=calib_data, batch_size=batch_size, device=dev, progress=progress, calib_progress=calib_progress)
    if min_sqnr is None:
        result = quantize_model(float_model, config, **common)
    else:
        data = calib_data if eval_inputs is None else _to_device(load_tensors(eval_inputs, "eval inputs"), dev)
        result = quantize_to_target(float_model, config, min_sqnr_db=min_sqnr, eval_inputs=data, **common)
    probe_report: dict[str, Any] = {"description": description, "compared": compared, "note": probe_note}
    if reference is not None:
        out, _ = first_tensor(run_model(result.model, probe, "int8 model"))
        probe_report.update(compare_outputs(reference, out))
    if format == CT_FORMAT:
        hf_folder = source_path if source.kind.startswith(HF_KIND) else None
        save_compressed_tensors(result, output, force=force, source_dir=hf_folder,
                                source_name=source_path.name, source_sha256=source.sha256)
        size_out = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
    else:
        save_quantized(result, output, force=force, source_name=source_path.name, source_sha256=source.sha256)
        size_out = output.stat().st_size
    rows = _layer_rows(result.layers)
    quantized = result.quantized
    return {
        "source": str(source_path),
        "source_kind": source.kind,
        "output": str(output),
        "format": format,
        "config": result.config.to_dict(),
        "device": str(dev),
        "calibration": None if calib is None else {
            "file": str(calib), "samples": num_samples(calib_data), "batch_size": batch_size,
            # without static layers or SmoothQuant, the data only measures each layer's output SQNR
            "used_for": "calibration" if config.needs_calibration else "measuring the first batch",
        },
        "layers": rows,
        "probe": probe_report,
        "fallback": result.fallback,
        "totals": {
            "layers_total": len(rows),
            "layers_quantized": len(quantized),
            "layers_skipped": len(rows) - len(quantized),
            "linear_bytes_float": sum(r["bytes_float"] for r in rows),
            "linear_bytes_int8": sum(r["bytes_int8"] for r in rows),
            "size_float_bytes": source.size_bytes,
            "size_int8_bytes": size_out,
            "compression": source.size_bytes / size_out,
            "kernels": dict(sorted(Counter(r.kernel for r in quantized).items())),
        },
    }


def _to_device(inputs: Any, dev: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(dev) for k, v in inputs.items()}
    return inputs.to(dev)


def _metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata, or {} for anything that is not one."""
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def inspect_path(
    path: str | Path, *, model: str | None = None, trust_pickle: bool = False, device: str = "cpu",
    verify: bool = False,
) -> dict:
    """Describe a qlin file (metadata, every layer's tensors and this machine's kernel) or a
    float checkpoint (its Linear layers and the scale shape each would get). `verify` also
    recomputes a qlin file's payload sha256 (a mismatch is a FormatError)."""
    path = check_file(path, "file")
    dev = check_device(device)
    is_qlin = _metadata(path).get("format") == FORMAT
    if verify and not is_qlin:
        raise ConfigError(f"--verify checks qlin files; {path} is not one")
    if is_qlin:
        qf = read_qfile(path, verify=verify)
        layers = []
        for e in qf.plan:
            row: dict[str, Any] = {
                "name": e["name"], "status": e["status"], "reason": e.get("reason", ""),
                "weight_shape": [e["out_features"], e["in_features"]], "aliases": e["aliases"],
            }
            if e["status"] == "quantized":
                scale = qf.tensors[f"{e['name']}.weight_scale"]
                zp = qf.tensors[f"{e['name']}.weight_zero_point"]
                choice = select_kernel(
                    request=e["kernel_request"], mode=e["mode"], act_granularity=e["act_granularity"],
                    device=dev, dtype=getattr(torch, e.get("dtype", "float32")),
                    in_features=e["in_features"], out_features=e["out_features"],
                )
                row.update(
                    weight_dtype=str(qf.tensors[f"{e['name']}.weight"].dtype).removeprefix("torch."),
                    scale_shape=list(scale.shape), zero_point_shape=list(zp.shape),
                    granularity=e["granularity"], symmetric=e["symmetric"], mode=e["mode"],
                    act_granularity=e["act_granularity"], kernel_request=e["kernel_request"],
                    scale_min=float(scale.min()), scale_max=float(scale.max()),
                    kernel=choice.name, kernel_reason=choice.reason,
                    batch_invariant=choice.batch_invariant,
                    weight_observer=e.get("weight_observer"), observer=e.get("observer"), smooth=e.get("smooth"),
                )
                if e["mode"] == "static":
                    row.update(
                        input_scale=float(qf.tensors[f"{e['name']}.input_scale"]),
                        input_zero_point=int(qf.tensors[f"{e['name']}.input_zero_point"]),
                    )
            layers.append(row)
        meta = {k: v for k, v in qf.metadata.items() if k not in ("config", "plan")}
        return {
            "path": str(path), "kind": "qlin", "metadata": meta, "config": qf.config.to_dict(),
            "layers": layers, "tensors": len(qf.tensors), "size_bytes": path.stat().st_size,
            "verified": verify,
        }
    if model is not None:
        obj, kind = load_source(path, model=model, trust_pickle=trust_pickle).model, "state dict + --model"
    else:
        obj, kind = read_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        found = [(name, (m.out_features, m.in_features), type(m).__name__) for name, m, _, _ in find_linears(obj)]
        note = "nn.Linear layers of the model"
    else:
        found = [
            (k.removesuffix(".weight"), tuple(v.shape), "2-D weight")
            for k, v in obj.items() if k.endswith("weight") and v.dim() == 2 and v.is_floating_point()
        ]
        note = "2-D float weights of the state dict (Linear or Embedding: pass --model to know)"
    layers = [
        {
            "name": name, "weight_shape": list(shape), "type": typ,
            "scale_shape_per_tensor": list(PER_TENSOR.scale_shape(shape)),
            "scale_shape_per_channel": list(PER_CHANNEL.scale_shape(shape)),
        }
        for name, shape, typ in found
    ]
    return {"path": str(path), "kind": f"float ({kind})", "note": note, "layers": layers,
            "size_bytes": path.stat().st_size}


@torch.no_grad()
def evaluate_checkpoint(
    source_path: str | Path,
    quantized_path: str | Path,
    inputs_path: str | Path,
    labels_path: str | Path | None = None,
    *,
    model: str | None = None,
    trust_pickle: bool = False,
    batch_size: int = 64,
    repeats: int = 5,
    device: str = "cpu",
) -> dict:
    """Run the float and the int8 model on the same inputs; errors, agreement, accuracy,
    latency and sizes."""
    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    dev = check_device(device)
    source = load_source(source_path, model=model, trust_pickle=trust_pickle)
    float_model = source.model.to(dev)
    qpath = check_file(quantized_path, "qlin file")
    int8_model = load_quantized(copy.deepcopy(float_model), qpath, device=dev)
    inputs = load_tensors(inputs_path, "inputs")
    n = num_samples(inputs)
    labels = None
    if labels_path is not None:
        labels = load_tensors(labels_path, "labels")
        if isinstance(labels, dict) or labels.dim() != 1:
            raise InputError(f"labels {labels_path} must be one 1-D tensor of class indices")
        if labels.shape[0] != n:
            raise InputError(f"labels {labels_path} has {labels.shape[0]} entries but the inputs have {n} samples")
    ref_parts, out_parts, compared = [], [], None
    for chunk in batches(inputs, batch_size):
        chunk = _to_device(chunk, dev)
        ref, compared = first_tensor(run_model(float_model, chunk, "float model"))
        out, _ = first_tensor(run_model(int8_model, chunk, "int8 model"))
        ref_parts.append(ref.float().cpu())
        out_parts.append(out.float().cpu())
    reference, output = torch.cat(ref_parts), torch.cat(out_parts)
    report: dict[str, Any] = {"compared": compared, "samples": n, "output_shape": list(output.shape)}
    report.update(compare_outputs(reference, output))
    report["accuracy_float"] = report["accuracy_int8"] = None
    if labels is not None:
        if reference.dim() != 2:
            raise InputError(f"--labels needs (samples, classes) outputs; {compared} has shape {tuple(reference.shape)}")
        report["accuracy_float"] = float((reference.argmax(1) == labels).double().mean())
        report["accuracy_int8"] = float((output.argmax(1) == labels).double().mean())
    t_float, t_int8 = median_latency_ms([float_model, int8_model], _to_device(inputs, dev), batch_size, repeats)
    kernels = Counter(m.kernel.name for m in int8_model.modules() if isinstance(m, QuantizedLinear))
    report.update(
        latency_float_ms=t_float, latency_int8_ms=t_int8, speedup=t_float / t_int8,
        batch_size=batch_size, threads=torch.get_num_threads(),
        size_float_bytes=source.size_bytes, size_int8_bytes=qpath.stat().st_size,
        kernels=dict(sorted(kernels.items())), device=str(dev),
        source_matches=_metadata(qpath).get("source_sha256") == source.sha256,
    )
    return report
