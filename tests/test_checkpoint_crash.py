"""A process that saves in a loop is SIGKILLed at random moments; every restart finds a
checkpoint that verifies, holds exactly what was saved at its step, and is never older
than one the killed process was told was durable."""

from __future__ import annotations

import os
import random
import signal
import time
import warnings
from pathlib import Path

import crash_saver_worker as worker
import fork_server
import numpy as np
import pytest
import torch
from crash_saver_worker import KEEP_LAST, empty_state, make_state

import pyengine as pe

KILLS = 24
SEED = 20240611


def assert_state_equals(actual: dict, step: int) -> None:
    expected = make_state(step)
    assert torch.equal(actual["weights"], expected["weights"]), f"weights of step {step} differ"
    assert torch.equal(actual["moments"], expected["moments"]), f"moments of step {step} differ"
    np.testing.assert_array_equal(actual["ids"], expected["ids"], err_msg=f"ids of step {step} differ")
    assert actual["meta"] == expected["meta"]


def verify_after_kill(directory: Path) -> tuple[int, bool]:
    """Opens the directory as a restarted process would and checks what it restores.
    Returns the step restored (0: none yet) and whether a torn save was left to clean up."""
    torn = any(".tmp-" in name for name in os.listdir(directory)) if directory.exists() else False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would mean a torn checkpoint was committed
        with pe.Checkpointer(directory, keep_last=KEEP_LAST) as ck:
            names = os.listdir(directory)
            assert not [n for n in names if ".tmp-" in n], names
            assert not [n for n in names if ".corrupt-" in n], names
            assert len(ck.steps()) <= KEEP_LAST + 1  # a kill between commit and prune leaves one extra
            state = empty_state()
            step = ck.restore(state)
            if step is None:
                return 0, torn
            assert step == ck.latest_step()
            assert_state_equals(state, step)
            return step, torn


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_or_tears_a_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    rng = random.Random(SEED)
    last_step = 0
    restored_steps = []
    torn_saves = 0
    context = fork_server.context()  # 24 starts that cost milliseconds, not an import of torch each
    for kill in range(KILLS):
        ours, theirs = context.Pipe(duplex=False)
        child = context.Process(target=worker.save_loop, args=(theirs, str(directory)), daemon=True)
        child.start()
        theirs.close()
        said: list[tuple] = []
        try:
            said.append(fork_server.receive(ours, child, timeout=120))
            assert said == [("ready", 0)], said
            if rng.random() < 0.25:
                # Anywhere in the restore, or soon after it.
                delay = rng.uniform(0.0, 0.02)
            else:
                # At a random moment of a later save (one takes ~50 ms here). Counted in saves, not
                # seconds, so that a slow host still makes progress: a restore can take longer
                # than any fixed delay, and kills that all land in it would test only the restore.
                need = rng.randrange(0, 3)
                while said[-1][0] != "restored":
                    said.append(fork_server.receive(ours, child, timeout=120))
                while sum(what == "durable" for what, _ in said) < need:
                    said.append(fork_server.receive(ours, child, timeout=120))
                delay = rng.uniform(0.0, 0.1)
            time.sleep(delay)
        finally:
            child.kill()
            child.join()
        assert child.exitcode == -signal.SIGKILL, f"child ended with exit code {child.exitcode}"
        said += fork_server.drain(ours)

        context_text = f"kill {kill}, {delay:.3f}s after its last message; the child said {said!r}"
        restored = [n for what, n in said if what == "restored"]
        if restored:
            # The child restored exactly what the parent verified after the previous kill.
            assert restored == [last_step], context_text
        durable = [n for what, n in said if what == "durable"]
        step, torn = verify_after_kill(directory)
        torn_saves += torn
        assert step >= last_step, f"step went backwards from {last_step} to {step}; {context_text}"
        assert step >= max(durable, default=0), f"durable step {max(durable)} lost; {context_text}"
        restored_steps.append(step)
        last_step = step
    # The children really saved and pruned, and kills landed in the middle of saves.
    assert last_step > KEEP_LAST + 1, restored_steps
    assert torn_saves > 0, restored_steps
