"""State partitioned across ranks by ownership: pipeline stages.

A pipeline stage holds some of the full model's top-level children under their original
names, and an optimizer over those parameters alone. Its module state_dict is therefore a
slice of the plain model's, but its optimizer state_dict numbers the parameters 0..k-1 in
the stage's own order, which means something different on every rank.

To make a pipeline checkpoint the plain model's checkpoint, each rank saves its optimizer
state renumbered to *global* ids: a parameter's position in the full model's parameters().
Rank 0 then merges the ranks' partial structures (module keys: a disjoint union; optimizer
state: a union by global id; param groups: the same hyperparameters, their ids joined),
which yields exactly what `Adam(model.parameters())` of the single-process model stores.
Restoring into a stage is the reverse: keep the stage's keys and the global ids it owns,
renumbered to the stage optimizer's order, before any tensor is read. So a checkpoint moves
between pipeline and plain forms, and between pipelines split differently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pyengine.checkpoint.stateful import unwrap_module
from pyengine.errors import CheckpointError

_ATTRIBUTE = "_pyengine_partition"
MODULE, OPTIMIZER = "module", "optimizer"


class Partition:
    """Which of the full model's parameters a stage owns, by name and global position."""

    def __init__(self, full_model: torch.nn.Module, stage: torch.nn.Module) -> None:
        position = {name: i for i, (name, _) in enumerate(full_model.named_parameters())}
        unknown = [n for n, _ in stage.named_parameters() if n not in position]
        if unknown:
            raise ValueError(f"stage parameters {unknown} are not parameters of the full model under those names")
        self.stage = stage
        self.global_id = {name: position[name] for name, _ in stage.named_parameters()}
        self.param_count = len(position)  # of the full model

    def optimizer_ids(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """Global id of each of the optimizer's parameters, in the optimizer's own order."""
        name_of = {id(p): n for n, p in self.stage.named_parameters()}
        ids = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in name_of:
                    raise ValueError("the optimizer holds a parameter that this pipeline stage does not own; "
                                     "build each rank's optimizer over its stage: Adam(stage.parameters())")
                ids.append(self.global_id[name_of[id(p)]])
        return ids


def mark(stage: torch.nn.Module, partition: Partition) -> None:
    """Tags a stage module so that checkpoints know it holds part of a larger model."""
    setattr(stage, _ATTRIBUTE, partition)


def partition_of(module: torch.nn.Module) -> Partition | None:
    return getattr(unwrap_module(module), _ATTRIBUTE, None)


def partitions_in(objects: Mapping[str, Any]) -> dict[str, tuple[str, Partition, Any]]:
    """key -> (kind, partition, optimizer or None) for every partitioned entry of a state.

    A module is partitioned when it is a marked stage; an optimizer when its parameters belong
    to a marked stage in the same state.
    """
    stages = {k: p for k, obj in objects.items() if isinstance(obj, torch.nn.Module) and (p := partition_of(obj))}
    found: dict[str, tuple[str, Partition, Any]] = {k: (MODULE, p, None) for k, p in stages.items()}
    for key, obj in objects.items():
        if isinstance(obj, torch.optim.Optimizer):
            params = {id(p) for g in obj.param_groups for p in g["params"]}
            for partition in stages.values():
                if params & {id(p) for p in partition.stage.parameters()}:
                    found[key] = (OPTIMIZER, partition, obj)
                    break
    return found


def globalize_optimizer(state: dict, optimizer: torch.optim.Optimizer, partition: Partition) -> dict:
    """A stage optimizer's state_dict with its parameter ids replaced by global ids."""
    ids = partition.optimizer_ids(optimizer)
    return {**state,
            "state": {ids[i]: entry for i, entry in state["state"].items()},
            "param_groups": [{**g, "params": [ids[i] for i in g["params"]]} for g in state["param_groups"]]}


def localize(kind: str, encoded: Any, partition: Partition, optimizer: Any, key: str) -> Any:
    """The part of a global (plain-form) encoded entry that a stage holds, in its numbering.

    Works on the encoded tree, before tensors are read, so a stage reads only its own bytes.
    The global ids are positions in the full model's parameters(): true of every pipeline
    checkpoint, and of a plain one whose optimizer was built over model.parameters(), which
    is checked as far as the ids allow.

    Raises:
        ValueError: the saved entry does not fit this stage's module or optimizer (a
            configuration mismatch, not corruption: no older checkpoint is tried).
    """
    if not isinstance(encoded, dict):
        raise ValueError(f"checkpoint entry {key!r} is not a saved module or optimizer")
    if kind == MODULE:
        wanted = set(partition.stage.state_dict())
        return {k: v for k, v in encoded.items() if k in wanted}
    ids = partition.optimizer_ids(optimizer)
    local = {g: i for i, g in enumerate(ids)}
    groups = encoded.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint entry {key!r} has {len(groups) if isinstance(groups, list) else 'no'} "
                         f"param groups; the stage optimizer has {len(optimizer.param_groups)}")
    saved_ids = [i for g in groups for i in g.get("params", [])]
    if sorted(saved_ids) != list(range(partition.param_count)):
        raise ValueError(f"checkpoint entry {key!r} holds optimizer state for {len(saved_ids)} parameters, not for "
                         f"each of the full model's {partition.param_count} in order, so its ids cannot be "
                         "mapped to stage parameters: save from an optimizer over model.parameters()")
    local_groups = []
    start = 0
    for index, (saved, current) in enumerate(zip(groups, optimizer.param_groups)):
        # torch pairs saved and current parameters by position within each group, so the
        # stage's ids go in its own order; each group must hold the same parameters as saved.
        mine = sorted(local[i] for i in saved["params"] if i in local)
        expected = list(range(start, start + len(current["params"])))
        if mine != expected:
            raise ValueError(f"checkpoint entry {key!r}: param group {index} of the stage optimizer holds other "
                             "parameters than the saved group; build the optimizer's groups like the saving run's")
        start += len(current["params"])
        local_groups.append({**saved, "params": mine})
    return {**encoded,
            "state": _encode_int_dict({local[g]: v for g, v in _int_dict(encoded.get("state", {}), key).items()
                                       if g in local}),
            "param_groups": local_groups}


def merge(key: str, kind: str, parts: list[Any]) -> Any:
    """Joins the ranks' partial encoded entries (global ids) into the plain model's entry."""
    if kind == MODULE:
        merged: dict[str, Any] = {}
        for rank, part in enumerate(parts):
            clash = merged.keys() & part.keys()
            if clash:
                raise CheckpointError(f"{key!r}: ranks before {rank} and rank {rank} both hold {sorted(clash)[:5]}; "
                                      "pipeline stages must not share modules (tied weights are not supported)")
            merged.update(part)
        return merged  # rank order, each rank's keys in its own order: the plain model's order
    state: dict[int, Any] = {}
    for part in parts:
        state.update(_int_dict(part.get("state", {}), key))
    groups = [dict(g) for g in parts[0]["param_groups"]]
    for rank, part in enumerate(parts[1:], start=1):
        if len(part["param_groups"]) != len(groups):
            raise CheckpointError(f"{key!r}: rank {rank}'s optimizer has {len(part['param_groups'])} param groups, "
                                  f"rank 0's has {len(groups)}")
        for group, other in zip(groups, part["param_groups"]):
            if {k: v for k, v in group.items() if k != "params"} != {k: v for k, v in other.items() if k != "params"}:
                raise CheckpointError(f"{key!r}: rank {rank}'s optimizer hyperparameters differ from rank 0's")
            group["params"] = group["params"] + other["params"]
    for group in groups:
        group["params"] = sorted(group["params"])
    return {**parts[0], "state": _encode_int_dict(dict(sorted(state.items()))), "param_groups": groups}


def _int_dict(encoded: Any, key: str) -> dict[int, Any]:
    """An encoded int-keyed dict ({"__dict__": [[k, v], ...]}, or {} when empty) as a dict."""
    if encoded == {}:
        return {}
    if not isinstance(encoded, dict) or not isinstance(encoded.get("__dict__"), list):
        raise ValueError(f"checkpoint entry {key!r}: its optimizer state is not keyed by parameter id")
    return {k: v for k, v in encoded["__dict__"]}


def _encode_int_dict(values: dict[int, Any]) -> Any:
    return {"__dict__": [[k, v] for k, v in values.items()]} if values else {}
