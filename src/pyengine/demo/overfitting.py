"""Demo section: Useful Overfitting. One batch must be memorised; a noise-free problem (the
heat equation) is fitted on its whole domain to a max-error tolerance, with no validation split."""

from __future__ import annotations

import time

import torch

import pyengine as pe
from pyengine.demo import synthetic
from pyengine.demo.section import Section
from pyengine.train.heat_equation import heat_equation
from pyengine.train.whole_domain import fit_whole_domain


class _IgnoresInput(torch.nn.Module):
    """A bug a one-batch check catches: the output does not depend on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), -1)


def run(quick: bool) -> Section:
    section = Section("Useful overfitting")
    x, y = synthetic.teacher_task(64, seed=7)
    batch = {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}
    torch.manual_seed(0)
    good = pe.overfit_batch(synthetic.mlp(dropout=0.0), synthetic.cross_entropy, batch, steps=500)
    section.say(
        f"one-batch check, MLP: passed={good.passed}, loss {good.initial_loss:.3f} -> "
        f"{good.final_loss:.2e} in {good.steps} steps"
    )
    bad = pe.overfit_batch(_IgnoresInput(), synthetic.cross_entropy, batch, steps=500)
    section.say(
        f"one-batch check, a model whose output ignores its input: passed={bad.passed} "
        f"after {bad.steps} steps ({bad.message.split('. ')[0]})"
    )

    heat = heat_equation(nx=25, nt=25)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    t0 = time.perf_counter()
    tolerance = 0.02
    report = fit_whole_domain(model, heat.inputs, heat.targets, tolerance=tolerance, max_steps=8000, lr=1e-2)
    seconds = time.perf_counter() - t0
    section.say(
        f"heat equation, whole domain ({len(heat.inputs)} grid points, no validation split): "
        f"max |error| {report.max_error:.4f} (tolerance {tolerance}) after {report.steps} steps, "
        f"{seconds:.1f} s, solved={report.reached}"
    )

    def draw(ax) -> None:
        ax.semilogy(good.losses, label="MLP (memorises)")
        ax.semilogy(bad.losses, label="output ignores input (bug)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss on the one batch")
        ax.legend()

    def draw_heat(ax) -> None:
        steps, errors = zip(*report.history)
        ax.semilogy(steps, errors)
        ax.axhline(tolerance, color="k", linestyle="--", label="tolerance")
        ax.set_xlabel("step")
        ax.set_ylabel("max |error| over the whole domain")
        ax.set_title("heat equation, noise-free: no validation split")
        ax.legend()

    section.figures.append(("overfit_batch.png", draw))
    section.figures.append(("heat_equation.png", draw_heat))
    return section
