"""The process group: joining a torchrun job, rank helpers, and the checkpoint-only group.

`init()` reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). Without it the process is a world of one and every helper answers for that
world, so the same script runs as `python train.py` and `torchrun --nproc-per-node N train.py`.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

_checkpoint_group: dist.ProcessGroup | None = None


def init(backend: str | None = None, timeout_seconds: float = 600.0) -> bool:
    """Joins the torchrun job described by the environment; a no-op without one.

    Args:
        backend: "gloo" or "nccl"; default NCCL when CUDA is available, else gloo.
        timeout_seconds: how long a collective may wait for a peer.

    Returns:
        True when this process is part of a distributed job (already initialised or now).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return True


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def checkpoint_group() -> dist.ProcessGroup:
    """A gloo group kept apart from training, created once by every rank together, for
    collectives a background thread runs (so they never interleave with the training loop's,
    which may use NCCL). Each pe.Checkpointer makes groups of its own (checkpoint/coordinator.py),
    so that two Checkpointers saving at once never interleave either.
    """
    global _checkpoint_group
    if _checkpoint_group is None:
        _checkpoint_group = dist.new_group(backend="gloo")
    return _checkpoint_group


def destroy() -> None:
    """Leaves the process group (a no-op in a world of one)."""
    global _checkpoint_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _checkpoint_group = None
