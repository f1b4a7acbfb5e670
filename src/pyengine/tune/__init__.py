"""Hyperparameter tuning: grid, random and Bayesian search, crash-safe SQLite or PostgreSQL studies, pruning.

space = {"lr": pe.tune.LogUniform(1e-4, 1e-1), "width": pe.tune.IntUniform(16, 256)}
study = pe.tune.Study(space, direction="minimize", sampler="bayes", storage="study.db", seed=0)
study.optimize(objective, n_trials=50, n_workers=2)
study.best_params, study.best_value
"""

from __future__ import annotations

from pyengine.tune import (
    plots,  # matplotlib is imported only when a plot is made
    storage,
)
from pyengine.tune.pruners import ASHAPruner, MedianPruner, Pruner
from pyengine.tune.samplers import BayesSampler, GridSampler, RandomSampler, Sampler
from pyengine.tune.space import Choice, IntUniform, LogUniform, Space, Uniform
from pyengine.tune.storage import PostgresStorage, SQLiteStorage, Storage
from pyengine.tune.study import Study
from pyengine.tune.trial import FrozenTrial, Trial, TrialPruned, TrialState

__all__ = [
    "ASHAPruner",
    "BayesSampler",
    "Choice",
    "FrozenTrial",
    "GridSampler",
    "IntUniform",
    "LogUniform",
    "MedianPruner",
    "PostgresStorage",
    "Pruner",
    "RandomSampler",
    "SQLiteStorage",
    "Sampler",
    "Space",
    "Storage",
    "Study",
    "Trial",
    "TrialPruned",
    "TrialState",
    "Uniform",
    "plots",
    "storage",
]
