"""Random search: each trial an independent uniform draw over the unit-cube encoding."""

from __future__ import annotations

from typing import Any

from pyengine.tune.samplers.base import History, Sampler, random_unseen, trial_rng
from pyengine.tune.space import Space


class RandomSampler(Sampler):
    """Uniform random search (log parameters uniform in log space), seeded per trial.

    Stateless, hence safe to call from any number of threads. Never repeats a configuration
    that a trial already has; returns None once a finite space is exhausted.
    """

    def suggest(self, space: Space, history: History) -> dict[str, Any] | None:
        return random_unseen(space, history, trial_rng(history.seed, history.number))
