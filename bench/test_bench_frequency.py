"""pytest-benchmark view of the frequency study (run with `pytest bench/test_bench_frequency.py`):
20 training steps of the 3M-parameter model without checkpoints, and paired cycles of a save
plus 10 steps (durable before the cycle ends) beside the same 10 steps without one, by each
method. Also checks that the DCP baselines save the state of their step although training goes
on, and that the study compares pe-overlap with each DCP method. The full side-by-side study
with overhead ratios is bench/bench_frequency.py."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator

import pytest
import torch

from pyengine.benchmarks.dcp_baselines import RECIPES
from pyengine.benchmarks.frequency import FrequencyConfig, overlap_vs_dcp, paired_cycles, run_study, steps_seconds
from pyengine.benchmarks.savers import CONTROL, METHODS, close_process_group, make_saver
from pyengine.benchmarks.workload import Workload

STEPS, EVERY = 20, 10


@pytest.fixture(scope="module")
def workload():
    w = Workload.create("3M")
    w.warm_up()
    yield w
    close_process_group()


def test_steps_without_checkpoints(benchmark, workload):
    benchmark.pedantic(steps_seconds, args=(workload, STEPS), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("method", METHODS)
def test_steps_with_a_checkpoint_every_10(benchmark, workload, method, tmp_path):
    saver = make_saver(method, workload, tmp_path / "ck")
    steps = itertools.count(1)
    try:
        # Two cycles of a save and 10 steps, each beside 10 steps without a save.
        sample = benchmark.pedantic(paired_cycles, args=(workload, saver, EVERY, STEPS // EVERY, steps), rounds=5,
                                    warmup_rounds=1)
    finally:
        saver.close()
    assert sample["saves"] == STEPS // EVERY and len(sample["stalls"]) == sample["saves"]
    assert sample["seconds"] > 0 and sample["baseline_seconds"] > 0
    if method == CONTROL:
        assert sample["persists"] == []
    else:  # every save became durable within its cycle, no sooner than its stall ended
        assert len(sample["persists"]) == sample["saves"]
        assert all(0 < s <= p for s, p in zip(sample["stalls"], sample["persists"]))


def _weights_and_moments(workload: Workload) -> dict:
    """The model's weights and Adam's moments, nested as the DCP savers save them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(workload.model, workload.optimizer)
    moments = {p: {k: v for k, v in s.items() if k != "step"} for p, s in optim_sd["state"].items()}
    return {"model": dict(model_sd), "optim": {"state": moments}}


def _leaves(tree: dict, path: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    for k, v in tree.items():
        yield from _leaves(v, (*path, k)) if isinstance(v, dict) else [((*path, k), v)]


def _zeros(tree: dict) -> dict:
    return {k: _zeros(v) if isinstance(v, dict) else torch.zeros_like(v) for k, v in tree.items()}


@pytest.mark.parametrize("method", RECIPES)
def test_a_dcp_checkpoint_holds_its_steps_state_though_the_optimizer_steps_at_once(workload, method, tmp_path):
    import torch.distributed.checkpoint as dcp

    saver = make_saver(method, workload, tmp_path / "ck")
    try:
        workload.step()  # leaves gradients for the bare optimizer step below
        expected = {path: v.clone() for path, v in _leaves(_weights_and_moments(workload))}
        saver.save(10**6)
        # No forward/backward to hide the copy behind: with async staging, the saver's step
        # pre-hook must hold the first step until the copy is done.
        for _ in range(5):
            workload.optimizer.step()
        saver.finish()
        loaded = _zeros(_weights_and_moments(workload))
        dcp.load(loaded, checkpoint_id=str(tmp_path / "ck" / f"step-{10**6:08d}"))
    finally:
        saver.close()
    now = dict(_leaves(_weights_and_moments(workload)))
    assert all(not torch.equal(now[path], v) for path, v in expected.items())  # every tensor stepped
    assert all(torch.equal(v, expected[path]) for path, v in _leaves(loaded))


def test_the_study_compares_pe_overlap_with_every_dcp_method(tmp_path):
    config = FrequencyConfig(models=("3M",), methods=("pe-overlap", *RECIPES), intervals=(2,), repeats=1,
                             block_seconds=0.01, budget=None)
    log: list[str] = []
    results = run_study(config, tmp_path, log.append)
    lines = [line for line in log if "training time lost per save" in line]
    assert [m for m in RECIPES if any(f" vs {m} " in line for line in lines)] == list(RECIPES)
    for line in lines:
        ratio = float(re.search(r"= ([0-9.]+)x less", line).group(1))
        assert ratio > 0 and math.isfinite(ratio)
        method = re.search(r" vs (\S+) ", line).group(1)
        assert ("PASS" in line or "MISS" in line) == RECIPES[method].async_staging
    assert {r["method"] for r in results["models"]["3M"]["runs"]} == set(config.methods)


def test_the_comparison_checks_only_async_staging_against_the_target():
    model = {"methods": {"pe-overlap": {"cost_s": 0.010}, "dcp.cached": {"cost_s": 0.012},
                         "dcp.async-thread": {"cost_s": 0.040}, "dcp.async-process": {"cost_s": 0.020}}}
    lines = {re.search(r" vs (\S+) ", line).group(1): line for line in overlap_vs_dcp(model)}
    assert set(lines) == {"dcp.cached", "dcp.async-thread", "dcp.async-process"}
    assert "4.00x less" in lines["dcp.async-thread"] and "PASS" in lines["dcp.async-thread"]
    assert "2.00x less" in lines["dcp.async-process"] and "MISS" in lines["dcp.async-process"]
    assert "target" not in lines["dcp.cached"]
    assert overlap_vs_dcp({"methods": {"dcp.cached": {"cost_s": 0.01}}}) == []
    assert overlap_vs_dcp({"methods": {"pe-overlap": {"cost_s": 0.01}}}) == []


def test_the_comparison_says_when_noise_hid_pe_overlaps_slowdown():
    def rows(stall_s: float) -> list[dict]:
        return [{"method": "pe-overlap", "interval": k, "stall_s": stall_s} for k in (1, 5)]

    methods = {"pe-overlap": {"cost_s": 0.002}, "dcp.async-thread": {"cost_s": 0.5}}
    floored = overlap_vs_dcp({"methods": methods, "rows": rows(0.002)})
    measured = overlap_vs_dcp({"methods": methods, "rows": rows(0.001)})
    assert len(floored) == 2 and "within the noise" in floored[0]
    assert len(measured) == 1 and "within the noise" not in measured[0]
