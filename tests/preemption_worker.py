"""The processes tests/test_preemption.py starts (training itself is in preemption_runs.py).

    python tests/preemption_worker.py single OUT --moments 20 --trainer-moments 4 --seed S [--spawn]
        One process that imports torch once and forks every run from it: a fresh interpreter
        per run (--spawn) costs ~4 s of imports each. It trains uninterrupted references, then a plain
        loop SIGTERMed (or SIGUSR1ed) at `moments` random moments, each start resuming from what
        the last one left, then a Trainer likewise, then a final save that misses its grace
        deadline and one that gets a second signal. Writes OUT/report.json.
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/preemption_worker.py rank RUN ...
        One rank of a Trainer(strategy="ddp", on_preemption="save") run; the test signals the ranks.
        Its lines go to RUN/launch-<L>/rank-<R>.log, each with the time it was said.
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/preemption_worker.py cost OUT
        What the ranks' stop agreement costs a step in a plain DDP loop (measured; no test asserts it).

A forked run ends the way the interpreter would (atexit hooks, then the exit status), through
os._exit: the fork server's own frames must not run on in the child.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import pyengine as pe
from pyengine.checkpoint.directory import committed_steps

sys.path.insert(0, str(Path(__file__).parent))
import preemption_runs as runs  # noqa: E402
from killed_worker_runs import assert_identical  # noqa: E402


class ChildRun:
    """One run in a child process: forked from this one (which imported torch but runs no thread),
    or with `spawn` a fresh interpreter (`preemption_worker.py run`: it pays the imports, and exits as
    any program does, interpreter teardown included). The child reports lines through a pipe; its
    exit is seen through a pidfd, to the millisecond."""

    spawn = False

    def __init__(self, run: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        read_end, write_end = os.pipe()
        self._popen: subprocess.Popen | None = None
        if self.spawn:
            call = {"run": run.__name__, "args": [str(args[0]), str(args[1]), *args[2:]], "kwargs": kwargs}
            self._popen = subprocess.Popen([sys.executable, __file__, "run", json.dumps(call),
                                            "--report-fd", str(write_end)], pass_fds=(write_end,))
            pid = self._popen.pid
        else:
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                _run_forked(write_end, run, args, kwargs)
        os.close(write_end)
        self.pid, self._fd, self._pending, self.lines = pid, read_end, b"", []
        self._pidfd = os.pidfd_open(pid)
        self._status: tuple[int, float] | None = None

    def expect(self, prefix: str, timeout: float = 60.0) -> str:
        """The next line that starts with `prefix` (the lines before it are kept in self.lines)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                self.lines.append(line.decode())
                if self.lines[-1].startswith(prefix):
                    return self.lines[-1]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                raise TimeoutError(f"no {prefix!r} line from the run within {timeout} s; it said {self.lines[-5:]}")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise EOFError(f"the run ended before saying {prefix!r}; it said {self.lines[-5:]}")
            self._pending += chunk

    def send(self, signum: int) -> float:
        sent = time.monotonic()
        os.kill(self.pid, signum)
        return sent

    def wait(self, timeout: float = 120.0) -> tuple[int, float]:
        """(exit status, negative for a signal; monotonic time of the exit). Reads the rest of its lines."""
        if self._status is None:
            if not select.select([self._pidfd], [], [], timeout)[0]:
                os.kill(self.pid, signal.SIGKILL)
            exited = time.monotonic()
            if self._popen is not None:
                self._status = (self._popen.wait(), exited)
            else:
                self._status = (os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1]), exited)
            while chunk := os.read(self._fd, 65536):
                self._pending += chunk
            self.lines += [line.decode() for line in self._pending.split(b"\n") if line]
            self._pending = b""
            os.close(self._fd)
            os.close(self._pidfd)
        return self._status

    def said(self, prefix: str) -> list[str]:
        return [line for line in self.lines if line.startswith(prefix)]


def _run_forked(write_end: int, run: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    code = 1
    try:
        run(*args, say=lambda line: os.write(write_end, (line + "\n").encode()), **kwargs)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on stderr, and by the exit status
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _exit_of(run: ChildRun, sent: float) -> dict:
    code, exited = run.wait()
    stopped = run.said("stopped")
    return {"code": code, "latency_s": round(exited - sent, 4),
            "stopped_at": int(stopped[-1].split()[1]) if stopped else None}


def signalled_chain(rng: random.Random, moments: int, start: Callable[[], ChildRun], step_line: str,
                    max_steps_before: int, pause: float) -> dict:
    """`moments` runs, each signalled after a random number of steps and a random part of the next
    (in it, in a save of it, or in the final save), then one left to finish."""
    chain: dict[str, Any] = {"resumed": [], "exits": [], "signals": []}
    for _ in range(moments):
        run = start()
        chain["resumed"].append(int(run.expect("resumed").split()[1]))
        for _ in range(rng.randint(0, max_steps_before)):
            run.expect(step_line)
        time.sleep(rng.uniform(0.0, 1.5 * pause))
        signum = rng.choice([signal.SIGTERM, signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1])
        chain["signals"].append(signum.name)
        chain["exits"].append(_exit_of(run, run.send(signum)))
    run = start()
    chain["resumed"].append(int(run.expect("resumed").split()[1]))
    chain["final_code"] = run.wait()[0]
    return chain


def _compare(reference: Path, run: Path) -> dict:
    ref_step, want = runs.final_state(reference)
    step, got = runs.final_state(run)
    try:
        assert step == ref_step, f"final step {step}, the reference's {ref_step}"
        assert_identical(got, want)
    except AssertionError as e:
        return {"identical": False, "difference": str(e), "keys": sorted(got)}
    return {"identical": True, "step": step, "keys": sorted(got)}


def single(out: Path, moments: int, trainer_moments: int, seed: int) -> dict:
    data = runs.write_data(out / "data")
    # Building an optimizer imports torch._dynamo (and sympy): ~1.5 s that every fork would repeat.
    runs.make_training(data)
    rng = random.Random(seed)
    long_total = runs.STEPS_PER_EPOCH * (moments // 2 + 4)  # room for every moment's steps
    short_total = 2 * runs.STEPS_PER_EPOCH
    trainer_epochs = trainer_moments + 4
    for run_dir, run, length in ((out / "ref-plain", runs.plain_run, long_total),
                                 (out / "ref-short", runs.plain_run, short_total),
                                 (out / "ref-trainer", runs.trainer_run, trainer_epochs)):
        assert ChildRun(run, run_dir, data, length).wait()[0] == 0, f"the reference {run_dir.name} failed"
    report: dict[str, Any] = {"long_total": long_total, "trainer_total": trainer_epochs * runs.STEPS_PER_EPOCH}

    pause = 0.003
    report["plain"] = signalled_chain(
        rng, moments, lambda: ChildRun(runs.plain_run, out / "plain", data, long_total, pause=pause),
        "step", max_steps_before=10, pause=pause)
    report["trainer"] = signalled_chain(
        rng, trainer_moments, lambda: ChildRun(runs.trainer_run, out / "trainer", data, trainer_epochs, pause=pause),
        "step", max_steps_before=14, pause=pause)

    # The final save stalls past the deadline; then it gets a second signal within the deadline.
    # Steps are slow (50 ms): the stop lands on step 11 (or a little later), after step 8's save.
    for name, grace, stall, again in (("late", 1.0, 60.0, False), ("again", 30.0, 0.8, True)):
        run = ChildRun(runs.plain_run, out / name, data, short_total, pause=0.05, grace=grace,
                        stall_saves_after=runs.SAVE_EVERY, stall_seconds=stall)
        run.expect("step 10")
        sent = run.send(signal.SIGTERM)
        if again:
            run.expect("stalling")
            run.send(signal.SIGTERM)
            run.send(signal.SIGUSR1)
        scenario = _exit_of(run, sent)
        scenario["grace_s"] = grace
        scenario["committed"] = committed_steps(out / name)
        scenario["torn"] = sorted(p.name for p in (out / name).iterdir() if ".tmp-" in p.name)
        scenario["stalled"] = run.said("stalling")
        restart = ChildRun(runs.plain_run, out / name, data, short_total)
        scenario["resumed"] = int(restart.expect("resumed").split()[1])
        scenario["final_code"] = restart.wait()[0]
        report[name] = scenario

    # Every run has ended: this process may now run torch itself.
    report["plain"].update(_compare(out / "ref-plain", out / "plain"))
    report["trainer"].update(_compare(out / "ref-trainer", out / "trainer"))
    for name in ("late", "again"):
        report[name].update(_compare(out / "ref-short", out / name))
    return report


def spawned(call: dict, report_fd: int) -> None:
    """A run ChildRun(spawn) started: it ends as any program does (SystemExit(0) from the guard)."""
    torch.set_num_threads(1)
    say_to = os.fdopen(report_fd, "w", buffering=1)
    run = getattr(runs, call["run"])
    run(Path(call["args"][0]), Path(call["args"][1]), *call["args"][2:], say=lambda line: say_to.write(line + "\n"),
        **call["kwargs"])


def rank(args: argparse.Namespace) -> None:
    """One rank of a DDP Trainer run; reports to RUN/launch-<L>/rank-<R>.log (pid first)."""
    torch.set_num_threads(1)
    pe.distributed.init()
    if args.reference is not None:  # in this launch, before the run it is compared with
        runs.trainer_run(args.reference, args.data, args.epochs, lambda line: None, strategy="ddp")
    log_dir = args.run / f"launch-{args.launch}"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"rank-{pe.distributed.rank()}.log", "w", buffering=1) as log:

        def say(line: str) -> None:  # with the time (CLOCK_MONOTONIC: the test's clock too)
            log.write(f"{line} {time.monotonic():.4f}\n")

        say(f"pid {os.getpid()}")
        runs.trainer_run(args.run / "checkpoints", args.data, args.epochs, say, pause=args.pause, strategy="ddp")
    pe.distributed.destroy()


def cost(out: Path, steps: int = 400) -> None:
    """Seconds per stop_requested() in a 2-rank DDP loop of ~3 ms steps, against the same loop without it."""
    torch.set_num_threads(1)
    pe.distributed.init()
    if pe.distributed.rank() == 0:
        runs.write_data(out / "data")
    pe.distributed.barrier()
    model, opt, _, loader = runs.make_training(out / "data")
    model = pe.distributed.DataParallel().wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    figures: dict[str, Any] = {}
    with pe.Checkpointer(out / "ckpt") as ckpt, \
            pe.checkpoint.PreemptionGuard(ckpt, {"model": model, "optimizer": opt}) as guard:
        for guarded in (False, True, False, True):
            calls, batches = [], iter(loader)
            pe.distributed.barrier()
            began = time.perf_counter()
            for step in range(steps):
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    batch = next(batches)
                loss = runs.mse(model, batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if guarded:
                    t = time.perf_counter()
                    guard.stop_requested(step + 1)
                    calls.append(time.perf_counter() - t)
            per_step = (time.perf_counter() - began) / steps
            key = "guarded" if guarded else "plain"
            figures.setdefault(f"{key}_step_ms", []).append(round(per_step * 1e3, 3))
            if calls:
                figures.setdefault("call_median_us", []).append(round(statistics.median(calls) * 1e6, 1))
                figures.setdefault("call_mean_us", []).append(round(statistics.mean(calls) * 1e6, 1))
    if pe.distributed.rank() == 0:
        print(json.dumps(figures))
    pe.distributed.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "run", "rank", "cost"])
    parser.add_argument("out", help="the output directory (run: the call, as JSON)")
    parser.add_argument("--spawn", action="store_true", help="single: a fresh interpreter for every run")
    parser.add_argument("--report-fd", type=int)
    parser.add_argument("--moments", type=int, default=20)
    parser.add_argument("--trainer-moments", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--launch", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--reference", type=Path)
    args = parser.parse_args()
    if args.mode == "run":
        spawned(json.loads(args.out), args.report_fd)
        return
    out = Path(args.out)
    if args.mode == "single":
        torch.set_num_threads(1)  # before any torch work: no intra-op pool to carry into the forks
        ChildRun.spawn = args.spawn
        report = single(out, args.moments, args.trainer_moments, args.seed)
        (out / "report.json").write_text(json.dumps(report, indent=1))
    elif args.mode == "rank":
        args.run = out
        rank(args)
    else:
        cost(out)


if __name__ == "__main__":
    main()
