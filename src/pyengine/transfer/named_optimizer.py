"""Optimizer state keyed by parameter name, so it restores after the trainable set changed.

``torch.optim.Optimizer.state_dict()`` identifies parameters by their position in the
param groups. Freeze a layer, unfreeze one, or add a group, and the positions no longer
match: loading fails ("... a parameter group that doesn't match the size of optimizer's
group") or, worse, puts one parameter's moments on another. Here every parameter is
identified by its name in the model, and each param group by the names it holds.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import nn

from pyengine.checkpoint.stateful import unwrap_module

_FORMAT = "pyengine.transfer.NamedOptimizerState"


class NamedLoadResult(NamedTuple):
    """What :meth:`NamedOptimizerState.load_state_dict` could not match, by parameter name.

    missing: in the optimizer now, without saved state (they start fresh).
    unexpected: saved, but not in the optimizer now (their state is dropped).
    mismatched: saved state whose shape differs from the parameter's (dropped).
    """

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]


class NamedOptimizerState:
    """Saves and restores an optimizer's state keyed by the model's parameter names.

    Put it in a checkpoint in place of the optimizer::

        named = pe.transfer.NamedOptimizerState(optimizer, model)
        ckpt.save(step, {"model": model, "optimizer": named})
        ckpt.restore({"model": model, "optimizer": named})

    Restoring works into an optimizer whose param groups or trainable set differ from the
    saved one: each parameter gets the state saved under its name; each current param
    group takes the hyperparameters (lr, betas, ...) of the saved group that held most of
    its parameters, and keeps its own when none of them was saved. Parameters that are in
    the optimizer only after some other restore step (for example groups added by
    :class:`GradualUnfreezer`) must be added before this restores: list the unfreezer
    before the optimizer in the checkpoint's state.

    Args:
        optimizer: Any ``torch.optim.Optimizer``.
        model: The module that owns every parameter in the optimizer (DDP and
            torch.compile wrappers are unwrapped, so names match the plain model).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.optimizer = optimizer
        self.model = model

    def _group_names(self) -> list[list[str]]:
        """Names of each param group's parameters, in order (flattened: the state_dict indices)."""
        names = {id(p): name for name, p in unwrap_module(self.model).named_parameters()}
        groups = []
        for g, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        f"param group {g} of the optimizer holds a parameter of shape {tuple(p.shape)} that is "
                        "not in the model, so it has no name to save it under"
                    )
            groups.append([names[id(p)] for p in group["params"]])
        return groups

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state_dict with parameter indices replaced by parameter names."""
        names = [n for group in self._group_names() for n in group]
        sd = self.optimizer.state_dict()
        groups = []
        for group in sd["param_groups"]:
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append({"params": [names[i] for i in group["params"]], "hyper": hyper})
        return {
            "format": _FORMAT,
            "version": 1,
            "optimizer": type(self.optimizer).__name__,
            "state": {names[i]: s for i, s in sd["state"].items()},
            "param_groups": groups,
        }

    def load_state_dict(self, state: dict[str, Any]) -> NamedLoadResult:
        """Restores per-parameter state and group hyperparameters by name, in place.

        Returns:
            The names that could not be matched (also reported with a warning when some
            saved state is dropped).

        Raises:
            ValueError: ``state`` is not a NamedOptimizerState state_dict, or comes from a
                different optimizer class.
        """
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("not a NamedOptimizerState state_dict (was the plain optimizer saved instead?)")
        if state.get("version") != 1:
            raise ValueError(f"NamedOptimizerState version {state.get('version')!r} is not supported")
        mine = type(self.optimizer).__name__
        if state["optimizer"] != mine:
            raise ValueError(f"the saved state is for {state['optimizer']}, this optimizer is a {mine}")
        group_names = self._group_names()
        names = [n for group in group_names for n in group]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved = state["state"]
        current = self.optimizer.state_dict()
        new_state: dict[int, Any] = {}
        missing, mismatched = [], []
        for i, (name, p) in enumerate(zip(names, params)):
            if name not in saved:
                missing.append(name)
            elif not _shapes_match(saved[name], p):
                mismatched.append(name)
            else:
                new_state[i] = saved[name]
        unexpected = sorted(set(saved) - set(names))
        current["state"] = new_state
        for group, current_group in zip(group_names, current["param_groups"]):
            match = _best_group(state["param_groups"], set(group))
            if match is not None:
                current_group.update({k: v for k, v in match["hyper"].items() if k in current_group})
        self.optimizer.load_state_dict(current)
        if unexpected or mismatched:
            warnings.warn(
                f"optimizer state not restored for {len(unexpected)} saved parameter(s) no longer in the optimizer "
                f"{unexpected[:5]} and {len(mismatched)} whose shape changed {mismatched[:5]}. If a "
                "GradualUnfreezer adds them back, restore it before the optimizer (list it first).",
                stacklevel=2,
            )
        return NamedLoadResult(missing, unexpected, mismatched)


def _best_group(saved_groups: list[dict[str, Any]], names: set[str]) -> dict[str, Any] | None:
    """The saved group holding most of ``names`` (the first on ties), or None if none holds any."""
    best, best_overlap = None, 0
    for group in saved_groups:
        overlap = len(names.intersection(group["params"]))
        if overlap > best_overlap:
            best, best_overlap = group, overlap
    return best


def _shapes_match(param_state: Any, p: torch.Tensor) -> bool:
    # Per-parameter tensors (moments, momentum buffers) have the parameter's shape; scalars
    # such as Adam's step are 0-d and always fit.
    if not isinstance(param_state, dict):
        return True
    return all(v.dim() == 0 or v.shape == p.shape for v in param_state.values() if isinstance(v, torch.Tensor))
