"""pytest-benchmark view of the transfer benchmark (run with `pytest bench/test_bench_transfer.py`):
one epoch of head training on cached features against one epoch that recomputes the
frozen backbone. The full side-by-side table with accuracies is bench/bench_transfer.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transfer as bt  # noqa: E402

import pyengine as pe  # noqa: E402


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    d = tmp_path_factory.mktemp("transfer")
    x, y = bt.make_data(bt.QUICK.train, seed=10)
    raw = pe.data.write_dataset(d / "raw", {"x": x, "y": y}, durable=False, progress=False)
    backbone = bt.make_backbone()
    loader = pe.data.Loader(raw, batch_size=bt.QUICK.batch, shuffle=False)
    feats = pe.transfer.cache_features(backbone, loader, d / "features", durable=False)
    return backbone, raw, feats


def _epoch(loader, step) -> None:
    for batch in loader:
        step(batch)


def test_epoch_recomputing_the_backbone(benchmark, workload):
    backbone, raw, _ = workload
    head = bt.make_head()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    loader = pe.data.Loader(raw, batch_size=bt.QUICK.batch, shuffle=True, seed=0)

    def step(batch):
        with torch.no_grad():
            features = backbone(batch["x"])
        bt.head_step(head, opt, features, batch["y"])

    benchmark.pedantic(_epoch, args=(loader, step), rounds=3)


def test_epoch_on_cached_features(benchmark, workload):
    _, _, feats = workload
    head = bt.make_head()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    loader = pe.data.Loader(feats, batch_size=bt.QUICK.batch, shuffle=True, seed=0)
    benchmark.pedantic(_epoch, args=(loader, lambda b: bt.head_step(head, opt, b["features"], b["y"])), rounds=3)
