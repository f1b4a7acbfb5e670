"""A training process SIGKILLed at random moments and restarted until it finishes ends
with weights bit-identical to a run that was never interrupted: through the Trainer
(examples/trainer_exact_resume.py) and through a plain loop with Loader + Checkpointer
(examples/plain_loop_exact_resume.py)."""

from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from forked_script import ForkedScript  # tests/ is on sys.path under pytest

import pyengine as pe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = {
    "plain": (EXAMPLES / "plain_loop_exact_resume.py", ["--steps", "400", "--every", "25"]),
    "trainer": (EXAMPLES / "trainer_exact_resume.py", ["--epochs", "16", "--stop-point", "3.125"]),
}
# Both runs checkpoint every 25 steps, 400 steps in all (16 checkpoints): the kills below
# consume at most 8, so every restart, and the last, resumes part way.
KILLS = 4


def _start(kind, run_dir, data, cwd):
    # Forked with torch imported, as `python SCRIPT ARGS` with one intra-op thread: the same
    # arithmetic in the reference and the resumed runs, and 12 starts without 12 imports.
    script, args = SCRIPTS[kind]
    return ForkedScript(script, ["--dir", str(run_dir), "--data", str(data), *args], cwd)


def _final_weights(run_dir):
    with pe.Checkpointer(run_dir / "checkpoints") as ckpt:
        return ckpt.latest_step(), ckpt.load()["model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    sys.path.insert(0, str(EXAMPLES))
    from plain_loop_exact_resume import make_dataset

    path = tmp_path_factory.mktemp("data") / "ds"
    make_dataset(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "trainer"])
def test_sigkilled_and_resumed_run_ends_bit_identical(kind, data, tmp_path):
    reference_run = _start(kind, tmp_path / "reference", data, tmp_path)
    output = reference_run.read_all()
    assert reference_run.wait() == 0, output
    ref_step, reference = _final_weights(tmp_path / "reference")

    rng = random.Random(f"{kind}-kills")
    run_dir = tmp_path / "killed"
    resumed_from = []
    for kill in range(KILLS):
        child = _start(kind, run_dir, data, tmp_path)
        line = ""
        while not line.startswith("resumed from step"):  # printed once training starts
            line = child.readline()
            assert line, "the run ended before training started"
        resumed_from.append(int(line.split()[-1]))
        # Kill after a random number of checkpoints plus a random part of the next interval,
        # always well before the run could finish. The first run reports two saves: the second
        # save() returns only once the first is durable, so later runs must resume past step 0.
        for _ in range(2 if kill == 0 else rng.randrange(0, 3)):
            assert child.readline().startswith("step ")
        time.sleep(rng.uniform(0.0, 0.05))
        child.kill()
        assert child.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    final = _start(kind, run_dir, data, tmp_path)
    output = final.read_all()
    assert final.wait() == 0, output
    resumed_from.append(int(output.split("resumed from step")[1].split()[0]))

    step, weights = _final_weights(run_dir)
    assert step == ref_step
    assert weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(weights[name], reference[name]), name
    # The kills interrupted training part way: later runs resumed from later, unfinished steps.
    assert resumed_from[0] == 0 and resumed_from == sorted(resumed_from), resumed_from
    assert 0 < resumed_from[-1] < ref_step, resumed_from
