"""How the ranks of one save or restore agree: a world of one agrees with itself; a world of
many exchanges small Python objects on gloo groups of the Checkpointer's own, so they never
interleave with training collectives (which may use NCCL) nor with another Checkpointer's
(two Checkpointers' commit threads on one shared group would pair up the wrong collectives).

Every call is a collective: every rank makes the same calls in the same order. A save's
calls are made by the save engine's one commit thread, a restore's by the training thread
while no save is in flight, so the two never use the group at once.
"""

from __future__ import annotations

from typing import Any

from pyengine.errors import CheckpointError


class LocalCoordinator:
    """A world of one."""

    rank = 0
    world = 1

    def all_gather(self, value: Any) -> list[Any]:
        return [value]

    def broadcast(self, value: Any) -> Any:
        return value

    def agree(self, due: bool) -> bool:
        return due


class GroupCoordinator:
    """A torch.distributed world of more than one rank. Construct it on every rank together."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = dist.new_group(backend="gloo")
        # maybe_save() decisions come from the training thread while the commit thread may be
        # using `group`: they travel on a group of their own.
        self._decisions = dist.new_group(backend="gloo")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def all_gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        try:
            self._dist.all_gather_object(out, value, group=self.group)
        except RuntimeError as e:  # a peer died or hung up: gloo reports it here
            raise CheckpointError(f"rank {self.rank} lost contact with the other ranks of the checkpoint group "
                                  f"(a rank died or stopped taking part): {e}") from None
        return out

    def broadcast(self, value: Any) -> Any:
        box = [value if self.rank == 0 else None]
        try:
            self._dist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as e:
            raise CheckpointError(f"rank {self.rank} lost contact with the other ranks of the checkpoint group "
                                  f"(a rank died or stopped taking part): {e}") from None
        return box[0]

    def agree(self, due: bool) -> bool:
        """Rank 0's answer to "save now?", so that a time-based policy cannot split the ranks."""
        import torch

        flag = torch.tensor([1 if due else 0], dtype=torch.int32)
        self._dist.broadcast(flag, src=0, group=self._decisions)
        return bool(flag.item())


def coordinator_for_this_process() -> LocalCoordinator | GroupCoordinator:
    """GroupCoordinator inside an initialised world of more than one rank, else LocalCoordinator."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return GroupCoordinator()
    return LocalCoordinator()
