"""The kernels: one room (module) per kernel, each registered by name (registry.py), and the
choice and packing that read them (select.py).

Kernels (weights `(N, K)` int8 = `(out_features, in_features)`, activations `x` `(M, K)`):

| name          | activations                        | op                                   | devices   |
|---------------|------------------------------------|--------------------------------------|-----------|
| `int_mm`      | int8: dynamic asymmetric (scale and offset) per token/tensor, or static | `torch._int_mm` (int32 accumulation) | CPU, CUDA |
| `fbgemm`      | uint8: per token (rows normalized), per tensor (batch-dependent), or static | prepacked fbgemm ops | CPU |
| `onednn`      | uint8: per token; up to 16 rows one C++ call (qlin's VNNI GEMM), more: qlin's codes and epilogue around oneDNN | `pertoken_linear` / `onednn.qlinear_pointwise` (VNNI) | CPU |
| `pertoken`    | uint8: per token, or static (int_mm's codes and bits); one C++ call at any row count (qlin's AVX2, VNNI or scalar GEMM) | `pertoken_linear` / `static_linear` | CPU |
| `lowbit_dynamic` | uint8: per token (dynamic), grouped B-bit weights (W4A8) | qlin's integer dot per group (lowbit_dynamic.py, `lowbit_dynamic_linear`); CUDA / no C++ build: dequantized codes x weights through `F.linear` | CPU (CUDA: torch ops) |
| `weight_only` | float (int8 per channel)           | CPU: qlin's panel kernel (lowbit.py); CUDA, or no C++ build: `torch._weight_int8pack_mm` | CPU, CUDA |
| `lowbit`      | float (weight-only; 2-8 bits, any group size, 4 bits and narrower two per byte) | qlin's panel kernel (lowbit.py, `lowbit_linear`) | CPU |
| `int4pack`    | float (weight-only, 4-bit groups of 32-256) | `torch._weight_int4pack_mm[_for_cpu]` | CPU, CUDA |
| `dequant`     | float                              | `F.linear` on dequantized weights    | any       |

A new kernel is a new room ending with `KERNEL = ...` (a `registry.Kernel`) and its name in
`registry.ROOMS`. native.py builds and loads the C++ kernels (native_kernels.cpp) that onednn and
lowbit run; common.py holds what several rooms share.
"""

# The public names load on first use (PEP 562): the scheme imports `registry` (which imports no
# qlin module) to validate kernel names, and must not pull in the rooms, which import primitives,
# which import the scheme.
_EXPORTS = {
    "Kernel": "registry", "KernelChoice": "registry", "LayerTensors": "registry", "Target": "registry",
    "SMALL_LAYER": "select", "KEPT_FOR_SPEED": "select", "kept_float_for_speed": "select", "pack": "select",
    "select_kernel": "select",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qlin_cli.kernels' has no attribute {name!r}")


__all__ = [
    "Kernel",
    "KernelChoice",
    "LayerTensors",
    "Target",
    "SMALL_LAYER",
    "KEPT_FOR_SPEED",
    "kept_float_for_speed",
    "select_kernel",
    "pack",
]
