"""Useful Overfitting, first use: can the model drive one batch's loss to about zero?

A model, loss and optimizer that cannot memorise a single batch have a bug (an output
that ignores the input, a detached graph, logits fed to a loss that expects
probabilities, a learning rate far off); finding that in seconds beats finding it after a
day of training. ``overfit_batch`` trains a deep copy of the model on one batch and says
whether it got there, and if not, what to check.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

_CHECK_PLATEAU = (
    "Check that the output depends on the input (no constant output, no .detach() or "
    "torch.no_grad() in forward), that the loss fits the output (logits vs probabilities, target "
    "shape and dtype), that the model has the capacity, and the learning rate."
)
_CHECK_NAN = (
    "Check the learning rate (try 10x smaller), the loss for log(0) or division by zero, and the "
    "batch for NaN or infinite values."
)


@dataclass
class OverfitReport:
    """The outcome of :func:`overfit_batch`.

    Attributes:
        passed: The loss reached the tolerance.
        final_loss: The last loss computed (NaN when it diverged).
        steps: Optimizer steps taken.
        losses: The loss curve: ``losses[i]`` is the loss before step ``i`` (one more entry
            than ``steps``).
        message: One line saying what happened and, on failure, what to check.
    """

    passed: bool
    final_loss: float
    steps: int
    losses: list[float] = field(repr=False)
    message: str

    @property
    def initial_loss(self) -> float:
        return self.losses[0]

    def __str__(self) -> str:
        return self.message


def overfit_batch(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    steps: int = 1000,
    lr: float = 1e-2,
    optimizer: Optional[OptimizerFactory] = None,
    tolerance: float = 1e-3,
    patience: int = 100,
    min_improvement: float = 0.01,
    train_mode: bool = True,
) -> OverfitReport:
    """Trains a deep copy of ``model`` on one batch until the loss is <= ``tolerance``.

    The caller's model is never touched: the check trains ``copy.deepcopy(model)``, so it
    is safe mid-training and on failure. It costs one extra copy of the parameters. The
    global torch CPU RNG is saved and restored, so the check does not change what a
    seeded training run does afterwards.

    It fails fast: on a NaN or infinite loss at once, and when the best loss has not
    improved by ``min_improvement`` (relative) over the last ``patience`` steps.

    Args:
        model: The model to check (not modified).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, as for the Trainer.
        batch: One batch, passed to ``loss_fn`` as it is.
        steps: Most optimizer steps to take.
        lr: Learning rate of the default optimizer (Adam).
        optimizer: Factory ``f(params) -> Optimizer`` to use instead of Adam, for example
            ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)`` (a factory, because
            the optimizer must hold the copy's parameters, not the model's).
        tolerance: The loss that counts as "about zero" for this loss function.
        patience: Steps without enough improvement before giving up.
        min_improvement: Relative improvement of the best loss that resets the patience.
        train_mode: Run the copy in train mode (dropout and BatchNorm as in training);
            False runs it in eval mode, which removes dropout's noise.

    Returns:
        An :class:`OverfitReport`.

    Raises:
        ValueError: Bad arguments, or ``loss_fn`` does not return a scalar tensor.
        TypeError: ``optimizer`` is an optimizer instance rather than a factory.
    """
    _check_args(model, steps, lr, tolerance, patience, min_improvement, optimizer)
    rng = torch.get_rng_state()
    try:
        copy_ = copy.deepcopy(model)
        copy_.train(train_mode)
        params = [p for p in copy_.parameters() if p.requires_grad]
        if not params:
            return _report(False, [], 0, "the model has no trainable parameter (is it frozen?)")
        opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
        return _run(copy_, loss_fn, batch, opt, params, steps, tolerance, patience, min_improvement)
    finally:
        torch.set_rng_state(rng)


def _run(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    steps: int,
    tolerance: float,
    patience: int,
    min_improvement: float,
) -> OverfitReport:
    losses: list[float] = []
    best = [math.inf]  # best[i + 1]: the best loss up to step i, for the plateau test
    for step in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {_describe(loss)}")
        value = float(loss.detach())
        losses.append(value)
        best.append(min(best[-1], value))
        plateaued = step >= patience and best[-1] > (1 - min_improvement) * best[-1 - patience]
        failure = _failure(value, step, plateaued, tolerance, patience, losses, best[-1])
        if value <= tolerance:
            return _report(
                True,
                losses,
                step,
                f"passed: loss {value:.3g} <= {tolerance:g} after {step} steps (from {losses[0]:.3g})",
            )
        if failure is not None or step == steps:
            break
        if not loss.requires_grad:
            failure = "the loss has no gradient (computed under no_grad, or detached). " + _CHECK_PLATEAU
            break
        loss.backward()
        if all(p.grad is None for p in params):
            failure = "no trainable parameter received a gradient: the loss is not connected to them. " + _CHECK_PLATEAU
            break
        opt.step()
    if failure is None:
        failure = (
            f"the loss is {losses[-1]:.3g} after {steps} steps (from {losses[0]:.3g}), above the tolerance "
            f"{tolerance:g} and still falling: raise steps or lr, or loosen the tolerance for this loss"
        )
    return _report(False, losses, step, failure)


def _failure(
    value: float, step: int, plateaued: bool, tolerance: float, patience: int, losses: list[float], best: float
) -> Optional[str]:
    """Why to stop now without passing, or None to go on."""
    if not math.isfinite(value):
        return f"the loss became {value} at step {step}. {_CHECK_NAN}"
    if plateaued and value > tolerance:
        return (
            f"the loss plateaued at {best:.3g} (from {losses[0]:.3g}; tolerance {tolerance:g}) over the last "
            f"{patience} steps. {_CHECK_PLATEAU}"
        )
    return None


def _report(passed: bool, losses: list[float], steps: int, message: str) -> OverfitReport:
    final = losses[-1] if losses else math.nan
    return OverfitReport(passed=passed, final_loss=final, steps=steps, losses=losses, message=message)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_args(
    model: Any, steps: int, lr: float, tolerance: float, patience: int, min_improvement: float, optimizer: Any
) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "optimizer must be a factory f(params) -> Optimizer (e.g. functools.partial(torch.optim.SGD, lr=0.1)), "
            "not an optimizer instance: the check trains a copy of the model, whose parameters it must hold"
        )
    if optimizer is not None and not callable(optimizer):
        raise TypeError(f"optimizer must be callable, got {type(optimizer).__name__}")
    if steps < 1 or patience < 1:
        raise ValueError(f"steps and patience must be >= 1, got steps={steps}, patience={patience}")
    if not (lr > 0 and tolerance >= 0 and 0 <= min_improvement < 1):
        raise ValueError(
            f"need lr > 0, tolerance >= 0 and 0 <= min_improvement < 1; got lr={lr}, tolerance={tolerance}, "
            f"min_improvement={min_improvement}"
        )
