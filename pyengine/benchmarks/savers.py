"""The ways to checkpoint that the frequency study compares, behind one interface.

Each saver is driven by the training loop: `save(step)` blocks for the save's stall and
returns it; `finish()` returns once every save is durable (a run is not finished before its
last checkpoint is); `take_persists()` returns the times from save() to durable since the last
call. One saver writes one directory; every save's step is larger than the one before.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import pyengine as pe
from pyengine.benchmarks.workload import Workload
from pyengine.checkpoint.policies import OverheadBudget, PolicyFeed

METHODS = ("none", "torch.save", "dcp.async_save", "pe", "pe-overlap")
CONTROL = "none"  # the A/A control: blocks "with checkpoints" that save nothing


class Saver:
    name = ""

    def __init__(self, workload: Workload, directory: Path) -> None:
        self.workload = workload
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._persists: list[float] = []

    def save(self, step: int) -> float:
        raise NotImplementedError

    def finish(self) -> None:
        """Blocks until every save is durable."""

    def take_persists(self) -> list[float]:
        out, self._persists = self._persists, []
        return out

    def close(self) -> None:
        self.finish()


class NoSave(Saver):
    """Saves nothing: the A/A control, whose measured "overhead" is the noise of the measurement."""

    name = CONTROL

    def save(self, step: int) -> float:
        return 0.0


class TorchSave(Saver):
    """torch.save of both state dicts to a temporary file, fsync, rename: the careful plain-PyTorch way."""

    name = "torch.save"

    def save(self, step: int) -> float:
        t0 = time.perf_counter()
        tmp, final = self.directory / "checkpoint.pt.tmp", self.directory / "checkpoint.pt"
        torch.save({"step": step, "model": self.workload.model.state_dict(),
                    "optimizer": self.workload.optimizer.state_dict()}, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        stall = time.perf_counter() - t0
        self._persists.append(stall)
        return stall


class DcpAsyncSave(Saver):
    """torch.distributed.checkpoint.async_save in one process, one save in flight (as its recipe says),
    each into a fresh directory, the previous one deleted once the new one is durable."""

    name = "dcp.async_save"

    def __init__(self, workload: Workload, directory: Path) -> None:
        super().__init__(workload, directory)
        import torch.distributed as dist

        if not dist.is_initialized():  # a gloo group of one; DCP's collectives need a group
            dist.init_process_group("gloo", init_method=f"file://{directory}/pg", rank=0, world_size=1)
        self._future: Any = None
        self._started: float = 0.0
        self._done_at: float | None = None
        self._dirs: list[Path] = []
        self.save(0)  # DCP plans its first save; keep that out of the measurement
        self.finish()
        self.take_persists()

    def save(self, step: int) -> float:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        t0 = time.perf_counter()
        self._wait_previous()
        model_sd, optim_sd = get_state_dict(self.workload.model, self.workload.optimizer)
        target = self.directory / f"step-{step:08d}"
        response = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(target))
        self._future = getattr(response, "upload_completion", response)  # newer stagers return a pair
        self._started, self._done_at = t0, None
        self._future.add_done_callback(self._mark_done)  # runs in DCP's thread when the save is durable
        self._dirs.append(target)
        return time.perf_counter() - t0

    def _wait_previous(self) -> None:
        if self._future is None:
            return
        self._future.result()
        done_at = self._done_at or time.perf_counter()  # result() may return before the callback ran
        self._persists.append(done_at - self._started)
        self._future = None
        while len(self._dirs) > 1:
            shutil.rmtree(self._dirs.pop(0), ignore_errors=True)

    def _mark_done(self, _: Any) -> None:
        self._done_at = time.perf_counter()

    def finish(self) -> None:
        self._wait_previous()


class PeSave(Saver):
    """pe.Checkpointer, keep_last=2; with overlap=True parameters and optimizer state are copied
    during the next forward/backward."""

    def __init__(self, workload: Workload, directory: Path, overlap: bool = False) -> None:
        super().__init__(workload, directory)
        self.name = "pe-overlap" if overlap else "pe"
        self.overlap = overlap
        self.checkpointer = pe.Checkpointer(directory, keep_last=2)
        self._handles: list[Any] = []
        self.checkpointer.save(0, workload.state()).wait()  # allocates staging memory once, unmeasured

    def save(self, step: int) -> float:
        handle = self.checkpointer.save(step, self.workload.state(), overlap=self.overlap)
        self._handles.append(handle)
        return handle.stall_seconds

    def finish(self) -> None:
        self.checkpointer.wait()
        self._persists += [float(h.stats["persist_seconds"]) for h in self._handles]
        self._handles = []

    def close(self) -> None:
        self.finish()
        self.checkpointer.close()


class PeBudgetSave(PeSave):
    """pe.Checkpointer with the overlapped snapshot, driven by OverheadBudget(fraction) through a
    PolicyFeed exactly as Checkpointer.maybe_save(step, state, overlap=True) drives it; the feed
    is paused while the baseline steps run."""

    def __init__(self, workload: Workload, directory: Path, fraction: float) -> None:
        super().__init__(workload, directory, overlap=True)
        self.name = f"pe-overlap+OverheadBudget({fraction:g})"
        self.policy = OverheadBudget(fraction)
        self.feed = PolicyFeed(self.policy)

    def save_now(self, step: int) -> float:
        """Saves after `feed.due(step)` said so, and tells the feed, as maybe_save does."""
        handle = self.checkpointer.save(step, self.workload.state(), overlap=True)
        self.feed.saved(step, handle)
        self._handles.append(handle)
        return handle.stall_seconds

    def finish(self) -> None:
        super().finish()
        self.feed.pause()


def make_saver(method: str, workload: Workload, directory: Path) -> Saver:
    if method == "none":
        return NoSave(workload, directory)
    if method == "torch.save":
        return TorchSave(workload, directory)
    if method == "dcp.async_save":
        return DcpAsyncSave(workload, directory)
    if method in ("pe", "pe-overlap"):
        return PeSave(workload, directory, overlap=method == "pe-overlap")
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
