"""Samplers: grid, random and Bayesian optimisation behind one small interface."""

from __future__ import annotations

from pyengine.tune.samplers.base import History, Sampler
from pyengine.tune.samplers.bayes import BayesSampler
from pyengine.tune.samplers.grid import GridSampler
from pyengine.tune.samplers.random_search import RandomSampler

__all__ = ["BayesSampler", "GridSampler", "History", "RandomSampler", "Sampler", "make_sampler"]


def make_sampler(sampler: str | Sampler) -> Sampler:
    """Resolve "grid" / "random" / "bayes" or pass a Sampler instance through."""
    if isinstance(sampler, Sampler):
        return sampler
    table = {"grid": GridSampler, "random": RandomSampler, "bayes": BayesSampler}
    if sampler not in table:
        raise ValueError(f"sampler={sampler!r}: expected 'grid', 'random', 'bayes' or a pe.tune.samplers.Sampler")
    return table[sampler]()
