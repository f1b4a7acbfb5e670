"""The save plan: which tensors this rank writes, and the layout rank 0 puts in the manifest.

A world of one writes everything, in the plain layout (the part is the step). In a world of
W ranks, entries of `state` that are nn.Modules or optimizers are *shared*: every rank holds
the same logical tensors. A DTensor sharded along one dim of a 1-D mesh (FSDP2) is written by
its owners, each its local shard, as a piece (dim, offset, length) of the global tensor.
Every other shared tensor is replicated (DDP keeps replicas equal) and is written exactly
once, by the rank a deterministic greedy plan gives it, so the bytes are spread over ranks.
A pipeline stage (and the optimizer over its parameters) is *owned*: only its rank holds it,
so that rank writes all of it, its optimizer state renumbered to the full model's parameter
ids, and rank 0 merges the stages' structures into the plain model's (partitioned.py). Every
other entry (loader, RNG, extras) is *per rank*: each rank stores its own in its part's state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pyengine.checkpoint import partitioned
from pyengine.checkpoint.dtypes import code_of_torch
from pyengine.checkpoint.rng import capture_rng_state
from pyengine.checkpoint.state_codec import NamedTensor, StateEncoder
from pyengine.checkpoint.stateful import encode_object, parameter_ptrs, unwrap_module

RNG_KEY = "__rng__"


@dataclass
class SavePlan:
    """One rank's share of one save."""

    tensors: list[NamedTensor]  # what this rank writes into its part
    part_state_json: str  # the part manifest's "state": this rank's objects (all of them in a world of one) and RNG
    pieces: list[dict] = field(default_factory=list)  # where this rank's shared tensors sit in the global ones
    shared: Any = None  # (shared structure, owned structures): merged by rank 0 into the manifest


def plan_save(state: Mapping[str, Any], rank: int, world: int, capture_rng: bool) -> SavePlan:
    """Encodes `state` and decides what this rank writes. Raises ValueError / TypeError for
    state that cannot be checkpointed (nothing is written then)."""
    if world == 1:
        encoder = StateEncoder()
        objects = {key: encode_object(encoder, key, obj) for key, obj in state.items()}
        rng = encoder.encode(capture_rng_state(), (RNG_KEY,)) if capture_rng else None
        return SavePlan(encoder.tensors, _state_json(objects, rng))
    shared, shared_enc, local_enc, (local, rng), owned, owned_enc = _encode_split(state, capture_rng)
    pieces, mine = plan_pieces(shared_enc.tensors, rank, world)
    for t in owned_enc.tensors:  # a stage's own tensors: nobody else holds them
        pieces.append(_piece(t.name, t.tensor, None, 0, 0))
        mine.append(t)
    per_rank = [NamedTensor(t.name, _local(t.tensor), t.stable) for t in local_enc.tensors]
    return SavePlan(mine + per_rank, _state_json(local, rng), pieces, (shared, owned))


def _state_json(objects: dict, rng: Any) -> str:
    return json.dumps({"objects": objects, "rng": rng}, allow_nan=False, separators=(",", ":"))


def _local(t: torch.Tensor) -> torch.Tensor:
    # A DTensor in a per-rank entry (early stopping's best weights under FSDP): this rank's shard.
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]


def _encode_split(state: Mapping[str, Any],
                  capture_rng: bool) -> tuple[dict, StateEncoder, StateEncoder, tuple, dict, StateEncoder]:
    """Splits the state: shared (the same on every rank), owned (a pipeline stage's, in global
    parameter ids: see partitioned.py) and per-rank entries, each encoded."""
    shared_enc, local_enc, owned_enc = StateEncoder(), StateEncoder(), StateEncoder()
    shared, local, owned = {}, {}, {}
    stages = partitioned.partitions_in(state)
    for key, obj in state.items():
        if key in stages:
            kind, partition, _ = stages[key]
            if kind == partitioned.MODULE:
                module = unwrap_module(obj)
                owned[key] = (kind, owned_enc.encode(module.state_dict(), (key,), parameter_ptrs(module)))
            else:
                sd = partitioned.globalize_optimizer(obj.state_dict(), obj, partition)
                owned[key] = (kind, owned_enc.encode(sd, (key,), all_stable=True))
        elif isinstance(obj, torch.nn.Module):
            module = unwrap_module(obj)  # parameters are stable until the optimizer step, buffers are not
            shared[key] = shared_enc.encode(module.state_dict(), (key,), parameter_ptrs(module))
        elif isinstance(obj, torch.optim.Optimizer):
            shared[key] = shared_enc.encode(obj.state_dict(), (key,), all_stable=True)
        else:
            local[key] = encode_object(local_enc, key, obj)
    rng = local_enc.encode(capture_rng_state(), (RNG_KEY,)) if capture_rng else None
    return shared, shared_enc, local_enc, (local, rng), owned, owned_enc


def plan_pieces(tensors: list[NamedTensor], rank: int, world: int) -> tuple[list[dict], list[NamedTensor]]:
    """Returns this rank's piece table and the tensors it writes.

    Sharded DTensors: the local shard, if not empty. Replicated tensors: assigned greedily,
    largest first, to the least-loaded rank; every rank computes the same plan.
    """
    pieces: list[dict] = []
    mine: list[NamedTensor] = []
    replicated: list[NamedTensor] = []
    for item in tensors:
        t = item.tensor
        shard = _shard_of(item.name, t)
        if shard is None:
            replicated.append(NamedTensor(item.name, _local(t), item.stable))
            continue
        dim, offset, local = shard
        if local.numel() > 0:
            pieces.append(_piece(item.name, t, dim, offset, local.shape[dim]))
            mine.append(NamedTensor(item.name, local, item.stable))
    load = [0] * world
    for item in sorted(replicated, key=lambda nt: (-nt.tensor.numel() * nt.tensor.element_size(), nt.name)):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += item.tensor.numel() * item.tensor.element_size()
        if owner == rank:
            pieces.append(_piece(item.name, item.tensor, None, 0, 0))
            mine.append(item)
    return pieces, mine


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local")


def _shard_of(name: str, t: torch.Tensor) -> tuple[int, int, torch.Tensor] | None:
    if not _is_dtensor(t):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = t.placements  # type: ignore[attr-defined]
    if all(isinstance(p, Replicate) for p in placements):
        return None
    if len(placements) != 1 or not isinstance(placements[0], Shard):
        raise ValueError(f"cannot checkpoint DTensor {name!r} with placements {placements}: only Shard(d) or "
                         "Replicate() on a 1-D mesh (FSDP2) is supported")
    dim = placements[0].dim
    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, placements)  # type: ignore[attr-defined]
    return dim, int(offsets[dim]), t.to_local()  # type: ignore[attr-defined]


def _piece(name: str, t: torch.Tensor, dim: int | None, offset: int, length: int) -> dict:
    return {"name": name, "dtype": code_of_torch(t.dtype, name), "shape": list(t.shape),
            "dim": dim, "offset": offset, "length": length}
