"""Study behaviour: failures, directions, results, reopening, CSV, bad input."""

from __future__ import annotations

import csv
import math

import pytest

import pyengine as pe


def _space():
    return {"x": pe.tune.Uniform(-2.0, 2.0), "k": pe.tune.IntUniform(1, 8)}


def test_failing_and_nan_objectives_mark_failed_and_the_study_goes_on(tmp_path):
    def objective(trial):
        if trial.number % 3 == 0:
            raise RuntimeError(f"boom {trial.number}")
        if trial.number % 3 == 1:
            return float("nan")
        return trial.params["x"] ** 2

    study = pe.tune.Study(_space(), sampler="random", storage=tmp_path / "s.db", seed=0)
    study.optimize(objective, n_trials=9)
    states = [t.state for t in study.trials]
    assert states == [pe.tune.TrialState.FAILED, pe.tune.TrialState.FAILED, pe.tune.TrialState.COMPLETE] * 3
    assert "boom 3" in study.trials[3].error and "RuntimeError" in study.trials[3].error
    assert "not a finite number" in study.trials[1].error
    assert study.best_value == min(t.value for t in study.trials if t.value is not None)


def test_exceptions_outside_catch_propagate_and_leave_a_failed_trial():
    study = pe.tune.Study(_space(), sampler="random")

    def objective(trial):
        raise KeyError("not caught")

    with pytest.raises(KeyError):
        study.optimize(objective, n_trials=3, catch=(ValueError,))
    assert [t.state for t in study.trials] == [pe.tune.TrialState.FAILED]


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_best_follows_the_direction(direction):
    study = pe.tune.Study(_space(), direction=direction, sampler="random", seed=3)
    study.optimize(lambda t: t.params["x"], n_trials=12)
    values = [t.value for t in study.trials]
    assert study.best_value == (min(values) if direction == "minimize" else max(values))
    assert study.best_params == next(t.params for t in study.trials if t.value == study.best_value)


def test_best_before_any_completed_trial_explains():
    study = pe.tune.Study(_space())
    with pytest.raises(ValueError, match="no trial has completed yet"):
        _ = study.best_value


def test_reopening_a_study_continues_it(tmp_path):
    db = tmp_path / "s.db"
    first = pe.tune.Study(_space(), sampler="bayes", storage=db, seed=1)
    first.optimize(lambda t: (t.params["x"] - 0.5) ** 2 + t.params["k"], n_trials=12)
    first.close()
    again = pe.tune.Study(_space(), sampler="bayes", storage=db, seed=1)
    assert len(again.trials) == 12
    again.optimize(lambda t: (t.params["x"] - 0.5) ** 2 + t.params["k"], n_trials=5)
    trials = again.trials
    assert [t.number for t in trials] == list(range(17))
    assert len({again.space.key(t.params) for t in trials}) == 17
    assert again.best_value <= min(t.value for t in trials[:12])


def test_reopening_with_another_space_or_direction_is_refused(tmp_path):
    db = tmp_path / "s.db"
    pe.tune.Study(_space(), storage=db).close()
    with pytest.raises(ValueError, match="different search space"):
        pe.tune.Study({"x": pe.tune.Uniform(-1.0, 1.0)}, storage=db)
    with pytest.raises(ValueError, match="direction='minimize'"):
        pe.tune.Study(_space(), direction="maximize", storage=db)
    pe.tune.Study({"x": pe.tune.Uniform(-1.0, 1.0)}, storage=db, study_name="other").close()


def test_two_threads_share_a_study_without_duplicates(tmp_path):
    space = {"k": pe.tune.IntUniform(0, 5), "c": pe.tune.Choice(["a", "b", "c", "d"])}
    study = pe.tune.Study(space, sampler="bayes", storage=tmp_path / "s.db", seed=0)
    study.optimize(lambda t: (t.params["k"] - 3) ** 2 + (t.params["c"] != "b"), n_trials=20, n_workers=2)
    keys = [study.space.key(t.params) for t in study.trials]
    assert len(keys) == 20 and len(set(keys)) == 20


def test_csv_export_has_one_row_per_trial(tmp_path):
    study = pe.tune.Study(_space(), sampler="random", seed=0)
    study.optimize(lambda t: t.params["x"] if t.number != 2 else math.inf, n_trials=5)
    study.to_csv(tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["number"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[2]["state"] == "FAILED" and "not a finite number" in rows[2]["error"]
    assert float(rows[0]["x"]) == pytest.approx(study.trials[0].params["x"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"direction": "min"}, "expected 'minimize' or 'maximize'"),
        ({"sampler": "tpe"}, "expected 'grid', 'random', 'bayes'"),
        ({"storage": "study.json"}, "ending in .db"),
        ({"seed": 1.5}, "must be an int"),
        ({"pruner": "median"}, "MedianPruner"),
    ],
)
def test_bad_study_arguments_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pe.tune.Study(_space(), **kwargs)


def test_bad_optimize_and_report_arguments_are_explained():
    study = pe.tune.Study(_space(), sampler="random")
    with pytest.raises(ValueError, match="never stops"):
        study.optimize(lambda t: 0.0)
    with pytest.raises(ValueError, match="n_workers"):
        study.optimize(lambda t: 0.0, n_trials=1, n_workers=0)

    def objective(trial):
        trial.report(5, 1.0)
        trial.report(5, 0.5)
        return 0.0

    study.optimize(objective, n_trials=1)
    assert "steps must increase" in study.trials[0].error
