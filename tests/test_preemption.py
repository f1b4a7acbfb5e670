"""Preemption that loses nothing (pe.checkpoint.PreemptionGuard, Trainer(on_preemption="save")).

A run SIGTERMed (or SIGUSR1ed) at random moments exits with status 0 well within the grace budget,
each time with a final checkpoint of the step it stopped at, and the run restarted after every
signal ends bit for bit where an uninterrupted run ends: a plain loop at 20 moments and a Trainer
in one process (tests/preemption_worker.py forks every run from one process that imported torch
once), and a 2-rank DDP Trainer under torchrun, signalled on one rank or both, whose ranks stop
at the same step. A final save that misses the deadline exits with status 75 and leaves the older
checkpoint the newest; a second signal during the final save changes nothing.

PYENGINE_PREEMPTION_MOMENTS=20 signals the Trainer runs 20 times as well (default: 4 in one
process, 2 under torchrun, where a launch costs ~10 s here: imports, and ~1.5 s of interpreter teardown).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import pyengine as pe

WORKER = Path(__file__).with_name("preemption_worker.py")
sys.path.insert(0, str(WORKER.parent))
import preemption_runs as runs  # noqa: E402
from killed_worker_runs import assert_identical  # noqa: E402
from torchrun_launch import _JOB_VARIABLES  # noqa: E402

MOMENTS = 20
FULL_MOMENTS = os.environ.get("PYENGINE_PREEMPTION_MOMENTS")
TRAINER_MOMENTS = int(FULL_MOMENTS or 4)
TORCHRUN_MOMENTS = int(FULL_MOMENTS or 2)
GRACE_SECONDS = 30.0  # the default budget, which every run here uses but the "late" one


def _env() -> dict[str, str]:
    # One intra-op thread: the same arithmetic in every run. No variable of an outer torchrun job.
    return {**{k: v for k, v in os.environ.items() if k not in _JOB_VARIABLES}, "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


# ------------------------------------------- the one-process runs (forked), started in the background


@pytest.fixture(scope="module", autouse=True)
def _forked_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Starts the one-process runs in the background as this module starts, when a selected test
    needs them: they mostly wait (for signals, stalls, paused steps), so the torchrun test, first in
    the module, runs beside them."""
    if not any("single" in item.fixturenames for item in request.session.items
               if getattr(item, "module", None) is request.module):
        yield None
        return
    out = tmp_path_factory.mktemp("preemption")
    with open(out / "stderr.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(WORKER), "single", str(out), "--moments", str(MOMENTS),
                                 "--trainer-moments", str(TRAINER_MOMENTS), "--seed", "19"],
                                env=_env(), stdout=log, stderr=log, cwd=out)
        try:
            yield out, proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def single(_forked_runs) -> dict:
    out, proc = _forked_runs
    assert proc.wait(timeout=600) == 0, (out / "stderr.log").read_text()[-4000:]
    report = json.loads((out / "report.json").read_text())
    print(json.dumps({k: _summary(report[k]) for k in ("plain", "trainer")}))
    return report


# --------------------------------------------------------------------------- 2 ranks, torchrun


def _rank_lines(launch_dir: Path, rank: int) -> list[str]:
    try:
        return (launch_dir / f"rank-{rank}.log").read_text().splitlines()
    except FileNotFoundError:
        return []


def _started(launch_dir: Path, proc: subprocess.Popen, timeout: float = 120.0) -> dict[int, tuple[int, int]]:
    """rank -> (pid, step resumed from), once both ranks train under their guards."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = {r: _rank_lines(launch_dir, r) for r in (0, 1)}
        resumed = {r: [x for x in lines[r] if x.startswith("resumed")] for r in (0, 1)}
        if all(resumed.values()):
            return {r: (int(lines[r][0].split()[1]), int(resumed[r][0].split()[1])) for r in (0, 1)}
        assert proc.poll() is None, f"torchrun ended (status {proc.returncode}) before both ranks trained"
        time.sleep(0.005)
    raise TimeoutError("the ranks did not start training")


def _wait_exit(proc: subprocess.Popen, timeout: float) -> float:
    """Waits for `proc`; returns when it exited (monotonic), to the millisecond (a pidfd)."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        ready = select.select([pidfd], [], [], timeout)[0]
        exited = time.monotonic()
    finally:
        os.close(pidfd)
    if not ready:
        proc.kill()
    proc.wait()
    return exited


@pytest.mark.distributed
def test_two_ranks_under_torchrun_signalled_on_one_or_both_stop_at_one_step_and_end_bit_identical(
        tmp_path: Path) -> None:
    data = runs.write_data(tmp_path / "data")
    run, reference = tmp_path / "run", tmp_path / "reference"
    epochs = TORCHRUN_MOMENTS + 4
    rng = random.Random("torchrun-preemption")
    moments = []
    with open(tmp_path / "torchrun.log", "w") as log:
        for launch in range(TORCHRUN_MOMENTS + 1):
            final = launch == TORCHRUN_MOMENTS
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
                   "rank", str(run), "--data", str(data), "--epochs", str(epochs), "--launch", str(launch),
                   "--pause", "0" if final else "0.02"]
            if final:  # the uninterrupted run trains first in the same ranks: a launch costs seconds
                cmd += ["--reference", str(reference)]
            proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=log, cwd=tmp_path)
            if final:
                _wait_exit(proc, 300)
                assert proc.returncode == 0, (tmp_path / "torchrun.log").read_text()[-4000:]
                break
            launch_dir = run / f"launch-{launch}"
            started = _started(launch_dir, proc)
            time.sleep(rng.uniform(0.0, 0.4))
            targets = ([1], [0], [0, 1])[launch % 3]  # rank 1 alone first: rank 0 commits and must learn of it
            sent = time.monotonic()
            for r in targets:
                os.kill(started[r][0], signal.SIGTERM)
            exited = _wait_exit(proc, 2 * GRACE_SECONDS)
            said = [[x.split() for x in _rank_lines(launch_dir, r) if x.startswith("stopped")] for r in (0, 1)]
            moments.append({"targets": targets, "code": proc.returncode, "latency_s": round(exited - sent, 3),
                            "resumed": started[0][1], "stops": [[int(x[1]) for x in lines] for lines in said],
                            # when the last rank had the final checkpoint durable (the rest is teardown)
                            "durable_s": round(max(float(x[2]) for lines in said for x in lines) - sent, 3)
                            if all(said) else None})
    print(json.dumps(moments))
    total = epochs * runs.STEPS_PER_EPOCH
    for i, m in enumerate(moments):
        assert m["code"] == 0, (i, m, (tmp_path / "torchrun.log").read_text()[-4000:])  # both ranks exited 0
        assert m["latency_s"] < GRACE_SECONDS, (i, m)
        (stop0,), (stop1,) = m["stops"]
        assert stop0 == stop1, (i, m)  # the ranks agreed on the step, whichever rank got the signal
        assert m["resumed"] < stop0 < total, (i, m)
        if i + 1 < len(moments):
            assert moments[i + 1]["resumed"] == stop0, (i, moments)
    final_words = [line.split()[:2] for line in _rank_lines(run / f"launch-{TORCHRUN_MOMENTS}", 0)]
    assert ["resumed", str(moments[-1]["stops"][0][0])] in final_words and ["done"] in [w[:1] for w in final_words]
    ref_step, want = runs.final_state(reference)
    step, got = runs.final_state(run / "checkpoints")
    assert step == ref_step == total
    assert_identical(got, want)


# ------------------------------------------------------------------------- in this process


@pytest.fixture
def caught_sigterm():
    """A SIGTERM handler of the test's own: restoring it is checked, and should the guard fail to
    catch a signal, this one does (instead of pytest dying)."""
    caught: list[int] = []

    def handler(signum, frame):
        caught.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    yield handler, caught
    signal.signal(signal.SIGTERM, previous)


def _watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pyengine-preemption-watchdog"]


def test_without_exit_it_returns_true_after_a_durable_save_and_puts_everything_back(tmp_path: Path,
                                                                                     caught_sigterm) -> None:
    handler, caught = caught_sigterm
    theirs_read, theirs_write = socket.socketpair()
    theirs_write.setblocking(False)
    before = signal.set_wakeup_fd(theirs_write.fileno())
    weights = torch.zeros(1000)
    try:
        with pe.Checkpointer(tmp_path, capture_rng=False) as ckpt, \
                pe.checkpoint.PreemptionGuard(ckpt, {"w": weights}, exit_on_stop=False) as guard:
            assert signal.getsignal(signal.SIGTERM) != handler
            answers = []
            for step in range(1, 6):
                weights += 1
                if step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                answers.append(guard.stop_requested(step))
                if answers[-1]:
                    break
            assert answers == [False, False, True]  # the signal came in step 3, before its call
            assert guard.stop_requested(4) is True  # and stays
            assert guard.stopped and guard.stop_step == 3
            assert ckpt.steps() == [3]
            # The signal's wake-up byte went on to the wake-up fd set before the guard's.
            assert select.select([theirs_read], [], [], 5.0)[0]
            assert theirs_read.recv(16) == bytes([signal.SIGTERM])
        with pe.Checkpointer(tmp_path) as ckpt:
            assert torch.equal(ckpt.load()["w"], torch.full((1000,), 3.0))
        assert signal.getsignal(signal.SIGTERM) is handler and caught == []
        assert signal.set_wakeup_fd(theirs_write.fileno()) == theirs_write.fileno()  # ours again
        assert not _watchdogs()
    finally:
        signal.set_wakeup_fd(before)
        theirs_read.close()
        theirs_write.close()


def test_a_step_the_loop_just_saved_is_not_saved_twice_and_saves_in_flight_complete(tmp_path: Path,
                                                                                     caught_sigterm) -> None:
    weights = torch.zeros(1 << 16)
    with pe.Checkpointer(tmp_path, capture_rng=False) as ckpt, \
            pe.checkpoint.PreemptionGuard(ckpt, {"w": weights}, exit_on_stop=False) as guard:
        ckpt.save(2, {"w": weights})
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.stop_requested(2)  # step 2's save may still be in flight: it is waited for
        assert ckpt.steps() == [2] and ckpt.load(2)["w"].sum() == 0


def test_exit_on_stop_raises_systemexit_0_and_a_signal_after_the_last_step_still_exits_0(tmp_path: Path,
                                                                                        caught_sigterm) -> None:
    handler, caught = caught_sigterm
    with pe.Checkpointer(tmp_path, capture_rng=False) as ckpt:
        with pytest.raises(SystemExit) as stop, \
                pe.checkpoint.PreemptionGuard(ckpt, lambda: {"w": torch.ones(3)}) as guard:
            os.kill(os.getpid(), signal.SIGTERM)
            guard.stop_requested(7)
        assert stop.value.code == 0 and ckpt.steps() == [7]
        # The loop ends before it sees the signal: leaving the block waits for the saves, then exits 0.
        with pytest.raises(SystemExit) as stop, pe.checkpoint.PreemptionGuard(ckpt, {"w": torch.ones(3)}) as guard:
            ckpt.save(8, {"w": torch.ones(3)})
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.value.code == 0 and guard.stopped and guard.stop_step is None
        assert ckpt.steps() == [7, 8]
    assert signal.getsignal(signal.SIGTERM) is handler and caught == [] and not _watchdogs()


def test_no_signal_no_stop_and_an_error_in_the_loop_passes_through_with_the_handlers_back(tmp_path: Path,
                                                                                         caught_sigterm) -> None:
    handler, _ = caught_sigterm
    with pe.Checkpointer(tmp_path) as ckpt:
        with pe.checkpoint.PreemptionGuard(ckpt, {}) as guard:
            assert not any(guard.stop_requested(step) for step in range(100))
        assert not guard.stopped and ckpt.steps() == []
        with pytest.raises(KeyError), pe.checkpoint.PreemptionGuard(ckpt, {}):
            raise KeyError("the user's own error")
    assert signal.getsignal(signal.SIGTERM) is handler and not _watchdogs()
    with pytest.raises(RuntimeError, match="inside the guarded block"):
        guard.stop_requested(1)


def test_bad_arguments_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pe.Checkpointer(tmp_path) as ckpt:
        guard = pe.checkpoint.PreemptionGuard
        with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
            guard(ckpt, {}, signals=[signal.SIGTERM, signal.SIGKILL])
        with pytest.raises(ValueError, match="at least one signal"):
            guard(ckpt, {}, signals=[])
        with pytest.raises(ValueError, match="signal numbers"):
            guard(ckpt, {}, signals=["TERM"])
        for grace in (0, -1.0, float("inf"), True):
            with pytest.raises(ValueError, match="grace_seconds must be a positive number"):
                guard(ckpt, {}, grace_seconds=grace)
        with pytest.raises(ValueError, match="late_exit_code"):
            guard(ckpt, {}, late_exit_code=300)
        with pytest.raises(TypeError, match="pe.Checkpointer"):
            guard(str(tmp_path), {})
        with pytest.raises(TypeError, match="mapping"):
            guard(ckpt, [("model", 1)])
        with guard(ckpt, {}) as active:
            with pytest.raises(ValueError, match="non-negative integer"):
                active.stop_requested(-1)
            with pytest.raises(RuntimeError, match="already active"):
                active.__enter__()
        errors = []
        thread = threading.Thread(target=lambda: _enter_in_thread(guard(ckpt, {}), errors))
        thread.start()
        thread.join()
        assert errors and "main thread" in errors[0]
    model = torch.nn.Linear(2, 1)
    for kwargs, message in (({"on_preemption": "save"}, "needs a checkpoint_dir"),
                            ({"on_preemption": "exit", "checkpoint_dir": tmp_path}, "on_preemption must be one of"),
                            ({"on_preemption": "save", "checkpoint_dir": tmp_path, "preemption_grace_seconds": 0},
                             "grace_seconds")):
        with pytest.raises(ValueError, match=message):
            pe.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), runs.mse, [{}], progress=False, **kwargs)


def _enter_in_thread(guard: pe.checkpoint.PreemptionGuard, errors: list[str]) -> None:
    try:
        guard.__enter__()
    except RuntimeError as e:
        errors.append(str(e))


# ------------------------------------------------------------------------ one process, forked runs


def _summary(chain: dict) -> dict:
    latencies = [e["latency_s"] for e in chain["exits"]]
    return {"moments": len(latencies), "codes": sorted({e["code"] for e in chain["exits"]}),
            "latency_max_s": max(latencies), "latency_median_s": statistics.median(latencies),
            "identical": chain["identical"]}


def _assert_chain(chain: dict, moments: int, total: int) -> None:
    exits = chain["exits"]
    assert len(exits) == moments
    for i, e in enumerate(exits):
        assert e["code"] == 0, (i, e)
        assert e["latency_s"] < GRACE_SECONDS, (i, e)
        # Every signal stopped the run part way, at a step past the one it had resumed from...
        assert chain["resumed"][i] < e["stopped_at"] < total, (i, e, chain["resumed"])
        # ...and the next start resumed from exactly that step: nothing trained was lost.
        assert chain["resumed"][i + 1] == e["stopped_at"], (i, chain["resumed"])
    assert chain["final_code"] == 0
    assert chain["identical"], chain.get("difference")
    assert chain["step"] == total


def test_a_plain_loop_signalled_at_20_moments_exits_0_each_time_and_ends_bit_identical(single: dict) -> None:
    chain = single["plain"]
    _assert_chain(chain, MOMENTS, single["long_total"])
    assert set(chain["signals"]) == {"SIGTERM", "SIGUSR1"}
    assert chain["keys"] == ["loader", "model", "optimizer", "scheduler"]
    # Some stops fell on a step the loop had just saved itself: that checkpoint was kept, not redone.
    assert any(e["stopped_at"] % runs.SAVE_EVERY == 0 for e in chain["exits"])


def test_a_trainer_with_on_preemption_save_resumes_mid_epoch_bit_identical_history_included(single: dict) -> None:
    chain = single["trainer"]
    _assert_chain(chain, TRAINER_MOMENTS, single["trainer_total"])
    assert any(e["stopped_at"] % runs.STEPS_PER_EPOCH for e in chain["exits"]), "no stop fell mid-epoch"
    # assert_identical compared the Trainer's state too: every epoch's train and val loss, bit for bit.
    assert "trainer" in chain["keys"]


def _stalled_step(scenario: dict) -> int:
    """The step of the final save that stalled: after step 8's periodic save, before step 16's."""
    (line,) = scenario["stalled"]
    step = int(line.split()[1])
    assert runs.SAVE_EVERY < step < 2 * runs.SAVE_EVERY, scenario
    return step


def test_a_final_save_past_the_deadline_exits_75_in_time_and_the_older_checkpoint_stays_newest(single: dict) -> None:
    late = single["late"]
    stop = _stalled_step(late)
    assert late["code"] == pe.checkpoint.preemption.LATE_EXIT_CODE
    assert late["grace_s"] - 0.5 < late["latency_s"] <= late["grace_s"], late
    assert late["stopped_at"] is None  # it never reported the final checkpoint durable
    assert late["committed"] == [8], late  # the final save was not committed: step 8 stays the newest
    assert len(late["torn"]) == 1 and late["torn"][0].startswith(f"step-{stop:08d}.tmp-"), late
    assert late["resumed"] == 8 and late["final_code"] == 0  # the restart removed the torn save
    assert late["identical"], late.get("difference")


def test_a_second_signal_during_the_final_save_is_ignored_and_the_save_commits(single: dict) -> None:
    again = single["again"]
    stop = _stalled_step(again)  # the second and third signals came during this stall
    assert again["code"] == 0 and again["stopped_at"] == stop, again
    assert again["committed"] == [8, stop] and again["torn"] == [], again
    assert again["resumed"] == stop and again["final_code"] == 0
    assert again["identical"], again.get("difference")
