"""Which loaders a distribution strategy accepts, checked when a Trainer is built.

Data parallel strategies (DDP, FSDP, local SGD) train each rank on its own slice of the data;
model parallel ones (tensor, pipeline: `splits_data = False`) need the same batches on every
rank. A loader built for the wrong case, or built differently on one rank, would otherwise
train without a sign of the mistake.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from pyengine import distributed


def check_loaders(strategy: Any, train_loader: Iterable, val_loader: Iterable | None) -> None:
    """Raises ValueError (on every rank alike) for loaders `strategy` cannot train on correctly.
    A collective on the default group in a world of several ranks: every rank calls it."""
    _check_local(strategy, train_loader, val_loader)
    _check_agree(strategy, train_loader, val_loader)


def _check_local(strategy: Any, train_loader: Iterable, val_loader: Iterable | None) -> None:
    """This rank's loaders alone: data parallel strategies need this rank's slice of the data;
    model parallel ones (which say so with `splits_data = False`) the whole of it."""
    world = distributed.world_size()
    if getattr(strategy, "splits_data", True):
        if getattr(train_loader, "world_size", world) != world:
            raise ValueError(f"train_loader is built for world_size={train_loader.world_size} but "  # type: ignore[attr-defined]
                             f"this job has {world} ranks: pe.data.Loader(..., rank=pe.distributed.rank(), "
                             "world_size=pe.distributed.world_size())")
        return
    for what, loader in (("train_loader", train_loader), ("val_loader", val_loader)):
        shards = getattr(loader, "world_size", 1)
        if shards != 1:
            raise ValueError(f"strategy {strategy.name!r} splits the model, not the data: every rank must see the same "
                             f"batches, but {what} is rank-sharded (rank={getattr(loader, 'rank', '?')}, "
                             f"world_size={shards}); build it alike on every rank, without rank= and world_size= "
                             "and with the same seed: pe.data.Loader(ds, batch_size, seed=0)")


def _check_agree(strategy: Any, train_loader: Iterable, val_loader: Iterable | None) -> None:
    """Every rank must build its pe.data.Loader alike (the same seed, order, batch size and data),
    differing only in `rank` under data parallelism: a rank with another seed would silently
    train on other batches (model parallelism) or on samples another rank also takes (data
    parallelism). A collective on the default group; every rank raises the same ValueError."""
    if distributed.world_size() < 2:
        return
    splits = getattr(strategy, "splits_data", True)
    mine = [_loader_signature(loader, splits) for loader in (train_loader, val_loader)]
    mine.append(getattr(train_loader, "rank", None))
    everyone: list[Any] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(everyone, mine)
    for what, index in (("train_loader", 0), ("val_loader", 1)):
        signatures = [s[index] for s in everyone]
        if any(sig != signatures[0] for sig in signatures):
            rows = "; ".join(f"rank {r}: {sig}" for r, sig in enumerate(signatures))
            raise ValueError(f"the ranks built {what} differently ({rows}); every rank must build it alike"
                             + (", differing only in rank=" if splits else "")
                             + ", with the same seed, so that the ranks train on the batches the strategy expects")
    data_ranks = [s[2] for s in everyone]
    if splits and everyone[0][0] is not None and sorted(data_ranks) != list(range(len(data_ranks))):
        raise ValueError(f"train_loader's rank= on ranks 0..{len(data_ranks) - 1} is {data_ranks}: each rank must "
                         "take its own slice, pe.data.Loader(..., rank=pe.distributed.rank(), "
                         "world_size=pe.distributed.world_size())")


def _loader_signature(loader: Iterable | None, splits_data: bool) -> dict | None:
    """What must be equal across ranks for a pe.data.Loader (None for other loaders: not checked)."""
    if loader is None or not all(hasattr(loader, a) for a in ("seed", "order", "batch_size", "world_size")):
        return None
    shuffled = loader.order != "sequential"  # type: ignore[attr-defined]
    signature = {"seed": loader.seed if shuffled else None, "order": loader.order,  # type: ignore[attr-defined]
                 "batch_size": loader.batch_size,  # type: ignore[attr-defined]
                 "drop_last": getattr(loader, "drop_last", None), "world_size": loader.world_size}  # type: ignore[attr-defined]
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        signature["examples"] = len(dataset)
    if not splits_data:
        signature["rank"] = getattr(loader, "rank", 0)
    return signature
