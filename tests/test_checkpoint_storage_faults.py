"""A failure injected at each storage operation of a save, in one process: the outcome is
always "not committed, older checkpoints intact, the error raised" or, for pruning (after the
commit), "committed and reported committed" with a warning. The 2-rank version of the same
matrix is in tests/test_checkpoint_agreement.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pyengine as pe

sys.path.insert(0, str(Path(__file__).parent))
from faulty_storage import OPERATIONS, FaultyStorage, inject  # noqa: E402

# A world of one writes no top manifest (its part, whose manifest the C++ writer writes, is the step).
WORLD_OF_ONE_OPERATIONS = [op for op in OPERATIONS if op != "write_manifest"]


def state(step: int) -> dict:
    return {"weights": torch.arange(4096, dtype=torch.float32) + step, "meta": {"step": step}}


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize("operation", WORLD_OF_ONE_OPERATIONS)
def test_a_failure_at_any_storage_operation_commits_nothing_or_warns_after_the_commit(
        tmp_path: Path, operation: str) -> None:
    with pe.Checkpointer(tmp_path, keep_last=2, capture_rng=False) as ckpt:
        ckpt.save(1, state(1)).wait()
        ckpt.save(2, state(2)).wait()
        inject(ckpt, FaultyStorage(tmp_path, operation))
        if operation == "prune":
            with pytest.warns(pe.checkpoint.CheckpointPruneWarning, match="step 3 is committed"):
                ckpt.save(3, state(3)).wait()
            assert ckpt.steps() == [1, 2, 3]  # nothing pruned, nothing lost
            ckpt.save(4, state(4)).wait()  # the next commit prunes again
            assert ckpt.steps() == [3, 4]
            newest = 4
        else:
            with pytest.raises(OSError, match=f"injected failure in {operation}"):
                ckpt.save(3, state(3)).wait()
            assert ckpt.steps() == [1, 2], "a failed save left a committed step"
            assert leftovers(tmp_path) == [], "a failed save left its temporary directory"
            assert ckpt.load()["meta"] == {"step": 2}
            ckpt.save(3, state(3)).wait()  # the fault was transient: the next save commits
            newest = 3
        loaded = ckpt.load()
        assert torch.equal(loaded["weights"], state(newest)["weights"])
    infos = pe.checkpoint.inspect_directory(tmp_path)
    assert all(i.ok for i in infos), infos
