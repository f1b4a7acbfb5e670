"""VirtualEpochs follows the book's formula and refuses numbers that make no sense."""

from __future__ import annotations

import pytest

import pyengine as pe


def test_the_books_example():
    sched = pe.VirtualEpochs(num_training_examples=1_000_000, stop_point=14.3, batch_size=128, num_checkpoints=32)
    assert sched.steps_per_epoch == 3491
    assert sched.total_steps == 3491 * 32
    assert list(sched.checkpoint_steps)[:3] == [3491, 6982, 10473]
    assert len(sched.checkpoint_steps) == 32 and sched.checkpoint_steps[-1] == sched.total_steps


def test_epoch_of_and_epoch_ends():
    sched = pe.VirtualEpochs.of_steps(steps_per_epoch=10, num_checkpoints=3)
    assert (sched.steps_per_epoch, sched.total_steps) == (10, 30)
    assert [sched.epoch_of(s) for s in (1, 10, 11, 30)] == [0, 0, 1, 2]
    assert [s for s in range(1, 31) if sched.is_epoch_end(s)] == [10, 20, 30]
    with pytest.raises(ValueError):
        sched.epoch_of(0)


def test_fractional_stop_point_rounds_down_to_whole_steps():
    sched = pe.VirtualEpochs(num_training_examples=1000, stop_point=2.5, batch_size=32, num_checkpoints=4)
    assert sched.steps_per_epoch == 2500 // 128 == 19


@pytest.mark.parametrize(("args", "match"), [
    ((1000, 1.0, 64, 32), "0 steps per epoch"),
    ((0, 1.0, 8, 2), "num_training_examples"),
    ((1000, 0.0, 8, 2), "stop_point"),
    ((1000, -1.0, 8, 2), "stop_point"),
    ((1000, 1.0, 0, 2), "batch_size"),
    ((1000, 1.0, 8, 2.5), "num_checkpoints"),
    ((1000, float("nan"), 8, 2), "stop_point"),
])
def test_nonsense_is_refused_with_the_reason(args, match):
    with pytest.raises(ValueError, match=match):
        pe.VirtualEpochs(*args)
