"""pytest-benchmark view of the loader on 3 KB samples, one epoch per round (run with
`flock /tmp/pyengine-bench.lock pytest bench/test_bench_loader.py`). The full side-by-side
table is bench/bench_loader.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyengine as pe

N, SAMPLE, BATCH = 16_384, 3072, 256


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (N, SAMPLE), dtype=np.uint8), np.arange(N, dtype=np.int64)


@pytest.fixture(scope="module")
def dataset(arrays, tmp_path_factory):
    x, y = arrays
    return pe.data.write_dataset(tmp_path_factory.mktemp("bench") / "d", {"x": x, "y": y}, durable=False)


def _drain(batches) -> int:
    n = 0
    for b in batches:
        n += len(b["y"]) if isinstance(b, dict) else len(b[1])
    return n


@pytest.mark.parametrize("threads", [1, 2])
def test_pe_loader_epoch(benchmark, dataset, threads):
    loader = pe.data.Loader(dataset, batch_size=BATCH, threads=threads)
    _drain(loader)  # warm: page cache, pool
    assert benchmark(_drain, loader) == N


def test_numpy_gather_epoch(benchmark, arrays):
    x, y = arrays
    perm = np.random.default_rng(0).permutation(N)

    def gather():
        return _drain({"x": x[perm[i : i + BATCH]], "y": y[perm[i : i + BATCH]]} for i in range(0, N, BATCH))

    assert benchmark(gather) == N


def test_torch_dataloader_2_workers_epoch(benchmark, arrays):
    x, y = arrays
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)
    _drain(dl)
    assert benchmark.pedantic(_drain, args=(dl,), rounds=3) == N
