"""Tensor parallelism for nn.Linear blocks (`torch.distributed.tensor.parallel`).

Each pair of consecutive nn.Linear layers (the up and down projections of an MLP block) is
split across every rank of a 1-D device mesh: the first column-wise (its output features
sharded, Shard(0) weights), the second row-wise (its input features sharded, Shard(1)
weights, bias replicated), so the activation between them stays sharded and one all-reduce
per block restores the full output. Works on CPU with gloo and on GPUs with NCCL.

Unlike data parallelism every rank must see the SAME batch: the model is split, not the
data (pe.Trainer refuses a rank-sharded loader). An optimizer built before wrap() is rebound
to the sharded weights by pe.Trainer and pe.distributed.setup (optimizer_rebind.py). Sharded
weights are DTensors (Shard(0) / Shard(1)), which the rank-sharded checkpoint saves by owner
and reassembles on restore.

    strategy = pe.distributed.TensorParallel()            # pairs the Linear layers in order
    model = strategy.wrap(model)
    opt = torch.optim.Adam(model.parameters())
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pyengine.distributed.optimizer_rebind import ParametersBeforeWrap
from pyengine.distributed.process_group import is_distributed, world_size

_STYLES = ("colwise", "rowwise")


def linear_pairs(model: torch.nn.Module) -> dict[str, str]:
    """The default plan: nn.Linear layers in definition order, paired colwise then rowwise.

    An odd last Linear is left whole (replicated): it has no partner to absorb its sharded
    output, and splitting it alone would cost an extra gather.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = {}
    for up, down in zip(names[0::2], names[1::2]):
        plan[up], plan[down] = "colwise", "rowwise"
    return plan


class TensorParallel:
    """Shards nn.Linear layers column-wise / row-wise over a 1-D mesh of every rank.

    Args:
        plan: module name -> "colwise" or "rowwise"; default `linear_pairs(model)`. A colwise
            layer must be followed by its rowwise partner (elementwise layers between them
            are fine); the sharded dims must be divisible by the world size.

    Raises:
        ValueError: on an unknown style, a name that is not an nn.Linear, or a plan that
            shards nothing.
    """

    name = "tensor"
    splits_data = False  # model parallel: every rank must see the same batch
    shard_source_rank = 0  # the parallel styles scatter rank 0's weights (src_data_rank); rebound state alike

    def __init__(self, plan: Mapping[str, str] | None = None) -> None:
        if plan is not None:
            bad = {k: v for k, v in plan.items() if v not in _STYLES}
            if bad:
                raise ValueError(f"tensor-parallel plan styles must be one of {_STYLES}; got {bad}")
        self.plan = dict(plan) if plan is not None else None
        self.module: torch.nn.Module | None = None
        self.wrapped: torch.nn.Module | None = None  # the module itself, its Linear weights sharded in place
        self.parameters_before_wrap: ParametersBeforeWrap | None = None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        self.module = self.wrapped = model
        self.parameters_before_wrap = ParametersBeforeWrap(model)
        plan = self.plan if self.plan is not None else linear_pairs(model)
        self._check(model, plan)
        if not is_distributed():
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        p = next(model.parameters(), None)
        mesh = init_device_mesh(p.device.type if p is not None else "cpu", (world_size(),))
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        parallelize_module(model, mesh, {name: styles[style]() for name, style in plan.items()})
        return model

    @staticmethod
    def _check(model: torch.nn.Module, plan: Mapping[str, str]) -> None:
        if not plan:
            raise ValueError("tensor parallelism found no nn.Linear pair to shard; pass plan={name: style}")
        modules = dict(model.named_modules())
        for name in plan:
            if not isinstance(modules.get(name), torch.nn.Linear):
                raise ValueError(f"tensor-parallel plan names {name!r}, which is not an nn.Linear of the model")

    def needs_rewrap(self) -> bool:
        """Never: no gradient is reduced across ranks by a hook fixed at wrap time. Every rank sees
        the same batch, so a parameter frozen or unfrozen later stays consistent everywhere."""
        return False

    def rewrap(self) -> torch.nn.Module:
        assert self.wrapped is not None, "wrap() first"
        return self.wrapped

    def after_optimizer_step(self) -> None:
        """Nothing to do: every rank saw the same batch, and backward all-reduced what it needed."""
