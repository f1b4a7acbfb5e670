"""pytest-benchmark view of the checkpoint engine on a ~100 MB state (run with
`pytest bench/test_bench_checkpoint.py`). The full side-by-side table is
bench/bench_checkpoint.py; a tiny run of it checks that every baseline and target is there."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_checkpoint  # noqa: E402
import checkpoint_workload as wl  # noqa: E402

import pyengine as pe  # noqa: E402
from pyengine.benchmarks.dcp_baselines import CONFIGURED  # noqa: E402


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


def test_the_table_has_every_dcp_baseline_and_a_verdict_for_every_target(tmp_path, capsys):
    out = tmp_path / "figures.json"
    args = ["--params-millions", "0.3", "--width", "256", "--repeats", "1", "--dir", str(tmp_path), "--json", str(out)]
    assert bench_checkpoint.main(args) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert all(recipe.label in printed for recipe in CONFIGURED)
    for key in bench_checkpoint.KEYS.values():
        assert 0 < r[f"{key}_block_s"] < r[f"{key}_durable_s"]
    for key in ("dcp_async_thread", "dcp_async_process"):  # the copy ends after the return, before durable
        assert r[f"{key}_block_s"] <= r[f"{key}_staged_s"] <= r[f"{key}_durable_s"]
        assert r[f"{key}_train_step_s"] > 0 and math.isfinite(r[f"{key}_lost_s"])
    assert "dcp_cached_staged_s" not in r and "dcp_default_staged_s" not in r  # staged before returning

    lines = printed.splitlines()
    verdicts = [line for line in lines if "(target " in line]
    assert all(re.search(r"\(target [<>]= [0-9.]+x: (PASS|MISS)\)$", line) for line in verdicts)
    met, total = map(int, re.search(r"^targets +(\d+) of (\d+) met", printed, re.M).groups())
    assert total == len(verdicts) and met == sum(line.endswith("PASS)") for line in verdicts)

    def verdict_of(label: str) -> str:
        return next(line for line in lines if line.startswith(label) and "(target " in line)

    assert "x memcpy (target <= 1x" in verdict_of("pe save() stall")
    assert "x pe stall (target >= 1.5x" in verdict_of("  blocking (one copy into its cache)")
    assert sum("pe overlap's (target >= 3x" in line for line in verdicts) == 2  # THREAD and PROCESS
    assert "x dd direct (target >= 0.8x" in verdict_of("pe save -> durable commit")
    assert "x pe commit (dcp." in verdict_of("fastest DCP to durable")
