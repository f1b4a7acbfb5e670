"""Pruners: stop unpromising trials early from their intermediate values.

Values are compared after multiplying by `sign` (+1 minimise, -1 maximise), so lower is
better inside this module. Pruners are stateless: every decision is a function of the trial
records in storage, which is what lets several processes share one study.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from pyengine.tune.trial import FrozenTrial, TrialState


class Pruner:
    """Interface. `pauses` says whether a stopped trial may resume later (ASHA) or is final."""

    pauses = False

    def should_prune(self, trial: FrozenTrial, others: Sequence[FrozenTrial], sign: float) -> bool:
        raise NotImplementedError

    def promotable(self, trial: FrozenTrial, others: Sequence[FrozenTrial], sign: float) -> bool:
        """Whether a PAUSED trial should now resume."""
        return False

    def promotion(self, trials: Sequence[FrozenTrial], sign: float) -> FrozenTrial | None:
        """The first PAUSED trial of `trials` that `promotable` says should resume, or None.

        The study asks this at every claim; a pruner may answer it in one pass over the
        trials instead of one `promotable` call (itself a pass over the others) per paused trial.
        """
        for t in trials:
            if t.state == TrialState.PAUSED and self.promotable(t, [o for o in trials if o.number != t.number], sign):
                return t
        return None


class MedianPruner(Pruner):
    """Prune a trial whose latest value is worse than the median of other trials at that step.

    Args:
        n_startup_trials: no pruning until this many trials have completed.
        n_warmup_steps: no pruning at steps below this.
    """

    def __init__(self, n_startup_trials: int = 5, n_warmup_steps: int = 0) -> None:
        if n_startup_trials < 0 or n_warmup_steps < 0:
            raise ValueError("MedianPruner: n_startup_trials and n_warmup_steps must be >= 0")
        self.n_startup_trials, self.n_warmup_steps = n_startup_trials, n_warmup_steps

    def should_prune(self, trial: FrozenTrial, others: Sequence[FrozenTrial], sign: float) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        if sum(t.state == TrialState.COMPLETE for t in others) < self.n_startup_trials:
            return False
        peers = [
            sign * t.intermediate[step]
            for t in others
            if step in t.intermediate and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        ]
        if not peers:
            return False
        return sign * trial.intermediate[step] > float(np.median(peers))


class ASHAPruner(Pruner):
    """Asynchronous successive halving (Li et al. 2020) with pausing instead of killing.

    Rung k sits at step `min_resource * reduction_factor**k`. The first value a trial reports
    at or after a rung's step is its value for that rung. At a rung, a trial continues only if
    it ranks in the top floor(n / reduction_factor) of the n trials with a value there;
    otherwise it pauses. A paused trial is promoted (resumed, from its own checkpoint) as soon
    as later arrivals push it into that top fraction, so early trials are not judged against
    an empty rung. Rungs at or beyond `max_resource` never pause anyone.

    Args:
        min_resource: step of the first rung.
        reduction_factor: eta; about 1/eta of the trials continue past each rung.
        max_resource: the step at which a trial is complete, if known.
    """

    pauses = True

    def __init__(self, min_resource: int = 1, reduction_factor: int = 3, max_resource: int | None = None) -> None:
        if min_resource < 1 or reduction_factor < 2:
            raise ValueError(
                f"ASHAPruner: need min_resource >= 1 and reduction_factor >= 2, "
                f"got {min_resource} and {reduction_factor}"
            )
        if max_resource is not None and max_resource < min_resource:
            raise ValueError(f"ASHAPruner: max_resource={max_resource} is below min_resource={min_resource}")
        self.min_resource, self.eta, self.max_resource = min_resource, reduction_factor, max_resource

    def rung_step(self, k: int) -> int:
        return self.min_resource * self.eta**k

    def _rung_values(self, t: FrozenTrial) -> dict[int, float]:
        """Rung index -> the trial's value there (first report at or after the rung's step)."""
        out: dict[int, float] = {}
        steps = sorted(t.intermediate)
        k = 0
        for s in steps:
            while s >= self.rung_step(k):
                if self.max_resource is not None and self.rung_step(k) >= self.max_resource:
                    return out
                out.setdefault(k, t.intermediate[s])
                k += 1
        return out

    def _in_top(self, trial: FrozenTrial, k: int, others: Sequence[FrozenTrial], sign: float) -> bool:
        mine = sign * self._rung_values(trial)[k]
        peers = [sign * v for t in others if (v := self._rung_values(t).get(k)) is not None]
        n_top = math.floor((len(peers) + 1) / self.eta)
        return sum(p < mine for p in peers) < n_top  # ties favour the trial being judged

    def should_prune(self, trial: FrozenTrial, others: Sequence[FrozenTrial], sign: float) -> bool:
        rungs = self._rung_values(trial)
        if not rungs:
            return False
        k = max(rungs)
        # Decide only when the latest report is the one that reached rung k, once per rung.
        first_at_k = min(s for s in trial.intermediate if s >= self.rung_step(k))
        if first_at_k != trial.last_step:
            return False
        return not self._in_top(trial, k, others, sign)

    def promotable(self, trial: FrozenTrial, others: Sequence[FrozenTrial], sign: float) -> bool:
        rungs = self._rung_values(trial)
        return bool(rungs) and self._in_top(trial, max(rungs), others, sign)

    def promotion(self, trials: Sequence[FrozenTrial], sign: float) -> FrozenTrial | None:
        # The same decisions as `promotable` per paused trial, from each trial's rung values
        # computed once and each rung's values sorted once: O(n log n) per claim instead of
        # O(paused x n x steps), which was most of an ASHA study's time at ~250 trials.
        rung_values = [self._rung_values(t) for t in trials]
        at_rung: dict[int, list[float]] = defaultdict(list)
        for values in rung_values:
            for k, v in values.items():
                at_rung[k].append(sign * v)
        for values in at_rung.values():
            values.sort()
        for t, values in zip(trials, rung_values):
            if t.state != TrialState.PAUSED or not values:
                continue
            k = max(values)
            everyone = at_rung[k]  # the trial's own value among them: n = peers + 1
            better = bisect.bisect_left(everyone, sign * values[k])  # strictly better; ties favour the trial
            if better < math.floor(len(everyone) / self.eta):
                return t
        return None
