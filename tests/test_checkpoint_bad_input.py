"""Misuse is refused with a clear error before anything is written, and leaves committed
checkpoints and the caller's objects as they were."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pyengine as pe


def make_state(step: int) -> dict:
    return {
        "weights": torch.arange(2000, dtype=torch.float32) + step,
        "table": np.arange(300, dtype=np.int64) * step,
        "extra": {"step": step, "name": f"s{step}"},
    }


def committed(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("step-"))


@pytest.fixture
def ck(tmp_path: Path):
    with pe.Checkpointer(tmp_path, keep_last=0, capture_rng=False) as checkpointer:
        yield checkpointer


@pytest.mark.parametrize("step", [-1, True, False, "3", 2.0, None])
def test_step_must_be_a_non_negative_integer(ck: pe.Checkpointer, step: object) -> None:
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        ck.save(step, make_state(1))
    assert committed(ck.directory) == []
    ck.save(1, make_state(1)).wait()  # the refused call left the Checkpointer usable
    assert ck.steps() == [1]


@pytest.mark.parametrize("step", [5, 4, 0])
def test_step_not_newer_than_the_newest_is_refused(tmp_path: Path, step: int) -> None:
    with pe.Checkpointer(tmp_path, capture_rng=False) as ck:
        ck.save(5, make_state(5)).wait()
        with pytest.raises(pe.CheckpointError, match="cannot save step"):
            ck.save(step, make_state(99))
    # Also in a new process's Checkpointer, which learns the newest step from the directory.
    with pe.Checkpointer(tmp_path, capture_rng=False) as ck:
        with pytest.raises(pe.CheckpointError, match="already holds step 5"):
            ck.save(step, make_state(99))
        assert ck.steps() == [5]
        loaded = ck.load(5)
        assert torch.equal(loaded["weights"], make_state(5)["weights"])
        assert loaded["extra"] == {"step": 5, "name": "s5"}
        ck.save(6, make_state(6)).wait()
        assert ck.steps() == [5, 6]


@pytest.mark.parametrize(
    "state",
    [[("weights", torch.zeros(3))], {"__rng__": 1}, {3: torch.zeros(3)}],
    ids=["not-a-mapping", "reserved-name", "non-string-name"],
)
def test_state_must_map_plain_names(ck: pe.Checkpointer, state: object) -> None:
    with pytest.raises(ValueError, match="state must be a mapping"):
        ck.save(1, state)
    assert committed(ck.directory) == []


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(lambda x: x, "function"), ({1, 2}, "set"), (object(), "object"), (b"bytes", "bytes")],
    ids=["lambda", "set", "object", "bytes"],
)
def test_unsupported_value_names_its_path(ck: pe.Checkpointer, value: object, type_name: str) -> None:
    state = make_state(1)
    state["extra"] = {"step": 1, "nested": [0, {"fn": value}]}
    with pytest.raises(TypeError, match=f"{type_name} at extra/nested/1/fn"):
        ck.save(1, state)
    assert committed(ck.directory) == []
    assert ck.steps() == []
    ck.save(1, make_state(1)).wait()  # the same step is still free
    assert ck.steps() == [1]


def test_numpy_array_of_objects_is_refused(ck: pe.Checkpointer) -> None:
    state = make_state(1)
    state["extra"] = {"arr": np.array([object(), 1], dtype=object)}
    with pytest.raises(TypeError, match="extra/arr"):
        ck.save(1, state)
    assert ck.steps() == []


def test_a_writer_that_waited_for_the_lock_still_sees_steps_committed_meanwhile(tmp_path: Path) -> None:
    # save() skips listing the directory only while it holds the lock; one that was refused the
    # lock must not trust the steps it knew when another writer has committed newer ones since.
    first = pe.Checkpointer(tmp_path, capture_rng=False)
    second = pe.Checkpointer(tmp_path, capture_rng=False)
    with pytest.raises(pe.CheckpointError, match="another Checkpointer"):
        second.save(1, make_state(1))
    first.save(10, make_state(10)).wait()
    first.close()
    with pytest.raises(pe.CheckpointError, match="already holds step 10"):
        second.save(2, make_state(2))
    second.save(11, make_state(11)).wait()
    second.close()
    assert pe.Checkpointer(tmp_path).steps() == [10, 11]


def test_second_writer_is_refused_while_the_first_holds_the_directory(tmp_path: Path) -> None:
    first = pe.Checkpointer(tmp_path, capture_rng=False)
    first.save(1, make_state(1)).wait()
    torn = tmp_path / "step-00000002.tmp-123-abc"
    torn.mkdir()  # looks like the first writer's save in flight
    second = pe.Checkpointer(tmp_path, capture_rng=False)
    assert torn.exists(), "a Checkpointer without the lock removed another writer's temporary directory"
    with pytest.raises(pe.CheckpointError, match="another Checkpointer"):
        second.save(2, make_state(2))
    assert second.load(1)["extra"] == {"step": 1, "name": "s1"}  # reading is allowed
    second.close()
    first.save(2, make_state(2)).wait()
    first.close()
    # Once the first has closed, the directory can be taken over, and the leftover is cleaned up.
    with pe.Checkpointer(tmp_path, capture_rng=False) as third:
        assert not torn.exists()
        third.save(3, make_state(3)).wait()
        assert third.steps() == [1, 2, 3]


def test_state_larger_than_the_staging_cap_is_refused(tmp_path: Path) -> None:
    cap = 1 << 20
    with pe.Checkpointer(tmp_path, staging_cap_bytes=cap, capture_rng=False) as ck:
        big = {"weights": torch.zeros(cap // 4 + 1024)}
        with pytest.raises(ValueError, match="staging_cap_bytes"):
            ck.save(1, big)
        assert committed(tmp_path) == []
        ck.save(1, make_state(1)).wait()  # a state under the cap still saves, with the same step
        assert ck.steps() == [1]


def test_restore_of_a_missing_key_changes_nothing(tmp_path: Path) -> None:
    with pe.Checkpointer(tmp_path, capture_rng=False) as ck:
        model = torch.nn.Linear(4, 3)
        ck.save(1, {"model": model}).wait()
    other = torch.nn.Linear(4, 3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    counter = torch.tensor([7.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing key is the caller's mistake, not corruption
        with pe.Checkpointer(tmp_path) as ck:
            with pytest.raises(pe.CheckpointError, match="counter"):
                ck.restore({"model": other, "counter": counter})
            assert ck.steps() == [1]  # not moved aside
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])
    assert counter.item() == 7.0


def test_restore_into_a_different_model_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    with pe.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"model": saved, "weights": torch.zeros(1)}).wait()
        # The first layer matches, the second has 3 outputs: torch's load_state_dict alone would
        # copy the first layer before raising.
        other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match=r"'model/1.weight' has shape \(2, 8\) but the target's is \(3, 8\)"):
            ckpt.restore({"model": other})
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
        # A (1,) tensor would broadcast silently into a (5,) one; the model listed first is not loaded.
        same, target = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), torch.ones(5)
        same_before = {k: v.clone() for k, v in same.state_dict().items()}
        with pytest.raises(ValueError, match=r"'weights' has shape \(1,\) but the target's is \(5,\)"):
            ckpt.restore({"model": same, "weights": target})
        assert torch.equal(target, torch.ones(5))
        assert all(torch.equal(v, same_before[k]) for k, v in same.state_dict().items())


class Scalar(torch.nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full(shape, 3.0))


def test_the_shape_check_leaves_loads_that_torch_accepts_alone(tmp_path: Path) -> None:
    # A per-channel observer's min/max start empty and take their size from the checkpoint
    # (its own _load_from_state_dict resizes them, as quantization-aware training needs on resume);
    # torch fills a 0-d parameter from a (1,) tensor.
    observer = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=0)
    observer(torch.randn(3, 4))
    with pe.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"observer": observer, "scalar": Scalar((1,))}).wait()
        fresh, scalar = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=0), Scalar(())
        assert fresh.min_val.shape == (0,)
        assert ckpt.restore({"observer": fresh, "scalar": scalar}) == 1
    assert torch.equal(fresh.min_val, observer.min_val) and torch.equal(fresh.max_val, observer.max_val)
    assert scalar.scale.shape == () and scalar.scale.item() == 3.0


def test_restore_of_a_step_that_does_not_exist(tmp_path: Path) -> None:
    with pe.Checkpointer(tmp_path, capture_rng=False) as ck:
        ck.save(1, make_state(1)).wait()
        target = {"weights": torch.zeros(2000)}
        with pytest.raises(pe.CheckpointError, match="no committed checkpoint for step 7"):
            ck.restore(target, step=7)
        assert torch.count_nonzero(target["weights"]) == 0
        with pytest.raises(pe.CheckpointError, match="step 7"):
            ck.load(7)


def test_empty_directory(tmp_path: Path) -> None:
    with pe.Checkpointer(tmp_path) as ck:
        assert ck.restore({"weights": torch.zeros(3)}) is None
        with pytest.raises(pe.CheckpointError, match="no checkpoint"):
            ck.load()


def test_save_after_close_is_refused(tmp_path: Path) -> None:
    ck = pe.Checkpointer(tmp_path, capture_rng=False)
    ck.save(1, make_state(1))
    ck.close()
    assert ck.steps() == [1]  # close() waited for the save
    ck.close()  # closing twice is harmless
    with pytest.raises(pe.CheckpointError, match="closed"):
        ck.save(2, make_state(2))
    assert ck.steps() == [1]
