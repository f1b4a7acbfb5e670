"""When to checkpoint: frequency policies for `Checkpointer(policy=...)` and the Trainer.

    ckpt = pe.Checkpointer("runs/exp1", policy=pe.checkpoint.OverheadBudget(0.01))
    for step in range(1, steps + 1):
        train_one_step()
        ckpt.maybe_save(step, state)        # saves only when the policy says so

Each save costs training time; each step since the newest durable save is work lost on a
failure. `Every` fixes the interval; `OverheadBudget` (CheckFreq, FAST'21) measures what a
save costs and picks the shortest interval that keeps that cost under a fraction of training
time; `YoungDaly` picks the interval that minimises expected waste for a given MTBF.

Policy contract (one thread, the training loop, calls everything; `now` is any monotonic
clock in seconds, the same one throughout):
    observe_step(seconds)      a training step finished; `seconds` excludes any save stall
    should_save(step, now)     asked once per step; True means "save this step"
    observe_save(step, now, stall_seconds)   a save of `step` was taken (the caller blocked
                                             `stall_seconds`); it now persists in the background
    observe_persist(seconds)   that save finished (durable or failed), `seconds` after save()
`PolicyFeed` makes these calls from a loop that calls it once per step; `maybe_save` uses it.
"""

from __future__ import annotations

import math
import numbers
import statistics
import time
from collections import deque
from typing import Any, Callable


def young_interval(cost_seconds: float, mtbf_seconds: float) -> float:
    """Young (1974): the checkpoint interval sqrt(2 C M) that minimises expected waste, to first order."""
    _check_cost_and_mtbf(cost_seconds, mtbf_seconds)
    return math.sqrt(2.0 * cost_seconds * mtbf_seconds)


def daly_interval(cost_seconds: float, mtbf_seconds: float) -> float:
    """Daly (2006): the higher-order optimum, sqrt(2CM)[1 + sqrt(C/2M)/3 + (C/2M)/9] - C, or M when C >= 2M.

    Args:
        cost_seconds: C, the training time one checkpoint costs (its stall plus its interference).
        mtbf_seconds: M, the mean time between failures.

    Returns:
        The interval between checkpoints in seconds (compute time, excluding the checkpoint).
    """
    _check_cost_and_mtbf(cost_seconds, mtbf_seconds)
    if cost_seconds >= 2.0 * mtbf_seconds:
        return float(mtbf_seconds)
    ratio = cost_seconds / (2.0 * mtbf_seconds)
    return math.sqrt(2.0 * cost_seconds * mtbf_seconds) * (1.0 + math.sqrt(ratio) / 3.0 + ratio / 9.0) - cost_seconds


def _check_cost_and_mtbf(cost: float, mtbf: float) -> None:
    if not _is_real(cost) or not cost >= 0 or math.isinf(cost):
        raise ValueError(f"checkpoint cost must be a finite number of seconds >= 0, got {cost!r}")
    if not _is_real(mtbf) or not mtbf > 0 or math.isinf(mtbf):
        raise ValueError(f"MTBF must be a finite number of seconds > 0, got {mtbf!r}")


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class SavePolicy:
    """Base class: decides when to save. Subclasses override `should_save` and the hooks they need."""

    def should_save(self, step: int, now: float) -> bool:
        raise NotImplementedError

    def observe_step(self, seconds: float) -> None:
        """A training step took `seconds` (without save stall)."""

    def observe_save(self, step: int, now: float, stall_seconds: float) -> None:
        """A save of `step` was taken at `now`; the training loop blocked for `stall_seconds`."""

    def observe_persist(self, persist_seconds: float) -> None:
        """The oldest save still in flight finished, `persist_seconds` after it was started."""


class Every(SavePolicy):
    """Saves at every multiple of `steps`, and/or once `seconds` have passed since the last save.

    With both, whichever comes first. Step 0 is never saved by `steps` (nothing is trained yet).
    The `seconds` clock starts at the first `should_save` call.

    Args:
        steps: save when step % steps == 0; aligned multiples survive a resume unchanged.
        seconds: save when at least this long has passed since the last save (or the start).
    """

    def __init__(self, steps: int | None = None, seconds: float | None = None) -> None:
        if steps is None and seconds is None:
            raise ValueError("Every needs steps=N and/or seconds=T, e.g. Every(steps=100)")
        if steps is not None:
            _check_int("Every(steps=...)", steps, 1)
        if seconds is not None and (not _is_real(seconds) or not seconds > 0 or math.isinf(seconds)):
            raise ValueError(f"Every(seconds=...) must be a finite number > 0, got {seconds!r}")
        self.steps = steps
        self.seconds = seconds
        self._last_save_time: float | None = None

    def should_save(self, step: int, now: float) -> bool:
        if self._last_save_time is None:
            self._last_save_time = now
        by_steps = self.steps is not None and step > 0 and step % self.steps == 0
        by_time = self.seconds is not None and now - self._last_save_time >= self.seconds
        return by_steps or by_time

    def observe_save(self, step: int, now: float, stall_seconds: float) -> None:
        self._last_save_time = now

    def __repr__(self) -> str:
        args = [f"steps={self.steps}"] * (self.steps is not None) + [f"seconds={self.seconds}"] * (
            self.seconds is not None)
        return f"Every({', '.join(args)})"


class _SaveCost:
    """Measures what one save costs the training loop: its stall plus the extra time of the steps
    that ran while it persisted (background threads compete for the cores, and an overlapped
    snapshot delays the next optimizer step), over a baseline of steps with no save in flight.

    Medians over recent windows, so one slow save (the first one allocates its staging memory)
    or one noisy step does not set the interval, and the estimate follows real changes.
    """

    def __init__(self, window: int, step_window: int = 64) -> None:
        self.clean_steps: deque[float] = deque(maxlen=step_window)
        self.costs: deque[float] = deque(maxlen=window)
        self.persists: deque[float] = deque(maxlen=window)
        self.in_flight = 0
        self._stall = 0.0
        self._busy_steps: list[float] = []

    def step(self, seconds: float) -> None:
        (self._busy_steps if self.in_flight else self.clean_steps).append(seconds)

    def save(self, stall_seconds: float) -> None:
        if self.in_flight == 0:
            self._stall, self._busy_steps = 0.0, []
        self._stall += stall_seconds
        self.in_flight += 1

    def persist(self, persist_seconds: float) -> bool:
        """Returns True when a new cost sample was recorded (no save is left in flight)."""
        self.in_flight = max(0, self.in_flight - 1)
        self.persists.append(persist_seconds)
        if self.in_flight:
            return False
        if not self.clean_steps:  # saves back to back from the start: busy steps are the only baseline
            self.clean_steps.extend(self._busy_steps)
        baseline = self.step_seconds or 0.0
        extra = sum(self._busy_steps) - len(self._busy_steps) * baseline
        self.costs.append(self._stall + max(0.0, extra))
        return True

    @property
    def step_seconds(self) -> float | None:
        """The mean clean step: costs are sums of time, so a mean (not a median, which a busy
        machine's skewed step times pull low) is what a step costs; pauses over 3x the median
        (evaluation, a stop in a debugger) are left out."""
        if not self.clean_steps:
            return None
        cap = 3.0 * statistics.median(self.clean_steps)
        return statistics.fmean(t for t in self.clean_steps if t <= cap)

    @property
    def cost_seconds(self) -> float | None:
        return statistics.median(self.costs) if self.costs else None

    @property
    def persist_seconds(self) -> float:
        return statistics.median(self.persists) if self.persists else 0.0


class OverheadBudget(SavePolicy):
    """Saves as often as possible while checkpoints cost at most `fraction` of training time.

    The first save comes after `warmup_steps` (to measure a step), and the next only once it
    is durable; from then on the interval is the shortest k with cost / (k * step) <= fraction,
    and at least the persist time (so saves never queue behind each other), recomputed after
    every save from the measured step time, stall and interference.

    Args:
        fraction: the budget, a fraction of training time in (0, 1), e.g. 0.01 for 1%.
        warmup_steps: steps before the first save.
        min_steps / max_steps: bounds on the interval (max_steps=None: unbounded).
        window: saves whose measured costs are combined (median).
    """

    def __init__(self, fraction: float, *, warmup_steps: int = 10, min_steps: int = 1,
                 max_steps: int | None = None, window: int = 5) -> None:
        if not _is_real(fraction) or not 0 < fraction < 1:
            raise ValueError(f"OverheadBudget fraction must be in (0, 1), e.g. 0.01 for 1%, got {fraction!r}")
        _check_int("warmup_steps", warmup_steps, 0)
        _check_int("min_steps", min_steps, 1)
        _check_int("window", window, 1)
        if max_steps is not None:
            _check_int("max_steps", max_steps, min_steps)
        self.fraction = float(fraction)
        self.warmup_steps, self.min_steps, self.max_steps = warmup_steps, min_steps, max_steps
        self.interval: int | None = None  # steps between saves, once measured
        self._cost = _SaveCost(window)
        self._first_step: int | None = None
        self._last_saved: int | None = None

    def should_save(self, step: int, now: float) -> bool:
        if self._first_step is None:
            self._first_step = step
        if self._last_saved is None:
            return step - self._first_step >= self.warmup_steps
        if self.interval is None:  # the first save is still persisting: nothing measured yet
            return False
        return step - self._last_saved >= self.interval

    def observe_step(self, seconds: float) -> None:
        self._cost.step(seconds)

    def observe_save(self, step: int, now: float, stall_seconds: float) -> None:
        self._last_saved = step
        self._cost.save(stall_seconds)

    def observe_persist(self, persist_seconds: float) -> None:
        if not self._cost.persist(persist_seconds):
            return
        step_s, cost_s = self._cost.step_seconds, self._cost.cost_seconds
        assert cost_s is not None  # persist() recorded a cost
        if step_s is None:  # observe_step was never called: nothing to scale the budget by
            k = max(self.warmup_steps, self.min_steps)
        else:
            step_s = max(step_s, 1e-9)
            k = max(math.ceil(cost_s / (self.fraction * step_s)),
                    math.ceil(self._cost.persist_seconds / step_s), self.min_steps)
        self.interval = k if self.max_steps is None else min(k, self.max_steps)

    def __repr__(self) -> str:
        return f"OverheadBudget({self.fraction}, interval={self.interval})"


class YoungDaly(SavePolicy):
    """Saves every `daly_interval(cost, mtbf_seconds)` seconds, from the measured cost of a save.

    The cost is what a save takes from training (stall plus interference), not the persist
    time, which runs in the background; but the interval is never shorter than the persist
    time, so saves do not queue. The first save comes after `warmup_steps` to measure.

    Args:
        mtbf_seconds: the mean time between failures of the whole job.
        warmup_steps: steps before the first save.
        window: saves whose measured costs are combined (median).
    """

    def __init__(self, mtbf_seconds: float, *, warmup_steps: int = 10, window: int = 5) -> None:
        _check_cost_and_mtbf(0.0, mtbf_seconds)
        _check_int("warmup_steps", warmup_steps, 0)
        _check_int("window", window, 1)
        self.mtbf_seconds = float(mtbf_seconds)
        self.warmup_steps = warmup_steps
        self.interval_seconds: float | None = None
        self._cost = _SaveCost(window)
        self._first_step: int | None = None
        self._last_save_time: float | None = None

    def should_save(self, step: int, now: float) -> bool:
        if self._first_step is None:
            self._first_step = step
        if self._last_save_time is None:
            return step - self._first_step >= self.warmup_steps
        if self.interval_seconds is None:
            return False
        return now - self._last_save_time >= self.interval_seconds

    def observe_step(self, seconds: float) -> None:
        self._cost.step(seconds)

    def observe_save(self, step: int, now: float, stall_seconds: float) -> None:
        self._last_save_time = now
        self._cost.save(stall_seconds)

    def observe_persist(self, persist_seconds: float) -> None:
        if self._cost.persist(persist_seconds):
            cost = self._cost.cost_seconds
            assert cost is not None
            self.interval_seconds = max(daly_interval(cost, self.mtbf_seconds), self._cost.persist_seconds)

    def __repr__(self) -> str:
        return f"YoungDaly(mtbf_seconds={self.mtbf_seconds}, interval_seconds={self.interval_seconds})"


class PolicyFeed:
    """Drives a SavePolicy from a loop that calls `due(step)` once per training step.

    It times each step as the span from the previous call's return to this call (so a save's
    stall is not counted as step time), and reports saves that finished, by polling their
    handles. Pauses between calls (evaluation, logging) count as step time.

    Args:
        policy: the SavePolicy to drive.
        clock: a monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(self, policy: SavePolicy, clock: Callable[[], float] = time.perf_counter) -> None:
        if not isinstance(policy, SavePolicy):
            raise TypeError(f"policy must be a pyengine.checkpoint.SavePolicy (e.g. Every(steps=100), "
                            f"OverheadBudget(0.01)), got {type(policy).__name__}")
        self.policy = policy
        self._clock = clock
        self._last_return: float | None = None
        self._now = 0.0
        self._pending: deque[Any] = deque()

    def due(self, step: int) -> bool:
        """Feeds the step just finished and the saves that finished, then asks the policy."""
        _check_int("step", step, 0)
        now = self._clock()
        if self._last_return is not None:
            self.policy.observe_step(now - self._last_return)
        self._report_finished()
        self._now = now
        due = bool(self.policy.should_save(int(step), now))
        self._last_return = None if due else now  # a failed save must not make a long "step"
        return due

    def saved(self, step: int, handle: Any) -> None:
        """Reports the save just taken (`handle` has `stall_seconds`, `done()` and `stats`)."""
        self.policy.observe_save(int(step), self._now, float(handle.stall_seconds))
        self._pending.append(handle)
        self._last_return = self._clock()

    def pause(self) -> None:
        """Call before time that is not training (evaluation, a benchmark's baseline): reports the
        saves that finished, and the time until the next `due()` is not counted as a step."""
        self._report_finished()
        self._last_return = None

    def _report_finished(self) -> None:
        while self._pending and self._pending[0].done():  # saves finish in the order they started
            self.policy.observe_persist(float(self._pending.popleft().stats["persist_seconds"]))
