"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Parameters, gradients and optimizer state are sharded along dim 0 over a 1-D device mesh
of every rank; parameters become DTensors. Works on CPU with gloo and on GPUs with NCCL.
An optimizer built before wrapping still holds the unsharded parameters: pe.Trainer and
pe.distributed.setup rebind it (optimizer_rebind.py); a loop that calls wrap() itself builds
the optimizer after it, or calls pe.distributed.rebind_optimizer(opt, strategy).

    strategy = pe.distributed.FullyShard()
    model = strategy.wrap(model)
    opt = torch.optim.Adam(model.parameters())
"""

from __future__ import annotations

import torch

from pyengine.distributed.optimizer_rebind import ParametersBeforeWrap
from pyengine.distributed.process_group import is_distributed, world_size
from pyengine.distributed.trainable_guard import TrainableGuard


class FullyShard:
    """Applies fully_shard to every submodule that owns parameters, then to the root.

    Freezing or unfreezing parameters after wrap() is refused on the next forward
    (TrainableSetChanged): FSDP fixes its parameter groups when it shards. Set
    requires_grad before wrap(), or rebuild the model.
    """

    name = "fsdp"
    shard_source_rank = None  # fully_shard cuts each rank's own copy of a parameter; rebound state alike

    def __init__(self, reshard_after_forward: bool = True) -> None:
        self.reshard_after_forward = reshard_after_forward
        self.module: torch.nn.Module | None = None
        self.wrapped: torch.nn.Module | None = None  # what trains: the module itself, sharded in place
        self._guard: TrainableGuard | None = None
        self.parameters_before_wrap: ParametersBeforeWrap | None = None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        self.module = self.wrapped = model
        self.parameters_before_wrap = ParametersBeforeWrap(model)
        if not is_distributed():
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        p = next(model.parameters(), None)
        device_type = p.device.type if p is not None else "cpu"
        mesh = init_device_mesh(device_type, (world_size(),))
        for sub in list(model.modules())[1:]:
            if any(True for _ in sub.parameters(recurse=False)):
                fully_shard(sub, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        self._guard = TrainableGuard(model, model, self.name)
        return model

    def rewrap(self) -> torch.nn.Module:
        raise NotImplementedError(
            "FSDP cannot be re-wrapped in place after requires_grad changed; set the trainable "
            "parameters before wrap(), or rebuild the model, the optimizer and restore from a checkpoint")

    def needs_rewrap(self) -> bool:
        from pyengine.distributed.trainable_guard import trainable_names

        return self._guard is not None and trainable_names(self._guard.inner) != self._guard.expected

    def after_optimizer_step(self) -> None:
        """Nothing to do: FSDP reduce-scattered the gradients in backward."""
