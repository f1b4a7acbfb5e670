"""Transfer-learning benchmark: training a head on cached bottleneck features against
recomputing the frozen backbone every epoch, on the same data, order and seeds.

Run (never alongside other benchmarks)::

    flock /tmp/pyengine-bench.lock python bench/bench_transfer.py [--quick] [--dir DIR]

Workload: synthetic 10-class data (Gaussian class clusters in 256 dimensions, made with
torch; no downloads), a frozen MLP backbone (4 x 1024 hidden units with BatchNorm, ~3.5M
parameters; random init: the point is the cost, not the features) whose forward pass
dominates the step, and a linear head trained with Adam. Both runs read through
pe.data.Loader with the same seed, so they see the same batches in the same order; the
cached run's time includes writing the cache. Prints one table: wall time, speed ratio,
test accuracy of both heads, and how far their final weights are apart.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import pyengine as pe

IN_DIM, FEAT_DIM, CLASSES, HIDDEN, DEPTH = 256, 128, 10, 1024, 4


@dataclass
class Config:
    train: int = 8192
    test: int = 2048
    epochs: int = 20
    batch: int = 128
    lr: float = 1e-2


QUICK = Config(train=2048, test=512, epochs=10)


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class clusters: fixed means (seed 0) plus unit noise; ``seed`` picks the samples."""
    means = torch.randn(CLASSES, IN_DIM, generator=torch.Generator().manual_seed(0)) * 0.7
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = means[y] + torch.randn(n, IN_DIM, generator=g)
    return x.numpy(), y.numpy()


def make_backbone() -> nn.Module:
    torch.manual_seed(1)
    layers: list[nn.Module] = []
    width = IN_DIM
    for _ in range(DEPTH):
        layers += [nn.Linear(width, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU()]
        width = HIDDEN
    layers.append(nn.Linear(width, FEAT_DIM))
    return pe.transfer.freeze(nn.Sequential(*layers), bn="frozen").eval()


def make_head() -> nn.Module:
    torch.manual_seed(2)
    return nn.Linear(FEAT_DIM, CLASSES)


def head_step(head: nn.Module, opt: torch.optim.Optimizer, features: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(head(features), y).backward()
    opt.step()


def train_recomputing(backbone: nn.Module, raw: pe.data.Dataset, cfg: Config) -> tuple[nn.Module, float]:
    """Every epoch runs the frozen backbone again on every batch."""
    head = make_head()
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    loader = pe.data.Loader(raw, batch_size=cfg.batch, shuffle=True, seed=0)
    t = time.perf_counter()
    for _ in range(cfg.epochs):
        for batch in loader:
            with torch.no_grad():
                features = backbone(batch["x"])
            head_step(head, opt, features, batch["y"])
    return head, time.perf_counter() - t


def train_cached(backbone: nn.Module, raw: pe.data.Dataset, cfg: Config, path: str) -> tuple[nn.Module, float, float]:
    """The backbone runs once (cache_features); every epoch reads the cached features."""
    head = make_head()
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    t = time.perf_counter()
    feats = pe.transfer.cache_features(backbone, pe.data.Loader(raw, batch_size=cfg.batch, shuffle=False), path,
                                       overwrite=True, durable=False)  # fmt: skip
    cache_s = time.perf_counter() - t
    loader = pe.data.Loader(feats, batch_size=cfg.batch, shuffle=True, seed=0)
    for _ in range(cfg.epochs):
        for batch in loader:
            head_step(head, opt, batch["features"], batch["y"])
    return head, time.perf_counter() - t, cache_s


def accuracy(backbone: nn.Module, head: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = head(backbone(torch.from_numpy(x))).argmax(1).numpy()
    return float((pred == y).mean())


def run(cfg: Config, workdir: str) -> dict[str, float]:
    x_train, y_train = make_data(cfg.train, seed=10)
    x_test, y_test = make_data(cfg.test, seed=11)
    raw = pe.data.write_dataset(os.path.join(workdir, "raw"), {"x": x_train, "y": y_train}, overwrite=True,
                                durable=False, progress=False)  # fmt: skip
    backbone = make_backbone()
    head_r, recompute_s = train_recomputing(backbone, raw, cfg)
    head_c, cached_s, cache_s = train_cached(backbone, raw, cfg, os.path.join(workdir, "features"))
    weight_diff = max((a - b).abs().max().item() for a, b in zip(head_r.parameters(), head_c.parameters()))
    return {
        "recompute_s": recompute_s,
        "cached_s": cached_s,
        "cache_s": cache_s,
        "speedup": recompute_s / cached_s,
        "speedup_per_epoch": (recompute_s / cfg.epochs) / ((cached_s - cache_s) / cfg.epochs),
        "acc_recompute": accuracy(backbone, head_r, x_test, y_test),
        "acc_cached": accuracy(backbone, head_c, x_test, y_test),
        "weight_diff": weight_diff,
    }


def print_table(cfg: Config, r: dict[str, float]) -> None:
    params = sum(p.numel() for p in make_backbone().parameters())
    print(f"\nhead training, {cfg.epochs} epochs x {cfg.train} samples (batch {cfg.batch}); frozen backbone "
          f"{params / 1e6:.2f}M params; torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'method':<34} {'wall s':>8} {'vs recompute':>13} {'test acc':>9}")
    print(f"{'recompute backbone every epoch':<34} {r['recompute_s']:8.2f} {1.0:12.2f}x {r['acc_recompute']:9.4f}")
    print(f"{'cached features (incl. caching)':<34} {r['cached_s']:8.2f} {r['speedup']:12.2f}x {r['acc_cached']:9.4f}")
    print(f"  of which writing the cache once   {r['cache_s']:8.2f}")
    print(f"per-epoch speed-up after caching: {r['speedup_per_epoch']:.1f}x")
    same = "identical" if r["weight_diff"] == 0 else f"max |diff| {r['weight_diff']:.2e}"
    print(f"final head weights of the two runs: {same}; accuracy difference "
          f"{abs(r['acc_cached'] - r['acc_recompute']):.4f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer epochs")
    parser.add_argument("--dir", default=None, help="where the datasets are written (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both runs (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else Config()
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
        print_table(cfg, run(cfg, args.dir))
    else:
        with tempfile.TemporaryDirectory(prefix="pyengine-bench-transfer-") as d:
            print_table(cfg, run(cfg, d))


if __name__ == "__main__":
    main()
