"""Useful Overfitting: the one-batch check and the whole-domain fit of a noise-free problem."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyengine.train.heat_equation import heat_equation, heat_solution
from pyengine.train.overfit import OverfitReport, overfit_batch
from pyengine.train.whole_domain import fit_whole_domain, max_abs_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(32, 20, generator=g), "y": torch.randint(0, 5, (32,), generator=g)}


def ce(model: nn.Module, b: dict) -> torch.Tensor:
    return F.cross_entropy(model(b["x"]), b["y"])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 5))


class ConstantOutput(nn.Module):
    """Its output cannot depend on the input: it can only learn the batch's class frequencies."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def test_a_model_that_can_memorise_passes(batch):
    report = overfit_batch(mlp(), ce, batch)
    assert isinstance(report, OverfitReport)
    assert report.passed, report.message
    assert report.final_loss <= 1e-3
    assert report.final_loss == report.losses[-1]
    assert len(report.losses) == report.steps + 1
    assert report.initial_loss > 1.0  # it started from chance level, so the check did something
    assert "passed" in str(report)


def test_a_model_whose_output_ignores_the_input_fails_fast(batch):
    report = overfit_batch(ConstantOutput(), ce, batch, steps=1000)
    assert not report.passed
    assert report.steps < 1000  # stopped at the plateau, not at the step limit
    assert report.final_loss > 1.0
    assert "plateaued" in report.message and "depends on the input" in report.message


def test_the_callers_model_mode_and_rng_are_untouched(batch):
    model = mlp()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    report = overfit_batch(model, ce, batch, steps=20, tolerance=0.0)
    assert report.steps == 20 and report.losses[-1] < report.losses[0]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_nan_loss_stops_at_once(batch):
    report = overfit_batch(mlp(), lambda m, b: ce(m, b) * float("nan"), batch)
    assert not report.passed and report.steps == 0
    assert math.isnan(report.final_loss)
    assert "nan" in report.message and "learning rate" in report.message


def test_divergence_to_inf_or_nan_is_caught_mid_run():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    b = {"x": torch.randn(16, 4) * 100, "y": torch.randn(16, 1)}
    sgd = functools.partial(torch.optim.SGD, lr=10.0)
    report = overfit_batch(model, lambda m, b: F.mse_loss(m(b["x"]), b["y"]), b, optimizer=sgd, steps=500)
    assert not report.passed
    assert not math.isfinite(report.final_loss)
    assert 0 < report.steps < 500
    assert all(math.isfinite(v) for v in report.losses[:-1])


def test_detached_loss_is_reported(batch):
    report = overfit_batch(mlp(), lambda m, b: ce(m, b).detach(), batch)
    assert not report.passed and report.steps == 0
    assert "no gradient" in report.message


def test_loss_not_connected_to_parameters_is_reported(batch):
    extra = nn.Linear(20, 5)  # not part of the checked model
    report = overfit_batch(mlp(), lambda m, b: F.cross_entropy(extra(b["x"]), b["y"]), batch)
    assert not report.passed and "no trainable parameter received a gradient" in report.message


def test_optimizer_factory_is_used(batch):
    sgd = functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9)
    report = overfit_batch(mlp(), ce, batch, optimizer=sgd, train_mode=False)
    assert report.passed, report.message


def test_bad_input_is_refused(batch):
    model = mlp()
    with pytest.raises(TypeError, match="factory"):
        overfit_batch(model, ce, batch, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="scalar tensor"):
        overfit_batch(model, lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"), batch)
    with pytest.raises(ValueError, match="steps"):
        overfit_batch(model, ce, batch, steps=0)
    with pytest.raises(ValueError, match="lr"):
        overfit_batch(model, ce, batch, lr=-1.0)
    frozen = mlp().requires_grad_(False)
    assert "no trainable parameter" in overfit_batch(frozen, ce, batch).message


def test_heat_equation_grid_and_physics():
    nx, nt, alpha = 17, 9, 0.1
    data = heat_equation(nx, nt, alpha=alpha, t_max=0.4)
    assert data.inputs.shape == (nx * nt, 2) and data.targets.shape == (nx * nt, 1)
    x, t = data.inputs[:, 0], data.inputs[:, 1]
    assert x.min() == 0 and x.max() == 1 and t.min() == 0 and math.isclose(t.max().item(), 0.4, rel_tol=1e-6)
    u = data.targets[:, 0]
    assert u[(x == 0) | (x == 1)].abs().max() < 1e-6  # boundary conditions
    at_zero = t == 0
    expected = torch.sin(math.pi * x[at_zero]) + 0.5 * torch.sin(2 * math.pi * x[at_zero])
    assert torch.allclose(u[at_zero], expected, atol=1e-6)  # initial condition
    # u_t = alpha u_xx at off-grid points, by autograd on the closed form.
    xs = torch.rand(50, dtype=torch.float64, requires_grad=True)
    ts = torch.rand(50, dtype=torch.float64, requires_grad=True)
    sol = heat_solution(xs, ts, alpha=alpha).sum()
    u_x, u_t = torch.autograd.grad(sol, (xs, ts), create_graph=True)
    (u_xx,) = torch.autograd.grad(u_x.sum(), xs)
    assert torch.allclose(u_t, alpha * u_xx, atol=1e-9)


def test_heat_equation_rejects_nonsense():
    with pytest.raises(ValueError, match="nx"):
        heat_equation(1, 10)
    with pytest.raises(ValueError, match="alpha"):
        heat_equation(alpha=0.0)
    with pytest.raises(ValueError, match="mode"):
        heat_equation(modes=((0.5, 1.0),))
    with pytest.raises(ValueError, match="t_max"):
        heat_equation(t_max=-1.0)


def heat_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def test_whole_domain_fit_of_the_heat_equation_reaches_the_tolerance():
    data = heat_equation(16, 16)
    model = heat_mlp()
    report = fit_whole_domain(model, data.inputs, data.targets, tolerance=0.03, lr=1e-2, max_steps=6000)
    assert report.reached, report.message
    assert report.max_error <= 0.03
    assert report.history[0][0] == 0 and report.history[0][1] > 0.3  # far from solved before training
    assert report.history[-1] == (report.steps, report.max_error)
    assert max_abs_error(model, data.inputs, data.targets) == report.max_error
    # The grid covers the domain, so points between grid nodes are nearly as good.
    mid = heat_equation(31, 31)
    assert max_abs_error(model, mid.inputs, mid.targets) < 3 * 0.03


def test_whole_domain_reports_when_not_reached_and_supports_minibatches():
    data = heat_equation(8, 8)
    report = fit_whole_domain(
        heat_mlp(), data.inputs, data.targets, tolerance=1e-6, max_steps=30, batch_size=16, check_every=10
    )
    assert not report.reached and report.steps == 30
    assert [s for s, _ in report.history] == [0, 10, 20, 30]
    assert "not reached" in report.message


def test_whole_domain_rejects_bad_input():
    data = heat_equation(8, 8)
    with pytest.raises(ValueError, match="same"):
        fit_whole_domain(heat_mlp(), data.inputs, data.targets[:-1], tolerance=0.1)
    with pytest.raises(ValueError, match="tolerance"):
        fit_whole_domain(heat_mlp(), data.inputs, data.targets, tolerance=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        fit_whole_domain(heat_mlp(), data.inputs, data.targets, tolerance=0.1, batch_size=10_000)


def test_whole_domain_steps_schedulers():
    data = heat_equation(8, 8)
    made = []

    def step_lr(opt):
        made.append(opt)
        return torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)

    fit_whole_domain(heat_mlp(), data.inputs, data.targets, tolerance=1e-6, max_steps=30, lr=1e-2, scheduler=step_lr)
    assert made[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)  # stepped after every step

    def on_plateau(opt):
        made.append(opt)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, eps=0.0)

    sgd = functools.partial(torch.optim.SGD, lr=1e-12)  # too small to move the error: a plateau
    fit_whole_domain(heat_mlp(), data.inputs, data.targets, tolerance=1e-6, max_steps=30, optimizer=sgd,
                     scheduler=on_plateau, check_every=10)  # fmt: skip
    assert made[1].param_groups[0]["lr"] < 1e-12  # stepped with the max error at each check
