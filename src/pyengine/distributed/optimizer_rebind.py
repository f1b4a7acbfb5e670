"""Rebinding an optimizer built before wrapping onto the parameters the wrapped model trains.

The usual PyTorch order is model, optimizer, then wrap for distribution. DDP and local SGD
keep the model's parameter objects, but FSDP2 replaces every parameter by a sharded DTensor,
and tensor parallelism those of the layers it splits: such an optimizer would step tensors
that nothing trains any more. Like Accelerate's prepare(), `rebind_optimizer` puts the
wrapped parameters into the optimizer in place, so it stays the same object (an LR scheduler
or unfreezer built on it keeps working), with the same param groups, in the same order, with
their hyperparameters; state it already has (Adam's exp_avg after some steps) is sharded the
way the strategy shards the parameter.

Parameters are matched by name: each strategy's wrap() records the names before it replaces
any (ParametersBeforeWrap). The record is weak, so the full-size originals die as soon as the
optimizer lets go of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pyengine.distributed.process_group import is_distributed, world_size


class OptimizerRebindError(ValueError):
    """An optimizer built before wrapping cannot be moved onto the wrapped model's parameters."""


class ParametersBeforeWrap:
    """The names of a module's parameters as they were before a strategy replaced any."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._names = {id(p): (weakref.ref(p), name) for name, p in module.named_parameters()}

    def name_of(self, param: torch.Tensor) -> str | None:
        entry = self._names.get(id(param))
        # The id alone could belong to a newer tensor at the address of a freed original.
        return entry[1] if entry is not None and entry[0]() is param else None


@dataclass
class _Move:
    """One optimizer parameter that wrapping replaced, and what replaced it."""

    name: str
    old: torch.Tensor
    new: torch.Tensor


def rebind_optimizer(optimizer: torch.optim.Optimizer, strategy: Any) -> torch.optim.Optimizer:
    """Points `optimizer` at the parameters of `strategy.wrapped`, in place, and returns it.

    A parameter the strategy kept stays; one it replaced is swapped for its replacement at the
    same place of the same param group, and its state is carried over: tensors shaped like the
    parameter are sharded like the new one (as `strategy.shard_source_rank` says: None cuts each
    rank's own copy, as fully_shard does; 0 scatters rank 0's, as tensor parallelism does), and
    scalars (Adam's step) stay as they are. Every state tensor shaped like its parameter also
    moves to that parameter's device.

    In a world of several ranks this is a collective (every rank calls it): the ranks compare
    what they will do first, so they raise together or move together.

    Raises:
        OptimizerRebindError: the optimizer holds a parameter the model did not have before
            wrapping, or one the wrapped model no longer has (or has in another shape); the
            ranks' optimizer states differ in structure; or a state entry is not shaped like its
            parameter (Adafactor's row and column factors), so there is no telling how to shard it.
    """
    problem, moves = None, []
    try:
        moves = _plan(optimizer, strategy)
    except OptimizerRebindError as e:
        problem = str(e)
    _agree(problem, _signature(optimizer, moves))
    _apply(optimizer, moves, getattr(strategy, "shard_source_rank", None))
    return optimizer


def _plan(optimizer: torch.optim.Optimizer, strategy: Any) -> list[_Move]:
    """The parameters wrapping replaced, in param-group order; raises before anything changes."""
    trained = {id(p) for p in strategy.wrapped.parameters()}
    record: ParametersBeforeWrap | None = getattr(strategy, "parameters_before_wrap", None)
    now = dict(strategy.module.named_parameters()) if record is not None else {}
    kind = type(strategy).__name__
    moves = []
    for index, old in _optimizer_params(optimizer):
        if id(old) in trained:
            continue
        if record is None:
            raise OptimizerRebindError(
                f"the optimizer holds parameters that the {strategy.name!r}-wrapped model does not train, and "
                f"{kind} cannot say which of its parameters replaced them (a pipeline stage keeps only its own): "
                f"build the optimizer over what wrap() returns: model = s.wrap(model); "
                f"opt = torch.optim.Adam(model.parameters()); pe.Trainer(model, opt, ..., strategy=s)")
        name = record.name_of(old)
        if name is None:
            raise OptimizerRebindError(
                f"param group {index} of the optimizer holds a parameter of shape {tuple(old.shape)} that is not a "
                f"parameter of the model {strategy.name!r} wrapped; build the optimizer over that model's "
                "parameters (model.parameters(), or groups of them)")
        new = now.get(name)
        if new is None:
            raise OptimizerRebindError(
                f"the optimizer trains {name!r}, which the {strategy.name!r}-wrapped model no longer has; build "
                "the optimizer over what wrap() returns")
        if tuple(new.shape) != tuple(old.shape):
            raise OptimizerRebindError(
                f"{name!r} has shape {tuple(old.shape)} in the optimizer but {tuple(new.shape)} in the "
                f"{strategy.name!r}-wrapped model; build the optimizer over what wrap() returns")
        for key, value in optimizer.state.get(old, {}).items():
            _check_mappable(optimizer, strategy, name, old, key, value)
        moves.append(_Move(name, old, new))
    return moves


def _optimizer_params(optimizer: torch.optim.Optimizer) -> Iterator[tuple[int, torch.Tensor]]:
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            yield index, p


def _check_mappable(optimizer: torch.optim.Optimizer, strategy: Any, name: str, param: torch.Tensor, key: str,
                    value: Any) -> None:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or tuple(value.shape) == tuple(param.shape):
            return
        what = f"a tensor of shape {tuple(value.shape)}"
    elif _holds_tensors(value):
        what = f"a {type(value).__name__} of tensors"
    else:
        return
    raise OptimizerRebindError(
        f"{type(optimizer).__name__} keeps state {key!r} of {name!r} as {what}, not shaped like the parameter "
        f"{tuple(param.shape)}, so there is no telling how to shard it for {strategy.name!r}: build the "
        "optimizer after wrap(), over what it returns (its state then starts empty), or use an optimizer "
        "whose state is shaped like its parameters (SGD, Adam, AdamW, ...)")


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v) for v in value)
    return False


def _signature(optimizer: torch.optim.Optimizer, moves: list[_Move]) -> list[Any]:
    """What every rank must agree on before sharding state: which state moves, in which order,
    in which shapes (sharding from rank 0 is a collective per tensor)."""
    return [(m.name, [(k, tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else (k,)
                      for k, v in optimizer.state.get(m.old, {}).items()]) for m in moves]


def _agree(problem: str | None, signature: list[Any]) -> None:
    if not is_distributed():
        if problem is not None:
            raise OptimizerRebindError(problem)
        return
    everyone: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(everyone, (problem, signature))
    problems = [(r, p) for r, (p, _) in enumerate(everyone) if p is not None]
    if problems:
        if len(problems) == len(everyone) and len({p for _, p in problems}) == 1:
            raise OptimizerRebindError(problems[0][1])
        raise OptimizerRebindError("; ".join(f"rank {r}: {p}" for r, p in problems))
    if any(s != everyone[0][1] for _, s in everyone):
        counts = ", ".join(f"rank {r}: {sum(1 for _, keys in s if keys)}" for r, (_, s) in enumerate(everyone))
        raise OptimizerRebindError(
            f"the ranks' optimizers hold different state for the parameters wrapping replaced (parameters with "
            f"state: {counts}); give every rank the same optimizer state (restore the same checkpoint on every "
            "rank, or none), or build the optimizer after wrap()")


def _apply(optimizer: torch.optim.Optimizer, moves: list[_Move], source_rank: int | None) -> None:
    replacement = {id(m.old): m.new for m in moves}
    moved = {id(m.new) for m in moves}
    for group in optimizer.param_groups:
        params = group["params"]
        # In place: an optimizer may hold on to its groups' lists (LBFGS keeps param_groups[0]["params"]).
        for i, p in enumerate(params):
            params[i] = replacement.get(id(p), p)
    for m in moves:  # param-group order, the same on every rank (_agree checked it)
        if m.old in optimizer.state:
            old_state = optimizer.state.pop(m.old)
            optimizer.state[m.new] = {k: _state_like(v, m.new, source_rank) for k, v in old_state.items()}
    for _, p in _optimizer_params(optimizer):
        if id(p) in moved or p not in optimizer.state:
            continue
        state = optimizer.state[p]
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape and v.device != p.device:
                state[k] = v.to(p.device)  # a model moved (pe.Trainer's device=) after its optimizer stepped


def _state_like(value: Any, param: torch.Tensor, source_rank: int | None) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if not _is_dtensor(param):
        return value.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    local = param.to_local()  # type: ignore[attr-defined]
    sharded = distribute_tensor(value.detach().to(local.device), param.device_mesh,  # type: ignore[attr-defined]
                                param.placements, src_data_rank=source_rank)  # type: ignore[attr-defined]
    if sharded.to_local().shape != local.shape:
        raise RuntimeError(f"optimizer state of shape {tuple(value.shape)} was sharded to "
                           f"{tuple(sharded.to_local().shape)} on this rank, but its parameter's shard is "
                           f"{tuple(local.shape)}; please report this")
    return sharded


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "placements") and hasattr(t, "device_mesh")
