"""Rebuild every artifact in sample_models/ (small, real, trained models for qlin).

Run from the repository root, either way:

    python sample_models/make.py
    python -m sample_models.make

Needs torch, safetensors and scikit-learn (``pip install scikit-learn``; only
needed to regenerate these files, qlin itself does not use it). The data is
scikit-learn's bundled 8x8 digits set (``load_digits``; 1797 images, no
download): pixels / 16 -> [0, 1], split with
``train_test_split(test_size=0.25, random_state=0, stratify=y)``
(1347 train / 450 test).

Makes (all float32 unless noted):

    digits_mlp.pt                 whole pickled nn.Sequential 64-256-256-10 MLP
                                  (loads with torch.load(weights_only=True) inside
                                  torch.serialization.safe_globals([nn.Sequential,
                                  nn.Linear, nn.ReLU]))
    digits_mlp.safetensors        its state dict (architecture:
                                  sample_models.digits:build_digits_mlp)
    encoder.safetensors           state dict of a 2-block transformer encoder
                                  (architecture: sample_models.encoder:build)
    digits_test.safetensors         {"inputs": (450, 64) float32}  test split
    digits_test_labels.safetensors  {"labels": (450,) int64}       test labels
    digits_calib.safetensors        {"inputs": (256, 64) float32}  256 train samples

Training is deterministic (fixed seeds, one thread, deterministic algorithms),
so reruns on the same torch version produce byte-identical files (results may
differ across torch versions / CPUs). Takes about 25 s on CPU (single thread).
Prints the float test accuracy of each model.
"""

import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `sample_models` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sample_models.digits import build_digits_mlp
from sample_models.encoder import build as build_encoder

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
N_CALIB = 256


def path(name: str) -> str:
    return os.path.join(HERE, name)


def save_safetensors(tensors: dict, name: str) -> None:
    save_file(tensors, path(name))
    os.chmod(path(name), 0o644)  # safetensors creates files 0600


def load_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = (ds.data / 16.0).astype(np.float32)
    y = ds.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return (torch.from_numpy(np.ascontiguousarray(x_tr)), torch.from_numpy(np.ascontiguousarray(y_tr)),
            torch.from_numpy(np.ascontiguousarray(x_te)), torch.from_numpy(np.ascontiguousarray(y_te)))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train(model, x, y, *, opt, epochs, batch_size, seed, sched=None):
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    n = x.shape[0]
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    return model.eval()


def state_dict_for_safetensors(model: nn.Module) -> dict:
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    t_start = time.perf_counter()

    x_tr, y_tr, x_te, y_te = load_data()
    assert x_te.shape == (450, 64) and y_te.shape == (450,)

    # --- data files -----------------------------------------------------------
    save_safetensors({"inputs": x_te.contiguous()}, "digits_test.safetensors")
    save_safetensors({"labels": y_te.contiguous()}, "digits_test_labels.safetensors")
    calib_idx = torch.randperm(x_tr.shape[0], generator=torch.Generator().manual_seed(SEED))[:N_CALIB]
    calib_idx = calib_idx.sort().values
    save_safetensors({"inputs": x_tr[calib_idx].contiguous()}, "digits_calib.safetensors")

    # --- digits MLP -----------------------------------------------------------
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    mlp = build_digits_mlp()
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    train(mlp, x_tr, y_tr, opt=opt, epochs=30, batch_size=32, seed=SEED)
    mlp = mlp.float().eval()
    acc_mlp = accuracy(mlp, x_te, y_te)
    t_mlp = time.perf_counter() - t0

    torch.save(mlp, path("digits_mlp.pt"))
    save_safetensors(state_dict_for_safetensors(mlp), "digits_mlp.safetensors")

    # Check: the pickled module loads with weights_only=True + safe_globals.
    with torch.serialization.safe_globals([nn.Sequential, nn.Linear, nn.ReLU]):
        loaded = torch.load(path("digits_mlp.pt"), weights_only=True)
    assert type(loaded) is nn.Sequential
    with torch.no_grad():
        assert torch.equal(loaded(x_te), mlp(x_te))
    # Check: factory + state dict reproduces the model.
    rebuilt = build_digits_mlp()
    rebuilt.load_state_dict(load_file(path("digits_mlp.safetensors")))
    with torch.no_grad():
        assert torch.equal(rebuilt(x_te), mlp(x_te))

    # --- transformer encoder --------------------------------------------------
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    enc = build_encoder()
    epochs, batch_size = 60, 64
    steps = epochs * -(-x_tr.shape[0] // batch_size)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    train(enc, x_tr, y_tr, opt=opt, epochs=epochs, batch_size=batch_size, seed=SEED, sched=sched)
    acc_enc = accuracy(enc, x_te, y_te)
    t_enc = time.perf_counter() - t0

    save_safetensors(state_dict_for_safetensors(enc), "encoder.safetensors")
    rebuilt = build_encoder()
    rebuilt.load_state_dict(load_file(path("encoder.safetensors")))
    with torch.no_grad():
        assert torch.equal(rebuilt(x_te), enc(x_te))

    print(f"digits_mlp  float test accuracy: {acc_mlp:.4f}  (trained in {t_mlp:.1f}s)")
    print(f"encoder     float test accuracy: {acc_enc:.4f}  (trained in {t_enc:.1f}s)")
    print(f"total {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
