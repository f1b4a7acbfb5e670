"""pytest-benchmark view of the frequency study (run with `pytest bench/test_bench_frequency.py`):
20 training steps of the 3M-parameter model without checkpoints, and paired cycles of a save
plus 10 steps (durable before the cycle ends) beside the same 10 steps without one, by each
method. The full side-by-side study with
overhead ratios is bench/bench_frequency.py."""

from __future__ import annotations

import itertools

import pytest

from pyengine.benchmarks.frequency import paired_cycles, steps_seconds
from pyengine.benchmarks.savers import METHODS, close_process_group, make_saver
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
        benchmark.pedantic(paired_cycles, args=(workload, saver, EVERY, STEPS // EVERY, steps), rounds=5,
                           warmup_rounds=1)
    finally:
        saver.close()
