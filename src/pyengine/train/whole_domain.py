"""Useful Overfitting, second use: fit a noise-free problem over its whole input domain.

When the training set enumerates the entire input domain and the targets carry no noise
(a closed-form or simulated physics solution, a lookup table), there is nothing unseen to
generalise to and nothing to regularise against: a validation split only wastes data.
Train on everything, and stop when the worst error over the domain is small enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclass
class WholeDomainReport:
    """The outcome of :func:`fit_whole_domain`.

    Attributes:
        reached: The max absolute error over the domain got to <= the tolerance.
        max_error: The last measured max absolute error (NaN when training diverged).
        steps: Optimizer steps taken.
        history: ``(step, max_error)`` at each check, the first before any step.
        message: One line saying what happened.
    """

    reached: bool
    max_error: float
    steps: int
    history: list[tuple[int, float]] = field(repr=False)
    message: str

    def __str__(self) -> str:
        return self.message


def max_abs_error(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 65536) -> float:
    """max |model(inputs) - targets| over every element, in eval mode without gradients."""
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), chunk):
                out = model(inputs[start : start + chunk])
                err = (out - targets[start : start + chunk]).abs().max().item()
                if not math.isfinite(err):
                    return err
                worst = max(worst, err)
    finally:
        model.train(was_training)
    return worst


def fit_whole_domain(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    tolerance: float,
    max_steps: int = 20_000,
    lr: float = 3e-3,
    optimizer: Optional[OptimizerFactory] = None,
    scheduler: Optional[SchedulerFactory] = None,
    batch_size: Optional[int] = None,
    check_every: int = 50,
    seed: int = 0,
) -> WholeDomainReport:
    """Trains ``model`` in place with MSE on the whole domain until max |error| <= ``tolerance``.

    No validation split: every point of the domain is trained on and the stopping rule is
    the worst-case error over all of them, measured in eval mode every ``check_every``
    steps (and before the first).

    Args:
        model: The model to train (modified in place; left in train mode).
        inputs: Every point of the domain, first dimension = points.
        targets: The exact target at each point, shaped like ``model(inputs)``.
        tolerance: Max absolute error that counts as solved, > 0.
        max_steps: Most optimizer steps.
        lr: Learning rate of the default optimizer (Adam).
        optimizer: Factory ``f(params) -> Optimizer`` to use instead of Adam.
        scheduler: Factory ``f(optimizer) -> scheduler``; a ``ReduceLROnPlateau`` is
            stepped with the max error at each check, any other scheduler after each step.
        batch_size: Points per step; None trains on the full domain each step.
            Minibatches come from a ``torch.Generator`` seeded with ``seed``.
        check_every: Steps between measurements of the max error.
        seed: Seed of the minibatch order.

    Returns:
        A :class:`WholeDomainReport`.

    Raises:
        ValueError: Mismatched inputs and targets, or arguments that make no sense.
    """
    _check_args(inputs, targets, tolerance, max_steps, lr, batch_size, check_every)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter")
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    sched: Any = scheduler(opt) if scheduler is not None else None
    on_plateau = isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    gen = torch.Generator().manual_seed(seed)
    order, cursor = None, 0
    history: list[tuple[int, float]] = []
    model.train()
    for step in range(max_steps + 1):
        if step % check_every == 0 or step == max_steps:
            err = max_abs_error(model, inputs, targets)
            history.append((step, err))
            if not math.isfinite(err):
                return WholeDomainReport(
                    False,
                    err,
                    step,
                    history,
                    f"the error became {err} at step {step}: "
                    "lower the learning rate, and check the inputs and targets for NaN",
                )
            if err <= tolerance:
                return WholeDomainReport(
                    True,
                    err,
                    step,
                    history,
                    f"reached: max |error| {err:.3g} <= {tolerance:g} over all {len(inputs)} points after {step} steps",
                )
            if on_plateau:
                sched.step(err)
        if step == max_steps:
            break
        if batch_size is None:
            x, y = inputs, targets
        else:
            if order is None or cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(inputs), generator=gen), 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            x, y = inputs[idx], targets[idx]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None and not on_plateau:
            sched.step()
    final = history[-1][1]
    return WholeDomainReport(
        False,
        final,
        max_steps,
        history,
        f"not reached: max |error| {final:.3g} > {tolerance:g} "
        f"after {max_steps} steps; raise max_steps, the model's capacity, or decay the lr",
    )


def _check_args(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    tolerance: float,
    max_steps: int,
    lr: float,
    batch_size: Optional[int],
    check_every: int,
) -> None:
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError("inputs and targets must be tensors")
    if len(inputs) == 0 or len(inputs) != len(targets):
        raise ValueError(
            f"inputs and targets need the same, non-zero number of points; got {len(inputs)} and {len(targets)}"
        )
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    if max_steps < 0 or check_every < 1 or not lr > 0:
        raise ValueError(f"need max_steps >= 0, check_every >= 1 and lr > 0; got {max_steps}, {check_every}, {lr}")
    if batch_size is not None and not 1 <= batch_size <= len(inputs):
        raise ValueError(f"batch_size must be in [1, {len(inputs)}] or None, got {batch_size}")
