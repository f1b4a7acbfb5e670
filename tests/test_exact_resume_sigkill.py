"""A training process SIGKILLed at random moments and restarted until it finishes ends
with weights bit-identical to a run that was never interrupted: through the Trainer
(examples/trainer_exact_resume.py) and through a plain loop with Loader + Checkpointer
(examples/plain_loop_exact_resume.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pyengine as pe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = {
    "plain": (EXAMPLES / "plain_loop_exact_resume.py", ["--steps", "400", "--every", "25"]),
    "trainer": (EXAMPLES / "trainer_exact_resume.py", ["--epochs", "16", "--stop-point", "3.125"]),
}
# Both runs checkpoint every 25 steps, 400 steps in all: the kills below consume at most 8
# checkpoints, so every restart, and the last, resumes part way.
CHECKPOINTS = 16
KILLS = 4


def _env():
    # One intra-op thread in every run: the same arithmetic in the reference and the resumed run.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command(kind, run_dir, data):
    script, args = SCRIPTS[kind]
    return [sys.executable, str(script), "--dir", str(run_dir), "--data", str(data), *args]


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
    subprocess.run(_command(kind, tmp_path / "reference", data), check=True, env=_env(), capture_output=True,
                   timeout=600, cwd=tmp_path)
    ref_step, reference = _final_weights(tmp_path / "reference")

    rng = random.Random(f"{kind}-kills")
    run_dir = tmp_path / "killed"
    resumed_from = []
    for kill in range(KILLS):
        child = subprocess.Popen(_command(kind, run_dir, data), env=_env(), stdout=subprocess.PIPE, text=True,
                                 cwd=tmp_path)
        line = ""
        while not line.startswith("resumed from step"):  # printed once training starts
            line = child.stdout.readline()
            assert line, "the run ended before training started"
        resumed_from.append(int(line.split()[-1]))
        # Kill after a random number of checkpoints plus a random part of the next interval,
        # always well before the run could finish. The first run reports two saves: the second
        # save() returns only once the first is durable, so later runs must resume past step 0.
        for _ in range(2 if kill == 0 else rng.randrange(0, 3)):
            assert child.stdout.readline().startswith("step ")
        time.sleep(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    final = subprocess.run(_command(kind, run_dir, data), env=_env(), capture_output=True, text=True, timeout=600,
                           cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    resumed_from.append(int(final.stdout.split("resumed from step")[1].split()[0]))

    step, weights = _final_weights(run_dir)
    assert step == ref_step
    assert weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(weights[name], reference[name]), name
    # The kills interrupted training part way: later runs resumed from later, unfinished steps.
    assert resumed_from[0] == 0 and resumed_from == sorted(resumed_from), resumed_from
    assert 0 < resumed_from[-1] < ref_step, resumed_from
