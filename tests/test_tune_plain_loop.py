"""The plain-PyTorch-loop tuning example: a few lines tune lr and width of a real training loop.

A Trainer version of this test is pending (pe.Trainer integration).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import pyengine as pe

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tune_plain_loop.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("tune_plain_loop", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuning_a_plain_loop_finds_a_clearly_better_configuration(tmp_path):
    ex = _load_example()
    torch.set_num_threads(1)
    study = pe.tune.Study(
        ex.SPACE,
        sampler=pe.tune.BayesSampler(n_startup_trials=5),
        storage=tmp_path / "t.db",
        seed=0,
        pruner=pe.tune.ASHAPruner(min_resource=1, reduction_factor=3, max_resource=3),
    )
    study.optimize(ex.make_objective(epochs=3), n_trials=10, n_workers=2)
    trials = study.trials
    assert len(trials) == 10 and not [t for t in trials if t.state == pe.tune.TrialState.FAILED]
    complete = [t for t in trials if t.state == pe.tune.TrialState.COMPLETE]
    assert complete and all(t.last_step == 3 for t in complete)
    _, _, _, y_val = ex.make_data()
    baseline = float(((y_val - y_val.mean()) ** 2).mean())  # predicting the mean
    assert study.best_value < 0.5 * baseline
    # The pruner kept the worst configuration (after epoch 1) from finishing.
    worst = max(trials, key=lambda t: t.intermediate[1])
    assert worst.state == pe.tune.TrialState.PAUSED and worst.last_step == 1
