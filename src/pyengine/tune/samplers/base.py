"""The sampler interface and what a sampler is shown of the study."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pyengine.tune.space import Choice, IntUniform, Space

# Spaces with at most this many configurations are enumerated when random draws keep colliding.
_ENUMERABLE = 200_000


@dataclass
class History:
    """What a sampler sees when asked for trial `number`.

    Attributes:
        complete: (params, value) of finished trials, values oriented so that lower is better.
        pending: params of trials that are running or queued (their values are not known yet).
        seen_keys: `Space.key` of every configuration any trial of the study already has.
        number: the number the new trial will get (0-based, unique within the study).
        seed: the study's seed.
    """

    complete: list[tuple[dict[str, Any], float]]
    pending: list[dict[str, Any]]
    seen_keys: set[str]
    number: int
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)


class Sampler:
    """Proposes configurations. `suggest` may be called from several threads at once.

    Implementations keep per-trial randomness a function of (study seed, trial number), so two
    processes sharing a study never draw the same stream (optuna #3790, #4714).
    """

    def prepare(self, space: Space) -> None:
        """Called once before a study runs; may validate the space or print a summary."""

    def suggest(self, space: Space, history: History) -> dict[str, Any] | None:
        """Return the next configuration, or None when the sampler has nothing left to propose."""
        raise NotImplementedError


def trial_rng(seed: int, number: int, salt: int = 0) -> np.random.Generator:
    """The random stream of one trial: a pure function of (study seed, trial number)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, number, salt])


def finite_size(space: Space) -> int | None:
    """Number of configurations if every parameter is discrete, else None."""
    size = 1
    for p in space.params.values():
        if isinstance(p, Choice):
            size *= len(p.choices)
        elif isinstance(p, IntUniform):
            size *= p.high - p.low + 1
        else:
            return None
    return size


def _enumerate(space: Space) -> Iterator[dict[str, Any]]:
    axes = []
    for p in space.params.values():
        axes.append(list(p.choices) if isinstance(p, Choice) else range(p.low, p.high + 1))
    for combo in itertools.product(*axes):
        yield dict(zip(space.params, combo))


def random_unseen(space: Space, history: History, rng: np.random.Generator) -> dict[str, Any] | None:
    """A uniformly random configuration that no trial has yet; None if the space is exhausted."""
    size = finite_size(space)
    if size is not None and len(history.seen_keys) >= size:
        return None
    for _ in range(64):
        params = space.decode(rng.random(space.dim))
        if space.key(params) not in history.seen_keys:
            return params
    if size is not None and size <= _ENUMERABLE:
        unseen = [p for p in _enumerate(space) if space.key(p) not in history.seen_keys]
        return unseen[int(rng.integers(len(unseen)))] if unseen else None
    return None
