"""Gradual unfreezing: layer groups become trainable at given (virtual) epochs.

The unfreezer is a cursor over a fixed plan, so its whole state is the list of groups
already unfrozen. Restoring it re-applies those unfreezes (parameters trainable again,
the same param groups appended to the optimizer in the same order), which is what makes
a resumed run continue exactly like an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from pyengine.transfer.freezing import _check_bn, freeze, unfreeze

_FORMAT = "pyengine.transfer.GradualUnfreezer"


class GradualUnfreezer:
    """Unfreezes layer groups at given epochs and gives their parameters to the optimizer.

    On construction every group is frozen (``freeze(group, bn=frozen_bn)``). Call
    :meth:`on_epoch_start` at each (virtual) epoch boundary, before the epoch's first step:
    every group whose epoch has come is unfrozen and its newly trainable parameters are
    appended to the optimizer as a new param group, named ``"unfrozen/<index>"``.
    Parameters already in the optimizer (say, a group nested in another) are not added
    twice.

    Save it in checkpoints next to the optimizer, and list it *before* the optimizer in
    the state given to ``Checkpointer.restore``: restoring re-adds the unfrozen groups, so
    the optimizer then has the param groups its saved state refers to::

        unfreezer = GradualUnfreezer(optimizer, [model.block3, model.block2], at_epochs=[2, 4], lr=1e-4)
        state = {"model": model, "unfreezer": unfreezer, "optimizer": optimizer}
        ckpt.restore(state)

    Under DDP, parameters that become trainable after wrapping are never all-reduced and
    replicas silently diverge: re-wrap the model after an unfreeze.

    Args:
        optimizer: The optimizer training the rest of the model.
        groups: Modules to unfreeze, in plan order.
        at_epochs: The epoch (0-based; the epoch about to start) at which each group
            becomes trainable; non-decreasing, one per group.
        lr: Learning rate of each new param group: one float for all, one per group, or
            None for the optimizer's default lr.
        frozen_bn: BatchNorm mode while a group is frozen ("frozen" or "train").
        unfrozen_bn: BatchNorm mode once it is unfrozen ("train" or "frozen").
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        groups: Sequence[nn.Module],
        at_epochs: Sequence[int],
        lr: Union[float, Sequence[float], None] = None,
        frozen_bn: str = "frozen",
        unfrozen_bn: str = "train",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        groups, at_epochs = list(groups), [int(e) for e in at_epochs]
        if not groups or not all(isinstance(g, nn.Module) for g in groups):
            raise ValueError("groups must be a non-empty sequence of nn.Module")
        if len(at_epochs) != len(groups):
            raise ValueError(f"at_epochs has {len(at_epochs)} entries for {len(groups)} groups")
        if any(e < 0 for e in at_epochs) or at_epochs != sorted(at_epochs):
            raise ValueError(f"at_epochs must be non-negative and non-decreasing, got {at_epochs}")
        _check_bn(frozen_bn)
        _check_bn(unfrozen_bn)
        self.lrs = self._lrs(lr, len(groups), optimizer)
        self.optimizer, self.groups, self.at_epochs = optimizer, groups, at_epochs
        self.frozen_bn, self.unfrozen_bn = frozen_bn, unfrozen_bn
        self.unfrozen: list[int] = []
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for i, group in enumerate(groups):
            if any(id(p) in in_optimizer for p in group.parameters()):
                raise ValueError(f"group {i} has parameters already in the optimizer; give it only the rest")
            freeze(group, bn=frozen_bn)

    @staticmethod
    def _lrs(lr: Union[float, Sequence[float], None], n: int, optimizer: torch.optim.Optimizer) -> list[float]:
        if lr is None:
            if "lr" not in optimizer.defaults:
                raise ValueError("the optimizer has no default lr; pass lr")
            return [optimizer.defaults["lr"]] * n
        if isinstance(lr, (int, float)):
            return [float(lr)] * n
        lrs = [float(x) for x in lr]
        if len(lrs) != n:
            raise ValueError(f"lr has {len(lrs)} entries for {n} groups")
        return lrs

    def on_epoch_start(self, epoch: int) -> list[int]:
        """Unfreezes every group whose epoch is ``<= epoch`` and not unfrozen yet.

        Idempotent, and catches up if boundaries were skipped.

        Returns:
            The indices of the groups unfrozen by this call.
        """
        due = [i for i, e in enumerate(self.at_epochs) if e <= epoch and i not in self.unfrozen]
        for i in due:
            self._unfreeze(i)
        return due

    def _unfreeze(self, i: int) -> None:
        unfreeze(self.groups[i], bn=self.unfrozen_bn)
        in_optimizer = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        new = [p for p in self.groups[i].parameters() if p.requires_grad and id(p) not in in_optimizer]
        if new:
            self.optimizer.add_param_group({"params": new, "lr": self.lrs[i], "name": f"unfrozen/{i}"})
        self.unfrozen.append(i)

    @property
    def trainable_groups(self) -> list[int]:
        """Indices of the groups unfrozen so far, in the order they were unfrozen."""
        return list(self.unfrozen)

    def state_dict(self) -> dict[str, Any]:
        """The plan and the groups unfrozen so far (JSON values only)."""
        return {"format": _FORMAT, "version": 1, "at_epochs": list(self.at_epochs), "unfrozen": list(self.unfrozen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-applies the saved unfreezes, in their saved order, to a fresh unfreezer.

        Raises:
            ValueError: ``state`` is not an unfreezer state, its plan differs from this
                one, or this unfreezer has already unfrozen a group the state has not.
        """
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("not a GradualUnfreezer state_dict")
        if list(state["at_epochs"]) != self.at_epochs:
            raise ValueError(f"the saved plan unfreezes at epochs {state['at_epochs']}, this one at {self.at_epochs}")
        saved = [int(i) for i in state["unfrozen"]]
        if any(not 0 <= i < len(self.groups) for i in saved) or len(set(saved)) != len(saved):
            raise ValueError(f"invalid unfrozen group list {saved}")
        if self.unfrozen != saved[: len(self.unfrozen)]:
            raise ValueError(
                f"this unfreezer already unfroze groups {self.unfrozen}, which the saved state ({saved}) does not "
                "start with; restore into a freshly built model, optimizer and unfreezer"
            )
        for i in saved[len(self.unfrozen) :]:
            self._unfreeze(i)

    def __repr__(self) -> str:
        return f"GradualUnfreezer(groups={len(self.groups)}, at_epochs={self.at_epochs}, unfrozen={self.unfrozen})"


def param_group_named(optimizer: torch.optim.Optimizer, name: str) -> Optional[dict[str, Any]]:
    """The optimizer's param group whose ``"name"`` is ``name`` (as set by the unfreezer), or None."""
    return next((g for g in optimizer.param_groups if g.get("name") == name), None)
