"""Peak memory of quantizing a model: is it ~ float model + int8 result + one layer?

Builds an nn.Sequential of N nn.Linear(D, D) layers (default 8 x 4096: 512 MiB of float32
weights), quantizes it with qlin's defaults, and prints the process's peak RSS less the RSS
after `import torch`, against the float model's size. Run in a fresh process (peak RSS only
grows):

    python benchmarks/memory.py [--layers 8] [--dim 4096] [--mode dynamic]

Takes about 10 s on 2 cores.
"""

import argparse
import gc

import torch
import torch.nn as nn
from common import peak_rss_bytes  # the script's folder is on sys.path when it runs


def rss_mib() -> float:
    return peak_rss_bytes() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--mode", default="dynamic", choices=["dynamic", "weight-only"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = rss_mib()
    with torch.no_grad():
        model = nn.Sequential(*[nn.Linear(args.dim, args.dim) for _ in range(args.layers)]).eval()
    loaded = rss_mib()
    from qlin_cli import QuantConfig, quantize_model

    quantize_model(model, QuantConfig(mode=args.mode))
    gc.collect()
    peak = rss_mib()
    float_mib = args.layers * (args.dim * args.dim + args.dim) * 4 / 2**20
    int8_mib = args.layers * (args.dim * args.dim + 3 * args.dim * 4) / 2**20
    layer_mib = float_mib / args.layers
    print(f"float model {float_mib:.0f} MiB, int8 result {int8_mib:.0f} MiB, largest layer {layer_mib:.0f} MiB")
    print(f"RSS after import torch {base:.0f} MiB, after building the model {loaded:.0f} MiB, peak {peak:.0f} MiB")
    print(f"peak - import = {peak - base:.0f} MiB = {(peak - base) / float_mib:.2f}x the float model; "
          f"budget float + int8 + one layer = {float_mib + int8_mib + layer_mib:.0f} MiB")


if __name__ == "__main__":
    main()
