"""Crash safety: SIGKILL a worker mid-trial and reopen; two processes share one SQLite study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyengine as pe

# A worker process: each trial trains a tiny model for STEPS steps, checkpointing every step
# through its own Checkpointer, and logs "<pid> <step>" for every step it executes.
WORKER = r"""
import os, sys, time, torch
import pyengine as pe
db, logdir, n_trials, sampler, steps, sleep = sys.argv[1:7]
steps, sleep = int(steps), float(sleep)

def objective(trial):
    model = torch.nn.Linear(2, 1)
    with trial.checkpointer(keep_last=1) as ck:
        start = ck.restore({"model": model}) or 0
        for step in range(start + 1, steps + 1):
            with open(os.path.join(logdir, f"trial{trial.number}.log"), "a") as f:
                f.write(f"{os.getpid()} {step}\n")
            time.sleep(sleep)
            ck.save(step, {"model": model}).wait()
            trial.report(step, float(step))
    return float((trial.params["k"] - 2) ** 2 + (trial.params["c"] != "b"))

space = {"k": pe.tune.IntUniform(0, 5), "c": pe.tune.Choice(["a", "b", "c", "d", "e"])}
study = pe.tune.Study(space, sampler=sampler, storage=db, seed=0, heartbeat_interval_s=0.2)
study.optimize(objective, n_trials=int(n_trials))
"""


def _spawn(tmp_path: Path, n_trials: int, sampler: str, steps: int, sleep: float) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [
        sys.executable,
        str(script),
        str(tmp_path / "study.db"),
        str(tmp_path),
        str(n_trials),
        sampler,
        str(steps),
        str(sleep),
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _log(tmp_path: Path, number: int) -> list[tuple[int, int]]:
    lines = (tmp_path / f"trial{number}.log").read_text().split()
    return [(int(lines[i]), int(lines[i + 1])) for i in range(0, len(lines), 2)]


def test_sigkilled_worker_trial_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    proc = _spawn(tmp_path, n_trials=2, sampler="random", steps=8, sleep=0.1)
    log0 = tmp_path / "trial0.log"
    deadline = time.monotonic() + 120
    while not (log0.exists() and len(log0.read_text().split()) >= 8):  # 4 steps started
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "worker never reached step 4"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # reap it: a zombie's pid still looks alive

    space = {"k": pe.tune.IntUniform(0, 5), "c": pe.tune.Choice(["a", "b", "c", "d", "e"])}
    killed = pe.tune.Study(space, sampler="random", storage=tmp_path / "study.db", seed=0).trials
    assert [t.state for t in killed] == [pe.tune.TrialState.RUNNING]  # what the crash left behind
    done_before = max(killed[0].intermediate, default=0)

    again = _spawn(tmp_path, n_trials=1, sampler="random", steps=8, sleep=0.0)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0, out
    trials = pe.tune.Study(space, sampler="random", storage=tmp_path / "study.db", seed=0).trials
    assert [t.state for t in trials] == [pe.tune.TrialState.COMPLETE] * 2
    assert trials[0].retries == 1 and "re-queued" in out
    assert sorted(trials[0].intermediate) == list(range(1, 9))
    runs: dict[int, list[int]] = {}
    for pid, step in _log(tmp_path, 0):
        runs.setdefault(pid, []).append(step)
    first, second = runs[proc.pid], runs[again.pid]
    assert len(runs) == 2
    # The second run continues after the newest committed checkpoint, not from step 1: at
    # most the step in flight when the kill came is repeated.
    assert second[0] >= done_before >= 3 and second[0] >= first[-1] - 1
    assert second == list(range(second[0], 9))


def test_two_worker_processes_never_duplicate_a_point(tmp_path):
    procs = [_spawn(tmp_path, n_trials=15, sampler="bayes", steps=1, sleep=0.02) for _ in range(2)]
    outs = [p.communicate(timeout=170)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    space = {"k": pe.tune.IntUniform(0, 5), "c": pe.tune.Choice(["a", "b", "c", "d", "e"])}
    study = pe.tune.Study(space, sampler="bayes", storage=tmp_path / "study.db", seed=0)
    trials = study.trials
    assert len(trials) == 30 and all(t.state == pe.tune.TrialState.COMPLETE for t in trials)
    assert len({study.space.key(t.params) for t in trials}) == 30  # the whole 6 x 5 space, each once
    assert len({t.pid for t in trials}) == 2  # both processes did work
