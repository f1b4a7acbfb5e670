"""Synchronous data parallelism: DistributedDataParallel with a trainable-set guard.

    strategy = pe.distributed.DataParallel()
    model = strategy.wrap(model)          # DDP over the default group (a no-op in a world of one)
    ... loss.backward(); opt.step() ...   # gradients are averaged across ranks in backward
    pe.transfer.unfreeze(layer); model = strategy.rewrap()   # after changing requires_grad
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from pyengine.checkpoint.stateful import unwrap_module
from pyengine.distributed.optimizer_rebind import ParametersBeforeWrap
from pyengine.distributed.process_group import is_distributed
from pyengine.distributed.trainable_guard import TrainableGuard, trainable_names


class DataParallel:
    """Wraps a model in DDP; every rank holds a full replica and sees its own batch slice.

    Args:
        **ddp_kwargs: passed to DistributedDataParallel (e.g. find_unused_parameters).
    """

    name = "ddp"

    def __init__(self, **ddp_kwargs: Any) -> None:
        self.ddp_kwargs = ddp_kwargs
        self.module: torch.nn.Module | None = None
        self.wrapped: torch.nn.Module | None = None
        self._guard: TrainableGuard | None = None
        self.parameters_before_wrap: ParametersBeforeWrap | None = None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Returns the DDP-wrapped model (the model itself in a world of one)."""
        self.module = unwrap_module(model)
        self.parameters_before_wrap = ParametersBeforeWrap(self.module)  # DDP keeps them; recorded alike
        if not is_distributed():
            self.wrapped = self.module
            return self.module
        if not any(p.requires_grad for p in self.module.parameters()):
            raise ValueError("DDP needs at least one parameter that requires grad")
        device_ids = [self.module_device()] if self.module_device().type == "cuda" else None
        self.wrapped = DistributedDataParallel(self.module, device_ids=device_ids, **self.ddp_kwargs)
        self._guard = TrainableGuard(self.wrapped, self.module, self.name)
        return self.wrapped

    def rewrap(self) -> torch.nn.Module:
        """Builds a new DDP around the same module for its current trainable set.

        The weights are already equal on every rank (DDP kept them so), so nothing moves
        but DDP's bucket layout. Call it on every rank at the same point.
        """
        if self.module is None:
            raise RuntimeError("rewrap() before wrap()")
        if self._guard is not None:
            self._guard.remove()
        return self.wrap(self.module)

    def needs_rewrap(self) -> bool:
        return self._guard is not None and trainable_names(self._guard.inner) != self._guard.expected

    def after_optimizer_step(self) -> None:
        """Nothing to do: DDP synchronised the gradients in backward."""

    def module_device(self) -> torch.device:
        p = next(self.module.parameters(), None) if self.module is not None else None
        return p.device if p is not None else torch.device("cpu")
