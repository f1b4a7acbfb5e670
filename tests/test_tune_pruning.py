"""Median pruning, and ASHA pausing and promoting trials that resume from their own checkpoints."""

from __future__ import annotations

import statistics

import pytest
import torch

import pyengine as pe

SPACE = {"q": pe.tune.Uniform(0.0, 1.0)}


def test_median_pruner_stops_trials_worse_than_the_median():
    def objective(trial):
        for step in range(1, 11):
            trial.report(step, trial.params["q"] + 1.0 / step)
            if trial.should_prune():
                raise pe.tune.TrialPruned()
        return trial.params["q"]

    study = pe.tune.Study(SPACE, sampler="random", seed=0, pruner=pe.tune.MedianPruner(n_startup_trials=3))
    study.optimize(objective, n_trials=25)
    pruned = [t for t in study.trials if t.state == pe.tune.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == pe.tune.TrialState.COMPLETE]
    assert len(pruned) >= 5 and len(complete) >= 3
    assert all(t.last_step < 10 for t in pruned)
    for t in pruned:  # each decision was right when made: worse than the median of finished peers
        peers = [
            o.intermediate[t.last_step]
            for o in study.trials
            if o.number < t.number and o.state != pe.tune.TrialState.FAILED and t.last_step in o.intermediate
        ]
        assert t.intermediate[t.last_step] > statistics.median(peers)
    assert study.best_value == min(t.params["q"] for t in complete)


def test_asha_pauses_and_promotes_and_promoted_trials_never_repeat_steps(tmp_path):
    executed: dict[int, list[int]] = {}
    resumes: dict[int, int] = {}
    initial_weight: dict[int, float] = {}
    max_steps = 9

    def objective(trial):
        model = torch.nn.Linear(1, 1)
        with trial.checkpointer(keep_last=1) as ck:
            start = ck.restore({"model": model}) or 0
            assert trial.resumed == (start > 0)
            resumes[trial.number] = resumes.get(trial.number, 0) + trial.resumed
            initial_weight.setdefault(trial.number, model.weight.item())
            for step in range(start + 1, max_steps + 1):
                executed.setdefault(trial.number, []).append(step)
                with torch.no_grad():
                    model.weight += 1.0  # the weight counts steps: survives pause and resume
                ck.save(step, {"model": model}).wait()
                trial.report(step, trial.params["q"] + 1.0 / step)
                if trial.should_prune():
                    raise pe.tune.TrialPruned()
            # Every step ran exactly once on the same weights, across pauses and promotions.
            assert model.weight.item() == pytest.approx(initial_weight[trial.number] + max_steps)
            return trial.params["q"]

    pruner = pe.tune.ASHAPruner(min_resource=1, reduction_factor=3, max_resource=max_steps)
    study = pe.tune.Study(SPACE, sampler="random", storage=tmp_path / "s.db", seed=0, pruner=pruner)
    study.optimize(objective, n_trials=18)
    trials = study.trials
    states = [t.state for t in trials]
    assert pe.tune.TrialState.PAUSED in states and pe.tune.TrialState.COMPLETE in states
    assert sum(resumes.values()) >= 1  # at least one paused trial was promoted and resumed
    for number, steps in executed.items():
        assert steps == list(range(1, steps[-1] + 1)), f"trial {number} repeated or skipped steps: {steps}"
        assert sorted(trials[number].intermediate) == steps
    for t in trials:
        if t.state == pe.tune.TrialState.COMPLETE:
            assert t.last_step == max_steps
        if t.state == pe.tune.TrialState.PAUSED:
            assert t.last_step in (1, 3)  # paused exactly at a rung
    # Roughly 1/eta continue past each rung: the best trial overall got to the end.
    best_q = min(t.params["q"] for t in trials)
    assert next(t for t in trials if t.params["q"] == best_q).state == pe.tune.TrialState.COMPLETE


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_asha_promotion_in_one_pass_decides_as_promotable_per_trial(sign):
    # The study's claim asks pruner.promotion(trials); ASHA answers it from each rung sorted
    # once. It must pick exactly the trial the per-trial rule (promotable) picks, ties included.
    import random

    from pyengine.tune.trial import FrozenTrial, TrialState

    pruner = pe.tune.ASHAPruner(min_resource=1, reduction_factor=3, max_resource=27)
    rng = random.Random(0)
    picked = {"a trial": 0, "none": 0}
    for case in range(300):
        trials = []
        for number in range(rng.randint(1, 25)):
            last = rng.choice([1, 2, 3, 5, 9, 10, 27])
            # Few distinct values, so ties at a rung are common.
            intermediate = {s: float(rng.randint(0, 6)) for s in range(1, last + 1)}
            state = rng.choice([TrialState.PAUSED, TrialState.PAUSED, TrialState.RUNNING, TrialState.COMPLETE,
                                TrialState.PRUNED])
            trials.append(FrozenTrial(id=number, number=number, state=state, params={}, value=None,
                                      intermediate=intermediate))
        expected = next((t for t in trials if t.state == TrialState.PAUSED and pruner.promotable(
            t, [o for o in trials if o.number != t.number], sign)), None)
        got = pruner.promotion(trials, sign)
        assert (got.number if got else None) == (expected.number if expected else None), case
        picked["a trial" if got else "none"] += 1
    assert picked["a trial"] > 30 and picked["none"] > 30  # both outcomes were exercised
