"""Grid, random and Bayesian samplers, the GP and LogEI, through small studies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.tune.acquisition import log_h
from pyengine.tune.gp import fit_gp, robust_cholesky


def _keys(study):
    return [study.space.key(t.params) for t in study.trials]


def test_grid_visits_each_combination_once_and_prints_its_size(capsys):
    space = {"a": pe.tune.Uniform(0.0, 1.0), "b": pe.tune.IntUniform(1, 3), "c": pe.tune.Choice(["x", "y"])}
    study = pe.tune.Study(space, sampler=pe.tune.GridSampler(points_per_param=4), seed=0)
    study.optimize(lambda t: t.params["a"] + t.params["b"], n_trials=100)
    assert "4 x 3 x 2 = 24 configurations" in capsys.readouterr().err
    keys = _keys(study)
    assert len(keys) == 24 and len(set(keys)) == 24  # stopped when the grid was exhausted
    assert sorted({t.params["a"] for t in study.trials}) == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_grid_refuses_an_enormous_grid_unless_told():
    space = {f"x{i}": pe.tune.Uniform(0.0, 1.0) for i in range(6)}
    with pytest.raises(ValueError, match="15625 configurations.*allow_large=True"):
        pe.tune.Study(space, sampler="grid").optimize(lambda t: 0.0, n_trials=1)
    study = pe.tune.Study(space, sampler=pe.tune.GridSampler(allow_large=True))
    study.optimize(lambda t: 0.0, n_trials=3)
    assert len(study.trials) == 3


def test_random_search_is_seeded():
    space = {"lr": pe.tune.LogUniform(1e-4, 1e-1), "w": pe.tune.IntUniform(16, 256)}

    def run(seed):
        study = pe.tune.Study(space, sampler="random", seed=seed)
        study.optimize(lambda t: t.params["lr"], n_trials=8)
        return [t.params for t in study.trials]

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("sampler", ["random", "bayes"])
def test_small_discrete_space_never_repeats_and_stops_when_exhausted(sampler):
    space = {"k": pe.tune.IntUniform(0, 4), "act": pe.tune.Choice(["relu", "tanh", "gelu"])}
    study = pe.tune.Study(space, sampler=pe.tune.BayesSampler(n_startup_trials=3) if sampler == "bayes" else sampler)
    study.optimize(lambda t: (t.params["k"] - 2) ** 2 + (t.params["act"] == "tanh"), n_trials=40)
    keys = _keys(study)
    assert len(keys) == 15 and len(set(keys)) == 15


def test_bayes_finds_the_optimum_of_a_mixed_space():
    space = {"x": pe.tune.Uniform(-3.0, 3.0), "n": pe.tune.IntUniform(0, 20), "c": pe.tune.Choice(["a", "b", "c"])}
    study = pe.tune.Study(space, sampler="bayes", seed=0)
    study.optimize(
        lambda t: (t.params["x"] - 1.0) ** 2 + 0.1 * (t.params["n"] - 7) ** 2 + (t.params["c"] != "b"), n_trials=30
    )
    best = study.best_params
    assert best["n"] == 7 and best["c"] == "b" and abs(best["x"] - 1.0) < 0.1


def test_log_ei_is_finite_with_finite_gradient_far_into_the_tail():
    z = torch.cat([torch.linspace(-1e3, 10, 2001), torch.tensor([-1e7, -1e10, -40.0, -1.0, -0.999])])
    z = z.double().requires_grad_(True)
    out = log_h(z)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()
    # Where the naive formula is accurate it must agree.
    zz = torch.linspace(-5, 5, 101, dtype=torch.float64)
    naive = torch.log(torch.exp(-0.5 * zz**2) / math.sqrt(2 * math.pi) + zz * torch.special.ndtr(zz))
    assert torch.allclose(log_h(zz), naive, rtol=1e-9, atol=1e-12)
    assert bool((out[1:2001] > out[:2000]).all())  # log h is increasing


def test_gp_interpolates_and_survives_duplicate_points():
    torch.manual_seed(0)
    x = torch.rand(30, 2, dtype=torch.float64)
    x = torch.cat([x, x[:5]])  # exact duplicates make the noise-free kernel matrix singular
    y = torch.sin(6 * x[:, 0]) + x[:, 1] ** 2
    y = (y - y.mean()) / y.std()
    gp = fit_gp(x, y)
    mean, var = gp.posterior(x)
    assert float((mean - y).abs().max()) < 0.05
    assert float(var.max()) < 0.05
    xq = torch.rand(200, 2, dtype=torch.float64)
    truth = torch.sin(6 * xq[:, 0]) + xq[:, 1] ** 2
    pred = (
        gp.posterior(xq)[0] * (torch.sin(6 * x[:, 0]) + x[:, 1] ** 2).std()
        + (torch.sin(6 * x[:, 0]) + x[:, 1] ** 2).mean()
    )
    assert float((pred - truth).abs().mean()) < 0.1


def test_robust_cholesky_adds_jitter_only_when_needed():
    a = torch.ones(4, 4, dtype=torch.float64)  # rank one: plain Cholesky fails
    chol = robust_cholesky(a)
    assert torch.allclose(chol @ chol.T, a, atol=1e-3)
    with pytest.raises(pe.tune.gp.GPFitError if hasattr(pe.tune, "gp") else Exception):
        robust_cholesky(torch.full((3, 3), float("nan"), dtype=torch.float64))
    assert np.isfinite(robust_cholesky(torch.eye(3, dtype=torch.float64)).numpy()).all()


def test_a_failing_gp_costs_a_random_trial_not_the_study(monkeypatch, caplog):
    import pyengine.tune.samplers.bayes as bayes

    def broken_fit(*args, **kwargs):
        raise RuntimeError("linalg.cholesky: simulated failure")

    monkeypatch.setattr(bayes, "fit_gp", broken_fit)
    study = pe.tune.Study({"x": pe.tune.Uniform(0.0, 1.0)}, sampler=pe.tune.BayesSampler(n_startup_trials=2))
    study.optimize(lambda t: t.params["x"], n_trials=5)
    assert [t.state for t in study.trials] == [pe.tune.TrialState.COMPLETE] * 5
    assert "Bayesian suggestion failed" in caplog.text and "simulated failure" in caplog.text
