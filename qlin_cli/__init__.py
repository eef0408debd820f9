"""qlin: post-training int8 quantization of the nn.Linear layers of a PyTorch model.

    from qlin_cli import QuantConfig, quantize_model, save_quantized, load_quantized, empty_weights

    result = quantize_model(model, QuantConfig(mode="dynamic"))   # swaps layers in place
    save_quantized(result, "model.int8.safetensors")
    with empty_weights():                       # a skeleton: no float weights allocated
        skeleton = build_float_model()
    int8_model = load_quantized(skeleton, "model.int8.safetensors")
"""

__version__ = "0.1.0"

# The public names load on first use (PEP 562), so that `qlin` can start, and be interrupted,
# before torch is imported.
_EXPORTS = {
    "Granularity": "scheme", "PER_TENSOR": "scheme", "PER_CHANNEL": "scheme", "PER_TOKEN": "scheme",
    "LayerScheme": "scheme", "QuantConfig": "config",
    "QlinError": "errors", "QuantizedLinear": "qlinear", "QuantizeResult": "quantize",
    "quantize_model": "quantize", "save_quantized": "qfile", "load_quantized": "qfile", "read_qfile": "qfile",
    "empty_weights": "qfile",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qlin_cli' has no attribute {name!r}")


__all__ = [
    "__version__",
    "Granularity",
    "PER_TENSOR",
    "PER_CHANNEL",
    "PER_TOKEN",
    "LayerScheme",
    "QuantConfig",
    "QlinError",
    "QuantizedLinear",
    "QuantizeResult",
    "quantize_model",
    "save_quantized",
    "load_quantized",
    "empty_weights",
    "read_qfile",
]
