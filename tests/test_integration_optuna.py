"""PyEngineSampler inside Optuna: the same proposals as pyengine's own study, shared storages, errors."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from datetime import datetime

import numpy as np
import pytest

import pyengine as pe

optuna = pytest.importorskip("optuna")
from optuna.distributions import CategoricalDistribution, FloatDistribution  # noqa: E402

from pyengine.integrations.optuna import PyEngineSampler  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

_A = np.array(
    [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
)
_P = 1e-4 * np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ]
)
_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
# Sorted, as Optuna's intersection search space orders parameters: the encodings then agree.
_NAMES = [f"x{i}" for i in range(6)]


def hartmann6(x: list[float]) -> float:
    return -float(_ALPHA @ np.exp(-(_A * (np.asarray(x) - _P) ** 2).sum(1)))


def test_inside_optuna_it_proposes_exactly_what_pyengines_own_study_does_on_hartmann6(one_torch_thread):
    # 22 trials: the Sobol design of 10, then 12 GP proposals (the last ones with a warm start
    # carried over from the earlier fits, which must match too).
    n, seed = 22, 3
    own = pe.tune.Study(
        {name: pe.tune.Uniform(0.0, 1.0) for name in _NAMES},
        sampler=pe.tune.BayesSampler(deterministic=True),
        seed=seed,
    )
    own.optimize(lambda t: hartmann6([t.params[name] for name in _NAMES]), n_trials=n)

    study = optuna.create_study(sampler=PyEngineSampler(seed=seed, deterministic=True))
    # An Optuna study's first trial defines its search space, so no sampler can propose it
    # jointly (PyEngineSampler draws it at random); give it pyengine's first point instead.
    study.enqueue_trial(own.trials[0].params)
    study.optimize(lambda t: hartmann6([t.suggest_float(name, 0.0, 1.0) for name in _NAMES]), n_trials=n)

    # Exact, not approximate: Optuna's storage keeps float64 params and values unchanged, so
    # BayesSampler sees the same history bit for bit and makes the same decisions.
    assert [t.params for t in study.trials] == [t.params for t in own.trials]
    assert study.best_value == own.best_value


_WORKER = textwrap.dedent(
    """
    import math, pathlib, sys, time
    import optuna
    from pyengine.integrations.optuna import PyEngineSampler

    url, me, ready = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = PyEngineSampler(seed=0, n_startup_trials=5, n_raw_samples=256, n_restarts=2)
    study = optuna.load_study(study_name="shared", storage=url, sampler=sampler)
    # Start together, so that the two workers' trials interleave.
    (ready / me).touch()
    deadline = time.monotonic() + 120
    while len(list(ready.iterdir())) < 2:
        if time.monotonic() > deadline:
            sys.exit("the other worker did not start within 120 s")
        time.sleep(0.01)

    def objective(trial):
        x = trial.suggest_float("x", -5.0, 5.0)
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        width = trial.suggest_int("width", 1, 64)
        act = trial.suggest_categorical("act", ["relu", "tanh", "gelu"])
        trial.set_user_attr("worker", me)
        time.sleep(0.05)
        return (x - 1.0) ** 2 + math.log10(lr / 1e-2) ** 2 + ((width - 20) / 10) ** 2 + (act != "tanh")

    study.optimize(objective, n_trials=15)
    """
)


def test_two_processes_on_one_sqlite_storage_get_no_duplicate_points(tmp_path):
    # The failure this guards against: processes given the same seed drawing the same stream
    # (optuna.samplers.RandomSampler(seed=0) in both workers repeats every point). Here each
    # trial's randomness comes from (seed, trial number), and numbers are unique in a study.
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="shared", storage=url)  # the schema, before two processes race for it
    ready = tmp_path / "ready"
    ready.mkdir()
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, url, name, str(ready)], cwd=tmp_path, stderr=subprocess.PIPE)
        for name in ("a", "b")
    ]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err.decode()

    trials = optuna.load_study(study_name="shared", storage=url).trials
    assert len(trials) == 30
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(points)) == len(points)
    # The workers really ran at the same time: some trial of one overlaps some trial of the other.
    spans = {w: [(t.datetime_start, t.datetime_complete) for t in trials if t.user_attrs["worker"] == w] for w in "ab"}
    assert len(spans["a"]) == len(spans["b"]) == 15
    assert any(_overlap(p, q) for p in spans["a"] for q in spans["b"])


def _overlap(p: tuple[datetime, datetime], q: tuple[datetime, datetime]) -> bool:
    return p[0] < q[1] and q[0] < p[1]


def test_every_kind_of_distribution_is_proposed_jointly_after_the_first_trial(monkeypatch):
    sampler = PyEngineSampler(seed=1, n_startup_trials=4, n_raw_samples=128, n_restarts=2)
    independent = []
    sample_independent = sampler.sample_independent

    def spy(study, trial, name, dist):
        independent.append((trial.number, name))
        return sample_independent(study, trial, name, dist)

    monkeypatch.setattr(sampler, "sample_independent", spy)

    def objective(trial):
        step = trial.suggest_float("step", 0.0, 2.0, step=0.25)
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        every = trial.suggest_int("every", 1, 19, step=3)  # 1, 4, ..., 19
        width = trial.suggest_int("width", 1, 1000, log=True)
        kind = trial.suggest_categorical("kind", [None, "a", 2.5, True])
        trial.suggest_float("fixed", 0.5, 0.5)  # single-valued: Optuna fills it in itself
        return (step - 1.25) ** 2 + math.log10(lr / 1e-3) ** 2 + (every - 10) ** 2 / 50 + (kind == "a") + 1 / width

    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=10)

    # Only the first trial, which has no search space to propose in, samples independently: a
    # joint proposal off a distribution's grid would have been dropped silently by Optuna.
    assert sorted(independent) == [(0, name) for name in sorted(["step", "lr", "every", "width", "kind"])]
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert all(t.distributions[k]._contains(t.distributions[k].to_internal_repr(v)) for k, v in t.params.items())
        assert isinstance(t.params["every"], int) and isinstance(t.params["width"], int)
        assert (t.params["every"] - 1) % 3 == 0 and t.params["every"] <= 19
        assert t.params["step"] == pytest.approx(round(t.params["step"] * 4) / 4, abs=1e-12)
    assert len({tuple(sorted(t.params.items(), key=str)) for t in study.trials}) == 10


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_the_history_holds_complete_trials_oriented_to_minimise_and_running_and_queued_ones_as_pending(
    direction, monkeypatch
):
    dist = FloatDistribution(0.0, 1.0)
    sampler = PyEngineSampler(seed=5)
    study = optuna.create_study(direction=direction, sampler=sampler)
    for x in (0.1, 0.2, 0.3):
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions={"x": dist}, value=10 * x))
    study.add_trial(
        optuna.trial.create_trial(params={"x": 0.4}, distributions={"x": dist}, state=optuna.trial.TrialState.FAIL)
    )
    running = study.ask({"x": dist})  # running, its x already chosen
    current = study.ask()  # the trial being proposed for: no params yet
    study.enqueue_trial({"x": 0.75})  # waiting: the study will evaluate it next
    shown = []

    def record(space, history):
        shown.append(history)
        return {"x": 0.5}

    monkeypatch.setattr(sampler.bayes, "suggest", record)
    frozen = study._storage.get_trial(current._trial_id)
    assert sampler.sample_relative(study, frozen, sampler.infer_relative_search_space(study, frozen)) == {"x": 0.5}

    (history,) = shown
    sign = 1.0 if direction == "minimize" else -1.0
    assert history.complete == [({"x": x}, sign * 10 * x) for x in (0.1, 0.2, 0.3)]
    assert history.pending == [{"x": running.params["x"]}, {"x": 0.75}]
    assert len(history.seen_keys) == 6  # the failed trial's point too: it is not proposed again
    assert (history.number, history.seed) == (current.number, 5)


def test_a_multi_objective_study_is_refused_with_what_to_do_instead():
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=PyEngineSampler())
    with pytest.raises(ValueError, match="optimises one objective.*NSGAIISampler"):
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), 0.0), n_trials=1)


@pytest.mark.filterwarnings("ignore:Choices for a categorical distribution")
def test_a_categorical_of_unhashable_choices_is_refused_with_what_to_do_instead():
    def objective(trial):
        trial.suggest_float("x", 0.0, 1.0)
        return len(trial.suggest_categorical("layers", [[64, 64], [128]]))

    study = optuna.create_study(sampler=PyEngineSampler())
    with pytest.raises(ValueError, match="'layers' cannot be searched.*names or indices"):
        study.optimize(objective, n_trials=1)  # the first trial: sampled independently
    study = optuna.create_study(sampler=PyEngineSampler())
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.5, "layers": [128]},
            distributions={"x": FloatDistribution(0.0, 1.0), "layers": CategoricalDistribution([[64, 64], [128]])},
            value=1.0,
        )
    )
    with pytest.raises(ValueError, match="'layers' cannot be searched"):
        study.optimize(objective, n_trials=1)  # a later trial: the joint proposal


def test_bad_arguments_are_refused_at_construction():
    with pytest.raises(ValueError, match="seed=True must be an int"):
        PyEngineSampler(seed=True)
    with pytest.raises(ValueError, match="n_startup_trials=0 must be a positive int"):
        PyEngineSampler(n_startup_trials=0)
    with pytest.raises(TypeError):
        PyEngineSampler(no_such_option=1)
