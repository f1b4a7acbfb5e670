"""Loading full tensors into DTensor targets (models and optimizers sharded by FSDP2).

A checkpoint always yields global tensors for models and optimizers; a target whose parameter
is a DTensor gets the tensor cut to its own placements locally (no communication: every rank
read the same global tensor), so any checkpoint (plain, DDP, FSDP at any world size) restores
into FSDP. Per-rank entries (early stopping's best weights) keep each rank's own shard, and only
those (per_rank=True) may put a tensor of the local shard's shape back as that shard: a model or
optimizer in a checkpoint is always global, so a tensor there whose shape happens to equal a
local shard's is a different model's, and is left for load_state_dict to refuse.
"""

from __future__ import annotations

from typing import Any

import torch


def _is_dtensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, "placements") and hasattr(t, "device_mesh")


def _like(value: Any, template: Any, per_rank: bool = False) -> Any:
    if not isinstance(value, torch.Tensor) or _is_dtensor(value):
        return value
    from torch.distributed.tensor import DTensor, distribute_tensor

    local = template.to_local()
    if tuple(value.shape) == tuple(template.shape):
        return distribute_tensor(value.to(device=local.device, dtype=template.dtype), template.device_mesh,
                                 template.placements, src_data_rank=None)
    if per_rank and tuple(value.shape) == tuple(local.shape):
        # Per-rank state (early stopping's best weights) holds this rank's shard, not the whole.
        return DTensor.from_local(value.to(device=local.device, dtype=template.dtype), template.device_mesh,
                                  template.placements, run_check=False, shape=template.shape,
                                  stride=template.stride())
    return value


def module_state_like(module: torch.nn.Module, state: dict[str, Any], per_rank: bool = False) -> dict[str, Any]:
    """`state` with each entry whose current value is a DTensor distributed like it.

    per_rank: `state` is this rank's own (early stopping's best weights), so a tensor of the
    local shard's shape is that shard; otherwise every tensor is global.
    """
    current = module.state_dict()
    if not any(_is_dtensor(v) for v in current.values()):
        return state
    return {k: _like(v, current[k], per_rank) if _is_dtensor(current.get(k)) else v for k, v in state.items()}


def optimizer_state_like(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """Optimizer state with per-parameter tensors of a parameter's shape distributed like it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(_is_dtensor(p) for p in params) or not isinstance(state.get("state"), dict):
        return state
    per_param = {}
    for index, entry in state["state"].items():
        p = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
        if p is not None and _is_dtensor(p) and isinstance(entry, dict):
            entry = {k: _like(v, p) for k, v in entry.items()}
        per_param[index] = entry
    return {**state, "state": per_param}
