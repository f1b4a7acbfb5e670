"""Trials: the live handle an objective receives, and the frozen record the storage returns."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyengine.checkpoint import Checkpointer
    from pyengine.tune.study import Study


class TrialState(str, enum.Enum):
    """Life cycle: RUNNING -> COMPLETE | FAILED | PRUNED | PAUSED; PAUSED or WAITING -> RUNNING.

    WAITING is a trial whose worker died; the next free worker resumes it. PAUSED is a trial
    stopped by ASHA at a rung; it resumes (from its own checkpoint) if later promoted.
    """

    RUNNING = "RUNNING"
    WAITING = "WAITING"
    PAUSED = "PAUSED"
    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAILED = "FAILED"

    def is_finished(self) -> bool:
        return self in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED)


class TrialPruned(Exception):
    """Raise from an objective after `trial.should_prune()` returned True."""


@dataclass
class FrozenTrial:
    """A snapshot of one trial's record; mutating it changes nothing in the study."""

    id: int
    number: int
    state: TrialState
    params: dict[str, Any]
    value: float | None
    intermediate: dict[int, float] = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None
    heartbeat: float | None = None
    host: str | None = None
    pid: int | None = None
    retries: int = 0
    error: str | None = None

    @property
    def last_step(self) -> int | None:
        return max(self.intermediate) if self.intermediate else None


class Trial:
    """What an objective receives: the parameters to try and a channel back to the study.

    Used by the one thread that runs the objective; `report` and `should_prune` go through
    the study's storage, so other workers (threads or processes) see the values at once.

    Attributes:
        number: the trial's number in the study (0-based, unique).
        params: the configuration to evaluate.
        resumed: True when this run continues an earlier run of the same trial (promoted by
            the pruner, or re-queued after its worker died): restore from `checkpoint_dir`.
    """

    def __init__(self, study: Study, frozen: FrozenTrial, resumed: bool) -> None:
        self._study = study
        self._frozen = frozen
        self.number = frozen.number
        self.params: dict[str, Any] = dict(frozen.params)
        self.resumed = resumed
        self.prune_requested = False
        self._may_repeat = frozen.retries > 0  # a crashed run may have reported past its last checkpoint

    @property
    def checkpoint_dir(self) -> Path:
        """A directory owned by this trial, kept across pauses, promotions and worker crashes."""
        return self._study._trial_dir(self.number)

    def checkpointer(self, keep_last: int = 1) -> Checkpointer:
        """A `pe.Checkpointer` on `checkpoint_dir`."""
        from pyengine.checkpoint import Checkpointer

        return Checkpointer(self.checkpoint_dir, keep_last=keep_last)

    def report(self, step: int, value: float) -> None:
        """Record the objective's value after `step` (epochs, batches: any increasing counter).

        Raises:
            ValueError: if `step` is not an int greater than every step reported before, or
                `value` is not a finite number.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"trial.report: step={step!r} must be a non-negative int")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"trial.report: value={value!r} at step {step} is not finite")
        self._study._storage.report(self._frozen.id, step, value, replace_from=self._may_repeat)
        self._frozen.intermediate = {k: v for k, v in self._frozen.intermediate.items() if k < step}
        self._frozen.intermediate[step] = value

    def should_prune(self) -> bool:
        """Ask the study's pruner whether to stop now; always False without a pruner.

        When it returns True, save a checkpoint (if not done at this step) and raise
        `pe.tune.TrialPruned`; an ASHA pruner may resume the trial later.
        """
        if self._study.pruner is None or not self._frozen.intermediate:
            return False
        others = [t for t in self._study._storage.trials() if t.number != self.number]
        decision = self._study.pruner.should_prune(self._frozen, others, self._study._sign)
        self.prune_requested = self.prune_requested or decision
        return decision
