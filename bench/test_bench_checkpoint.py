"""pytest-benchmark view of the checkpoint engine on a ~100 MB state (run with
`pytest bench/test_bench_checkpoint.py`). The full side-by-side table is
bench/bench_checkpoint.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoint_workload as wl  # noqa: E402

import pyengine as pe  # noqa: E402


@pytest.fixture(scope="module")
def state():
    return wl.make_state(8.0, width=2048)


def test_memcpy_baseline(benchmark, state):
    tensors = wl.state_tensors(*state)
    dst = [torch.empty_like(t) for t in tensors]
    benchmark(wl.memcpy_seconds, tensors, dst)


def test_pe_save_stall(benchmark, state, tmp_path):
    model, opt = state
    steps = iter(range(1, 1_000_000))
    with pe.Checkpointer(tmp_path, keep_last=1) as ckpt:
        ckpt.save(0, {"model": model, "optimizer": opt}).wait()  # allocate staging once

        def save_then_drain():
            handle = ckpt.save(next(steps), {"model": model, "optimizer": opt})
            return handle

        benchmark.pedantic(save_then_drain, teardown=ckpt.wait, rounds=5)


def test_torch_save_fsync(benchmark, state, tmp_path):
    model, opt = state
    benchmark.pedantic(wl.torch_save_fsync_seconds, args=(model, opt, tmp_path / "t.pt"), rounds=3)
