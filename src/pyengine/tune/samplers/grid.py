"""Grid search over discrete or discretised parameters."""

from __future__ import annotations

import itertools
import math
import sys
from typing import Any

import numpy as np

from pyengine.tune.samplers.base import History, Sampler
from pyengine.tune.space import Choice, IntUniform, Space


class GridSampler(Sampler):
    """Visits every combination of a grid once, in a fixed order.

    Continuous parameters get `points_per_param` evenly spaced values (in log space for log
    parameters); integer ranges with more than `points_per_param` values are thinned the same
    way. The grid's size is printed before the study runs, and a grid larger than `max_size`
    is refused unless `allow_large=True`: k values for each of d parameters is k**d runs.

    Thread-safety: `prepare` must run before any `suggest`; after that the sampler is read-only.

    Args:
        points_per_param: values per continuous (or large integer) parameter.
        max_size: the largest grid accepted without `allow_large`.
        allow_large: accept a grid of any size.
    """

    def __init__(self, points_per_param: int = 5, max_size: int = 10_000, allow_large: bool = False) -> None:
        if not isinstance(points_per_param, int) or points_per_param < 1:
            raise ValueError(f"GridSampler: points_per_param={points_per_param!r} must be a positive int")
        self.points_per_param, self.max_size, self.allow_large = points_per_param, max_size, allow_large
        self._axes: list[list[Any]] | None = None
        self._names: list[str] = []

    def axes(self, space: Space) -> dict[str, list[Any]]:
        """The values each parameter takes on the grid."""
        out: dict[str, list[Any]] = {}
        for name, p in space.params.items():
            if isinstance(p, Choice):
                out[name] = list(p.choices)
            elif isinstance(p, IntUniform) and p.high - p.low + 1 <= self.points_per_param:
                out[name] = list(range(p.low, p.high + 1))
            else:
                lo, hi = space.encode({**_any(space), name: p.low}), space.encode({**_any(space), name: p.high})
                s = space._slices[name].start
                ts = np.linspace(lo[s], hi[s], self.points_per_param) if self.points_per_param > 1 else [0.5]
                values = []
                for t in ts:
                    x = lo.copy()
                    x[s] = t
                    values.append(space.decode(x)[name])
                out[name] = list(dict.fromkeys(values))  # rounding of integers can merge points
        return out

    def prepare(self, space: Space) -> None:
        axes = self.axes(space)
        size = math.prod(len(v) for v in axes.values())
        shape = " x ".join(str(len(v)) for v in axes.values())
        if size > self.max_size and not self.allow_large:
            raise ValueError(
                f"grid search: the grid has {shape} = {size} configurations, more than max_size={self.max_size}; "
                "lower points_per_param, use sampler='random' or 'bayes', or pass GridSampler(allow_large=True)"
            )
        print(f"grid search: {shape} = {size} configurations", file=sys.stderr, flush=True)
        self._names, self._axes = list(axes), list(axes.values())

    def suggest(self, space: Space, history: History) -> dict[str, Any] | None:
        if self._axes is None:
            self.prepare(space)
        assert self._axes is not None
        for combo in itertools.product(*self._axes):
            params = dict(zip(self._names, combo))
            if space.key(params) not in history.seen_keys:
                return params
        return None


def _any(space: Space) -> dict[str, Any]:
    """Some valid configuration, used as a base when encoding one parameter at a time."""
    return space.decode(np.full(space.dim, 0.5))
