"""A process that saves in a loop is SIGKILLed at random moments; every restart finds a
checkpoint that verifies, holds exactly what was saved at its step, and is never older
than one the killed process was told was durable."""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import select
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pyengine as pe

KILLS = 24
SEED = 20240611
KEEP_LAST = 2


def make_state(step: int) -> dict:
    """A pure function of the step (about 7 MB over three shards), so the parent can check
    any checkpoint it finds. The float values stay exact (below 2**23)."""
    return {
        "weights": torch.arange(1 << 20, dtype=torch.float32) * 0.5 + step,
        "moments": torch.arange(1 << 18, dtype=torch.float64) - 3 * step,
        "ids": np.arange(1 << 17, dtype=np.int64) * (step + 7),
        "meta": {"step": step, "tag": f"step-{step}", "history": list(range(step % 50))},
    }


def empty_state() -> dict:
    return {
        "weights": torch.zeros(1 << 20, dtype=torch.float32),
        "moments": torch.zeros(1 << 18, dtype=torch.float64),
        "ids": np.zeros(1 << 17, dtype=np.int64),
        "meta": {},
    }


# The child imports, says "imported" and waits for a line on stdin (so the parent can start
# the next child's slow import while it checks the previous one), then opens the directory,
# restores what it can and saves forever. After save(N) returns, save N-1 is durable
# (max_in_flight=1), so it prints "durable N-1".
CHILD_CODE = """
from __future__ import annotations

import sys

import numpy as np
import torch

import pyengine as pe

{state_code}


def say(line):
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()


say("imported")
if sys.stdin.readline().strip() != "go":
    sys.exit(0)
ck = pe.Checkpointer(sys.argv[1], keep_last={keep_last}, max_shards=3)
say("ready")
state = empty_state()
step = ck.restore(state) or 0
say(f"restored {{step}}")
while True:
    step += 1
    ck.save(step, make_state(step))
    say(f"durable {{step - 1}}")
"""


def read_line(proc: subprocess.Popen, what: str) -> str:
    # Guards against a hung child only; no assertion depends on how long anything takes.
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"child exited or hung before printing {what!r}; stderr:\n{err}")
    return line.strip()


def start_child(script: Path, directory: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    return proc


def kill_delay(rng: random.Random) -> float:
    # Mostly somewhere inside the save loop; sometimes right after the restore.
    return rng.uniform(0, 0.02) if rng.random() < 0.25 else rng.uniform(0, 0.3)


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
    script = tmp_path / "saver.py"
    state_code = inspect.getsource(make_state) + "\n\n" + inspect.getsource(empty_state)
    script.write_text(CHILD_CODE.format(state_code=state_code, keep_last=KEEP_LAST))
    directory = tmp_path / "ckpt"
    rng = random.Random(SEED)
    last_step = 0
    restored_steps = []
    torn_saves = 0
    child = spare = start_child(script, directory)
    try:
        for kill in range(KILLS):
            child, spare = spare, None
            assert read_line(child, "imported") == "imported"
            child.stdin.write("go\n")
            child.stdin.flush()
            assert read_line(child, "ready") == "ready"
            delay = kill_delay(rng)
            # The spare's import runs while this child saves, and is not on the clock of the kill.
            spare = start_child(script, directory)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.communicate(timeout=delay)
            child.send_signal(signal.SIGKILL)
            out, err = child.communicate()
            assert child.returncode == -signal.SIGKILL, f"child ended (rc {child.returncode}):\n{err}"

            lines = out.split()
            context = f"kill {kill} after {delay:.3f}s, child printed {out!r}"
            if "restored" in lines:
                # The child restored exactly what the parent verified after the previous kill.
                assert int(lines[lines.index("restored") + 1]) == last_step, context
            durable = [int(v) for k, v in zip(lines, lines[1:]) if k == "durable"]
            step, torn = verify_after_kill(directory)
            torn_saves += torn
            assert step >= last_step, f"step went backwards from {last_step} to {step}; {context}"
            assert step >= max(durable, default=0), f"durable step {max(durable)} lost; {context}"
            restored_steps.append(step)
            last_step = step
    finally:
        for proc in {child, spare} - {None}:
            proc.kill()
            proc.communicate()
    # The children really saved and pruned, and kills landed in the middle of saves.
    assert last_step > KEEP_LAST + 1, restored_steps
    assert torn_saves > 0, restored_steps
