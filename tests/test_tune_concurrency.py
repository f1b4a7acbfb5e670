"""Several worker PROCESSES on one study, on SQLite and on a real PostgreSQL server: distinct
trials and right counts, a SIGKILLed worker's trial reaped on the storage's clock and resumed,
and (PostgreSQL) a worker whose own clock is wrong cannot reap live trials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyengine as pe
from pyengine.tune.trial import TrialState

# A worker: each trial runs STEPS steps of SLEEP seconds (fewer once a file "stop" exists),
# reporting each and saving its progress in its checkpoint directory (so a re-queued trial
# resumes), and logs "<pid> <step>" per step. HOST names the worker's host (several "hosts" on this machine, so
# reaping goes by heartbeats, not by pids); CLOCK_OFFSET skews this process's time.time().
WORKER = r"""
import json, os, sys, time
storage, logdir, n_trials, sampler, steps, sleep, host, grace, clock_offset = sys.argv[1:10]
if float(clock_offset):
    _real = time.time
    time.time = lambda: _real() + float(clock_offset)
import pyengine as pe
import pyengine.tune.study as study_module
study_module._HOST = host

def objective(trial):
    progress = trial.checkpoint_dir / "progress.json"
    start = json.loads(progress.read_text())["step"] if progress.exists() else 0
    for step in range(start + 1, int(steps) + 1):
        if os.path.exists(os.path.join(logdir, "stop")):
            break
        with open(os.path.join(logdir, f"trial{trial.number}.log"), "a") as f:
            f.write(f"{os.getpid()} {step}\n")
        time.sleep(float(sleep))
        trial.report(step, float(step))
        tmp = progress.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, progress)
    return float((trial.params["k"] - 2) ** 2 + (trial.params["c"] != "b"))

space = {"k": pe.tune.IntUniform(0, 5), "c": pe.tune.Choice(["a", "b", "c", "d", "e"])}
study = pe.tune.Study(space, sampler=sampler, storage=storage, seed=0, heartbeat_interval_s=0.2,
                      grace_period_s=float(grace))
study.optimize(objective, n_trials=int(n_trials))
"""
SPACE = {"k": pe.tune.IntUniform(0, 5), "c": pe.tune.Choice(["a", "b", "c", "d", "e"])}


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "study.db")
    return request.getfixturevalue("postgres_url")


def _spawn(tmp_path: Path, storage: str, n_trials: int, *, sampler: str = "random", steps: int = 1,
           sleep: float = 0.02, host: str = "host-a", grace: float = 60.0, clock_offset: float = 0.0):  # fmt: skip
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [storage, tmp_path, n_trials, sampler, steps, sleep, host, grace, clock_offset]
    # cwd outside the repository: the source tree would shadow the installed package.
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _steps_logged(tmp_path: Path, number: int) -> list[tuple[int, int]]:
    path = tmp_path / f"trial{number}.log"
    words = path.read_text().split() if path.exists() else []
    return [(int(words[i]), int(words[i + 1])) for i in range(0, len(words) - 1, 2)]


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


def _reopen(storage: str) -> pe.tune.Study:
    return pe.tune.Study(SPACE, sampler="random", storage=storage, seed=0)


def test_worker_processes_share_a_study_without_duplicates(tmp_path, storage):
    procs = [_spawn(tmp_path, storage, 10, sampler="bayes", host=f"host-{i}") for i in range(3)]
    _wait(procs)
    study = _reopen(storage)
    trials = study.trials
    assert [t.number for t in trials] == list(range(30))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({study.space.key(t.params) for t in trials}) == 30  # the whole 6 x 5 space, each once
    assert {t.pid for t in trials} == {p.pid for p in procs}  # every process did work


def test_a_sigkilled_worker_trial_is_reaped_by_heartbeat_and_resumed(tmp_path, storage):
    doomed = _spawn(tmp_path, storage, 1, steps=12, sleep=0.1, host="host-a", grace=1.5)
    deadline = time.monotonic() + 120
    while len(_steps_logged(tmp_path, 0)) < 4:
        assert doomed.poll() is None, doomed.communicate()[0]
        assert time.monotonic() < deadline, "the worker never reached step 4"
        time.sleep(0.02)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    (left,) = _reopen(storage).trials
    assert left.state == TrialState.RUNNING and left.pid == doomed.pid  # what the crash left behind

    # Another "host": it cannot see that the pid is gone, only that the heartbeat stopped.
    rescuer = _spawn(tmp_path, storage, 1, steps=12, sleep=0.1, host="host-b", grace=1.5)
    out = _wait([rescuer])[0]
    trials = _reopen(storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, out
    assert trials[0].retries == 1 and "re-queued" in out
    assert sorted(trials[0].intermediate) == list(range(1, 13))
    runs: dict[int, list[int]] = {}
    for pid, step in _steps_logged(tmp_path, 0):
        runs.setdefault(pid, []).append(step)
    first, second = runs[doomed.pid], runs[rescuer.pid]
    assert second[0] >= first[-1] >= 4 and second == list(range(second[0], 13))  # resumed, not restarted


def test_a_worker_with_a_wrong_clock_cannot_reap_live_trials(tmp_path, postgres_url):
    live = _spawn(tmp_path, postgres_url, 1, steps=10_000, sleep=0.1, host="host-a", grace=60.0)
    deadline = time.monotonic() + 120
    while not _steps_logged(tmp_path, 0):
        assert live.poll() is None, live.communicate()[0]
        assert time.monotonic() < deadline, "the live worker never started its trial"
        time.sleep(0.02)
    # An hour ahead, with a 1 s grace period: by its own clock every heartbeat is stale.
    skewed = _spawn(tmp_path, postgres_url, 3, steps=2, sleep=0.5, host="host-b", grace=1.0, clock_offset=3600.0)
    skewed_out = _wait([skewed])[0]
    during = _reopen(postgres_url).trials
    (tmp_path / "stop").touch()
    _wait([live])
    assert [t.state for t in during] == [TrialState.RUNNING] + [TrialState.COMPLETE] * 3, skewed_out
    assert during[0].pid == live.pid and during[0].retries == 0 and "re-queued" not in skewed_out
    trials = _reopen(postgres_url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4 and trials[0].retries == 0
    assert {t.pid for t in trials[1:]} == {skewed.pid}
    server_now = _reopen(postgres_url)._storage.now()
    assert all(abs(t.finished - server_now) < 600 for t in trials)  # stamped by the server, not the skewed clock
