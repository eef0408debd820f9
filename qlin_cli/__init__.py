"""qlin: post-training int8 quantization of the nn.Linear layers of a PyTorch model.

    from qlin_cli import QuantConfig, quantize_model, save_quantized, load_quantized

    result = quantize_model(model, QuantConfig(mode="dynamic"))   # swaps layers in place
    save_quantized(result, "model.int8.safetensors")
    int8_model = load_quantized(build_float_model(), "model.int8.safetensors")
"""

__version__ = "0.1.0"

from .config import PER_CHANNEL, PER_TENSOR, Granularity, QuantConfig
from .errors import QlinError
from .qfile import load_quantized, read_qfile, save_quantized
from .qlinear import QuantizedLinear
from .swap import QuantizeResult, quantize_model

__all__ = [
    "__version__",
    "Granularity",
    "PER_TENSOR",
    "PER_CHANNEL",
    "QuantConfig",
    "QlinError",
    "QuantizedLinear",
    "QuantizeResult",
    "quantize_model",
    "save_quantized",
    "load_quantized",
    "read_qfile",
]
