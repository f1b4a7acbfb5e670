"""A write that fails in a writer thread (here EFBIG, from RLIMIT_FSIZE in a child process)
surfaces as an OSError naming the file, commits nothing, leaves no temporary directory,
and leaves the older checkpoints intact."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyengine as pe

FILE_SIZE_LIMIT = 1 << 20  # bytes; the small state fits in one file of this size, the large one does not

# The child runs the scenario under the limit and prints what happened as one JSON line.
CHILD_CODE = """
import json
import os
import resource
import signal
import sys

import torch

import pyengine as pe

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
directory = sys.argv[1]
report = {{}}


def error_of(call):
    try:
        call()
    except OSError as e:
        return {{"type": type(e).__name__, "errno": e.errno, "filename": e.filename, "message": str(e)}}
    except Exception as e:
        return {{"type": type(e).__name__, "message": str(e)}}
    return None


def small(step):
    return {{"weights": torch.arange(1000, dtype=torch.float32) + step, "meta": {{"step": step}}}}


def large(step):
    return {{"weights": torch.arange(1 << 20, dtype=torch.float32) + step, "meta": {{"step": step}}}}


ck = pe.Checkpointer(directory, keep_last=3, capture_rng=False)
ck.save(1, small(1)).wait()
report["steps_after_small"] = ck.steps()

handle = ck.save(2, large(2))
report["handle_wait"] = error_of(handle.wait)
report["wait_after_reported"] = error_of(ck.wait)  # an error is raised once
report["steps_after_failed_wait"] = ck.steps()

ck.save(3, large(3))  # fails in the background; nobody waits for it
report["next_save"] = error_of(lambda: ck.save(4, small(4)))
report["steps_after_unwaited"] = ck.steps()
# A failed step may be saved again once it fits: nothing of it was committed.
report["retry_failed_step"] = error_of(lambda: ck.save(3, small(3)).wait())
report["steps_after_retry"] = ck.steps()
report["listing"] = sorted(os.listdir(directory))
ck.close()

with pe.Checkpointer(directory, capture_rng=False) as again:
    target = {{"weights": torch.zeros(1000), "meta": {{}}}}
    report["restored_step"] = again.restore(target)
    report["restored_equal"] = bool(torch.equal(target["weights"], small(3)["weights"]))
    report["restored_meta"] = target["meta"]
    # Once the next save fits under the limit it commits: the failure left nothing behind.
    again.save(5, small(5)).wait()
    report["steps_at_end"] = again.steps()
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Runs the child once for the module: (its JSON report, the checkpoint directory)."""
    tmp_path = tmp_path_factory.mktemp("disk_full")
    script = tmp_path / "fill_disk.py"
    script.write_text(CHILD_CODE.format(limit=FILE_SIZE_LIMIT))
    directory = tmp_path / "ckpt"
    result = subprocess.run(
        [sys.executable, str(script), str(directory)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), directory


def assert_efbig_in_step(error: dict | None, directory: Path, step: int) -> None:
    assert error is not None, "the save over the file size limit did not fail"
    assert error["type"] == "OSError" and error["errno"] == errno.EFBIG, error
    # The path is the shard being written, inside the step's temporary directory.
    assert error["filename"].startswith(str(directory / f"step-{step:08d}.tmp-")), error
    assert error["filename"].endswith(".safetensors"), error
    assert error["filename"] in error["message"], error


def test_failed_write_raises_on_wait_with_the_path(report: tuple[dict, Path]) -> None:
    data, directory = report
    assert data["steps_after_small"] == [1]
    assert_efbig_in_step(data["handle_wait"], directory, 2)
    assert data["wait_after_reported"] is None
    assert data["steps_after_failed_wait"] == [1]


def test_unwaited_failure_is_raised_by_the_next_save(report: tuple[dict, Path]) -> None:
    data, directory = report
    assert_efbig_in_step(data["next_save"], directory, 3)
    assert data["steps_after_unwaited"] == [1]  # neither step 3 nor step 4 was committed


def test_a_failed_step_can_be_saved_again(report: tuple[dict, Path]) -> None:
    data, _ = report
    assert data["retry_failed_step"] is None
    assert data["steps_after_retry"] == [1, 3]


def test_failed_saves_leave_nothing_behind(report: tuple[dict, Path]) -> None:
    data, _ = report
    assert data["listing"] == [".pyengine-writer.lock", "step-00000001", "step-00000003"]


def test_older_checkpoint_still_restores_exactly(report: tuple[dict, Path]) -> None:
    data, directory = report
    assert data["restored_step"] == 3
    assert data["restored_equal"] is True
    assert data["restored_meta"] == {"step": 3}
    assert data["steps_at_end"] == [1, 3, 5]
    # Checked again here, outside the limited process.
    with pe.Checkpointer(directory, capture_rng=False) as ck:
        loaded = ck.load(1)
        assert torch.equal(loaded["weights"], torch.arange(1000, dtype=torch.float32) + 1)
        assert sorted(os.listdir(directory)) == [".pyengine-writer.lock", "step-00000001", "step-00000003",
                                                 "step-00000005"]
