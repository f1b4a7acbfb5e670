"""PreemptionGuard: on SIGTERM (or SIGUSR1, which SLURM sends ahead of a time limit), the step in
progress finishes, a final checkpoint is saved and made durable, and the process exits with status 0.

    with pe.checkpoint.PreemptionGuard(ckpt, state) as guard:
        for step in range(start, total):
            train_step()
            ckpt.maybe_save(step + 1, state)
            guard.stop_requested(step + 1)   # after a signal: saves step + 1, then exits with status 0

Why it is built this way:

- The Python signal handler records which signal came and when, nothing else: it runs between two
  bytecodes of whatever the main thread was doing, maybe while that holds a lock, so it takes no lock
  and does no I/O. Python's C-level handler also writes the signal's number to a socket
  (signal.set_wakeup_fd), which wakes the guard's watchdog thread at once, even while the main thread
  is inside a long C call: the grace deadline counts from the signal's arrival.
- Under torch.distributed every rank must stop at the same step, or one rank would wait forever in
  the next DDP all-reduce of another. Each stop_requested() call votes, on a gloo group of the
  guard's own, the time this rank's signal came (+inf: none) in an all_reduce(MIN) that it starts
  without waiting for and reads at the next call. Every rank reads the same result at the same call,
  so all stop at the same step, one step after the earliest signal. The round runs during the step:
  a call costs the launch of one 8-byte collective, not a round trip.
- The deadline is `grace_seconds` after the earliest signal. If the final checkpoint is not durable
  by then, the watchdog ends the process with os._exit(late_exit_code) (75, EX_TEMPFAIL: "try
  again"). A save that was not committed is never loaded (a commit is an atomic rename), so the
  newest durable checkpoint stays the newest and a restart resumes from it exactly. Not status 0:
  the steps since that checkpoint are lost, and whoever restarts the job should be able to tell.
- A second signal during the final save is ignored (and reported on stderr): the save goes on until
  the deadline. A SIGKILL that follows tears nothing either.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pyengine.checkpoint.checkpointer import Checkpointer

__all__ = ["DEFAULT_SIGNALS", "LATE_EXIT_CODE", "PreemptionGuard"]

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
LATE_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): the final checkpoint missed the deadline; retry
_EXIT_MARGIN_SECONDS = 0.25  # the watchdog acts this long before the deadline, to flush stdio and exit
_WAKE = 0  # a byte no signal has: the training thread wakes the watchdog with it


class PreemptionGuard:
    """Turns a preemption signal into a final checkpoint and an exit with status 0.

    Enter it in the main thread (Python runs signal handlers there) on every rank; it installs its
    handlers on entry and puts the previous handlers (and wake-up fd) back on exit. Call
    stop_requested(step) once per step on every rank. Under torch.distributed, construct it on
    every rank together: it creates a gloo process group.

    Args:
        checkpointer: the pe.Checkpointer that takes the final checkpoint.
        state: what to save, as for Checkpointer.save(); or a function returning it, called at the
            stop (for objects that training replaces, such as a re-wrapped model).
        signals: the signals that request a stop.
        grace_seconds: from the earliest signal (on any rank) until the process must be gone.
        exit_on_stop: True: once the final checkpoint is durable, stop_requested() raises
            SystemExit(0), which unwinds the loop (finally clauses and the with-block run). False:
            it returns True; leaving the loop and ending the process are the caller's.
        late_exit_code: the status the process exits with when the final checkpoint is not durable
            by the deadline.

    Raises:
        ValueError / TypeError: a bad argument (a signal that cannot be caught, a grace <= 0).
    """

    signals: tuple[signal.Signals, ...]
    grace_seconds: float
    late_exit_code: int
    exit_on_stop: bool
    stop_step: int | None  # the final checkpoint's step, once it is durable
    stopped: bool  # a stop was agreed (and every save it waited for is durable)

    def __init__(self, checkpointer: Checkpointer, state: Mapping[str, Any] | Callable[[], Mapping[str, Any]], *,
                 signals: Iterable[int] = DEFAULT_SIGNALS, grace_seconds: float = 30.0, exit_on_stop: bool = True,
                 late_exit_code: int = LATE_EXIT_CODE) -> None:
        if not isinstance(checkpointer, Checkpointer):
            raise TypeError(f"checkpointer must be a pe.Checkpointer, got {type(checkpointer).__name__}")
        if not (isinstance(state, Mapping) or callable(state)):
            raise TypeError("state must be a mapping from names to objects (as for Checkpointer.save), or a "
                            f"function returning one; got {type(state).__name__}")
        self.signals = check_signals(signals)
        self.grace_seconds = check_grace(grace_seconds)
        if not isinstance(late_exit_code, numbers.Integral) or not 0 <= late_exit_code <= 255:
            raise ValueError(f"late_exit_code must be an exit status in 0..255, got {late_exit_code!r}")
        self.late_exit_code = int(late_exit_code)
        self.exit_on_stop = bool(exit_on_stop)
        self.stop_step = None
        self.stopped = False
        self._ckpt: Checkpointer = checkpointer
        self._state: Mapping[str, Any] | Callable[[], Mapping[str, Any]] = state
        self._agreement: _LocalAgreement | _RankAgreement = _agreement_for_this_process()
        self._arrival: tuple[int, float, float] | None = None  # (signal, monotonic, wall) of the first
        self._previous_handlers: dict[int, Any] = {}
        self._previous_wakeup_fd: int = -1
        self._wakeup_fd_set: bool = False
        self._watchdog: _Watchdog | None = None  # set while the guard is active

    # ---------------------------------------------------------------------------- the loop

    def stop_requested(self, step: int) -> bool:
        """Call once per training step on every rank, after the step's update, with the number of
        steps done: the step the final checkpoint is saved as (what restore() will return).

        Returns False while no stop is agreed. Once one is (a signal came during an earlier step; in
        a world of several ranks, one call later on every rank alike): waits for the saves in
        flight, saves `state` as checkpoint `step` unless that step is already saved (by maybe_save
        just before), waits until it is durable, then raises SystemExit(0); with exit_on_stop=False
        it returns True instead, and True on every later call.

        Raises:
            SystemExit: with status 0, once the final checkpoint is durable (exit_on_stop=True).
            CheckpointError / OSError: the final save, or one it waited for, failed; the newest
                durable checkpoint is intact, and the deadline still holds.
        """
        if self._watchdog is None:
            raise RuntimeError("stop_requested() is for inside the guarded block: "
                               "with pe.checkpoint.PreemptionGuard(ckpt, state) as guard: ...")
        if self.stopped:
            return True
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer (the steps done), got {step!r}")
        earliest = self._agreement.vote(self._signal_wall_time())
        if earliest is None:
            return False
        self._stop(int(step), earliest)
        if self.exit_on_stop:
            raise SystemExit(0)
        return True

    def _stop(self, step: int | None, earliest: float) -> None:
        """Makes the saves in flight durable and, given a step, the final checkpoint; then disarms
        the deadline. `earliest`: the wall time of the first signal on any rank."""
        assert self._watchdog is not None
        self._watchdog.arm(self._deadline_from(earliest))
        name = _signal_name(self._arrival[0]) if self._arrival is not None else "a preemption signal on another rank"
        if step is not None:
            self._say(f"{name}: stopping at step {step}, saving the final checkpoint "
                      f"({self._watchdog.seconds_left():.1f} s of the grace budget left)")
        else:
            self._say(f"{name} after the last step: waiting for the checkpoints in flight")
        self._ckpt.wait()  # the saves in flight first: a save() would wait for them anyway
        if step is not None and self._agreement.rank0_decides(self._ckpt.latest_step() != step):
            self._ckpt.save(step, self._state() if callable(self._state) else self._state).wait()
        self._watchdog.disarm()
        self.stopped = True
        self.stop_step = step
        what = f"checkpoint step {step} is durable" if step is not None else "the checkpoints are durable"
        self._say(f"{what}; " + ("exiting with status 0" if self.exit_on_stop else "training stops"))

    # ---------------------------------------------------------------------- entry and exit

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread: Python runs signal "
                               "handlers only there")
        if self._watchdog is not None:
            raise RuntimeError("this PreemptionGuard is already active")
        watchdog = _Watchdog(self)
        try:
            self._previous_wakeup_fd = signal.set_wakeup_fd(watchdog.wakeup_fd, warn_on_full_buffer=False)
            self._wakeup_fd_set = True
            watchdog.start(forward_to=self._previous_wakeup_fd)
            for signum in self.signals:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        except BaseException:
            self._restore_signals()
            watchdog.stop()
            raise
        self._watchdog = watchdog
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._watchdog is None:
            return
        watchdog = self._watchdog
        try:
            if exc_type is None and not self.stopped:
                # A signal after the last stop_requested() (the loop ended first): nothing is left to
                # train, but the saves in flight still become durable. Every rank settles alike.
                earliest = self._agreement.settle(self._signal_wall_time())
                if earliest is not None:
                    self._stop(None, earliest)
        finally:
            self._restore_signals()
            self._watchdog = None
            # An error with a deadline armed (a failed final save) leaves the watchdog running, so
            # that the process is still gone by the deadline while it unwinds.
            if not watchdog.armed:
                watchdog.stop()
        if self.stopped and self.exit_on_stop and exc_type is None:
            raise SystemExit(0)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: record, nothing more (see the module notes).
        self._note_arrival(signum)

    def _note_arrival(self, signum: int) -> float:
        """Records the first signal; called by the handler and by the watchdog, which may see the
        signal's wake-up byte first (a racing second call records nearly the same instant).
        Returns the first signal's monotonic arrival time."""
        arrival = self._arrival
        if arrival is None:
            arrival = self._arrival = (signum, time.monotonic(), time.time())
        return arrival[1]

    def _restore_signals(self) -> None:
        for signum, previous in self._previous_handlers.items():
            # None: a handler installed from C, which Python cannot reinstate; the default is closest.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers.clear()
        if self._wakeup_fd_set:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            self._wakeup_fd_set = False
            self._previous_wakeup_fd = -1

    # ---------------------------------------------------------------------------- helpers

    def _signal_wall_time(self) -> float | None:
        arrival = self._arrival
        if arrival is None:
            return None
        assert self._watchdog is not None
        self._watchdog.arm(arrival[1] + self.grace_seconds)  # in case its wake-up byte was lost
        return arrival[2]

    def _deadline_from(self, earliest_wall: float) -> float:
        """The monotonic deadline for a signal at wall time `earliest_wall` (maybe on another host)."""
        return time.monotonic() + (earliest_wall + self.grace_seconds - time.time())

    def _say(self, message: str) -> None:
        if self._agreement.rank == 0:
            print(f"pyengine: {message}", file=sys.stderr, flush=True)


class _Watchdog:
    """A daemon thread that ends the process when the deadline passes before disarm().

    It sleeps on the read end of the signal wake-up socket, so it learns of a signal the moment it
    arrives; bytes meant for a wake-up fd set before the guard's are passed on to it. The training
    thread calls arm(), disarm() and stop(); a lock orders them with the thread's reads.
    """

    def __init__(self, guard: PreemptionGuard) -> None:
        self._guard = guard
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._lock = threading.Lock()
        self._deadline: float | None = None  # monotonic
        self._disarmed = False
        self._stopping = False
        self._forward_to = -1
        self._exit_margin = min(_EXIT_MARGIN_SECONDS, guard.grace_seconds / 4)
        self._thread = threading.Thread(target=self._run, name="pyengine-preemption-watchdog", daemon=True)

    @property
    def wakeup_fd(self) -> int:
        return self._writer.fileno()

    @property
    def armed(self) -> bool:
        with self._lock:
            return self._deadline is not None and not self._disarmed

    def start(self, forward_to: int) -> None:
        self._forward_to = forward_to
        self._thread.start()

    def arm(self, deadline: float) -> None:
        """Sets the deadline (monotonic), or brings it forward; never after disarm()."""
        with self._lock:
            if self._disarmed or (self._deadline is not None and self._deadline <= deadline):
                return
            self._deadline = deadline
        self._wake()

    def disarm(self) -> None:
        with self._lock:
            self._disarmed = True
        self._wake()

    def seconds_left(self) -> float:
        with self._lock:
            return math.inf if self._deadline is None else self._deadline - time.monotonic()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join()
        self._reader.close()
        self._writer.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (it is awake anyway) or closed
            self._writer.send(bytes([_WAKE]))

    def _run(self) -> None:
        signals_seen = 0
        while True:
            with self._lock:
                if self._stopping:
                    return
                timeout = None
                if self._deadline is not None and not self._disarmed:
                    timeout = max(0.0, self._deadline - self._exit_margin - time.monotonic())
            if timeout == 0.0:
                self._end_process()
            ready, _, _ = select.select([self._reader], [], [], timeout)
            if not ready:
                continue  # the next pass finds the deadline passed, unless disarmed meanwhile
            try:
                data = self._reader.recv(512)
            except BlockingIOError:
                continue
            passed_on = bytes(b for b in data if b != _WAKE)
            if passed_on and self._forward_to >= 0:
                with contextlib.suppress(OSError):  # theirs is full or closed: as if it were ours
                    os.write(self._forward_to, passed_on)
            for signum in passed_on:
                if signum not in self._guard.signals:
                    continue
                signals_seen += 1
                arrived = self._guard._note_arrival(signum)
                self.arm(arrived + self._guard.grace_seconds)
                if signals_seen > 1:
                    os.write(2, f"pyengine: {_signal_name(signum)} again: ignored, the final checkpoint is being "
                                "saved (its commit is atomic: nothing can be torn)\n".encode())

    def _end_process(self) -> None:
        guard = self._guard
        name = _signal_name(guard._arrival[0]) if guard._arrival is not None else "the preemption signal"
        os.write(2, (f"pyengine: the final checkpoint is not durable {guard.grace_seconds:g} s after {name}: exiting "
                     f"with status {guard.late_exit_code}. A save that was not committed is never loaded; a restart "
                     "resumes exactly from the newest committed checkpoint.\n").encode())
        # Flushed from another thread with a time limit: the main thread may hold a stream's lock.
        flusher = threading.Thread(target=_flush_stdio, daemon=True)
        flusher.start()
        flusher.join(self._exit_margin / 2)
        os._exit(guard.late_exit_code)


class _LocalAgreement:
    """A world of one: the stop comes at the first call after the signal."""

    rank = 0

    def vote(self, signal_wall: float | None) -> float | None:
        return signal_wall

    def settle(self, signal_wall: float | None) -> float | None:
        return signal_wall

    def rank0_decides(self, choice: bool) -> bool:
        return choice


class _RankAgreement:
    """Several ranks: the earliest signal time of any rank, agreed by all_reduce(MIN) one call late."""

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        self._torch, self._dist = torch, dist
        self._group = dist.new_group(backend="gloo")  # apart from training's collectives (maybe NCCL)
        self.rank = dist.get_rank()
        self._round: tuple[Any, Any] | None = None  # (work, tensor) of the round in flight

    def vote(self, signal_wall: float | None) -> float | None:
        """The earliest signal of the round started at the previous call, or None (and a new round)."""
        earliest = self._finish_round()
        if earliest is not None:
            return earliest  # every rank stops here: no further round
        box = self._ballot(signal_wall)
        self._round = (self._dist.all_reduce(box, op=self._dist.ReduceOp.MIN, group=self._group, async_op=True), box)
        return None

    def settle(self, signal_wall: float | None) -> float | None:
        """At the end of the block: the round in flight, then one round of the votes as they are now."""
        earliest = self._finish_round()
        if earliest is not None:
            return earliest
        box = self._ballot(signal_wall)
        self._dist.all_reduce(box, op=self._dist.ReduceOp.MIN, group=self._group)
        value = float(box.item())
        return value if math.isfinite(value) else None

    def rank0_decides(self, choice: bool) -> bool:
        flag = self._torch.tensor([1 if choice else 0], dtype=self._torch.int32)
        self._dist.broadcast(flag, src=0, group=self._group)
        return bool(flag.item())

    def _ballot(self, signal_wall: float | None) -> Any:
        return self._torch.tensor([math.inf if signal_wall is None else signal_wall], dtype=self._torch.float64)

    def _finish_round(self) -> float | None:
        if self._round is None:
            return None
        work, box = self._round
        self._round = None
        work.wait()
        value = float(box.item())
        return value if math.isfinite(value) else None


def _agreement_for_this_process() -> _LocalAgreement | _RankAgreement:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _RankAgreement()
    return _LocalAgreement()


def check_signals(signals: Iterable[int]) -> tuple[signal.Signals, ...]:
    """The signals as signal.Signals; refuses none, unknown ones, and those no handler can catch."""
    try:
        chosen = tuple(dict.fromkeys(signal.Signals(s) for s in signals))
    except (TypeError, ValueError) as e:
        raise ValueError(f"signals must be signal numbers such as signal.SIGTERM, got {signals!r} ({e})") from None
    if not chosen:
        raise ValueError("signals must name at least one signal, e.g. (signal.SIGTERM,)")
    uncatchable = [s.name for s in chosen if s in (signal.SIGKILL, signal.SIGSTOP)]
    if uncatchable:
        raise ValueError(f"{', '.join(uncatchable)} cannot be caught: no process can save on it; "
                         "use SIGTERM, SIGUSR1 or another catchable signal")
    return chosen


def check_grace(grace_seconds: float) -> float:
    if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, numbers.Real) or not grace_seconds > 0 \
            or not math.isfinite(grace_seconds):
        raise ValueError(f"grace_seconds must be a positive number of seconds, got {grace_seconds!r}")
    return float(grace_seconds)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # exiting anyway
            stream.flush()
