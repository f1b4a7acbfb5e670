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
from pyengine.benchmarks.dcp_baselines import DEFAULT, RECIPES, DcpPending, DcpRecipe, DcpSaver
from pyengine.benchmarks.dcp_baselines import close_process_group as close_process_group  # re-exported
from pyengine.benchmarks.workload import Workload
from pyengine.checkpoint.policies import OverheadBudget, PolicyFeed

# The DCP methods are dcp_baselines' recipes: as documented, and configured as its best users do.
METHODS = ("none", "torch.save", *RECIPES, "pe", "pe-overlap")
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
    """torch.distributed.checkpoint.async_save in one process, configured by one of dcp_baselines'
    recipes; one save in flight (as its recipes say), each into a fresh directory, the previous one
    deleted once the new one is durable. With async staging the copy runs during the next steps'
    forward and backward, and a step pre-hook on the workload's optimizer waits for it, as
    torchtitan waits for staging_completion before optimizer.step()."""

    def __init__(self, workload: Workload, directory: Path, recipe: DcpRecipe = DEFAULT) -> None:
        super().__init__(workload, directory)
        self.name = recipe.name
        self._dcp = DcpSaver(recipe, directory)
        self._pending: DcpPending | None = None
        self._unstaged: DcpPending | None = None  # a save whose copy optimizer.step() must wait for
        self._done_at: float | None = None
        self._dirs: list[Path] = []
        self._hook = workload.optimizer.register_step_pre_hook(self._before_step) if recipe.async_staging else None
        # DCP plans its first save, the stager allocates its cache, the PROCESS daemon starts:
        # keep that out of the measurement.
        self._dcp.warm_up(workload.model, workload.optimizer, directory / "warm-up")

    def save(self, step: int) -> float:
        t0 = time.perf_counter()
        self._wait_previous()
        target = self.directory / f"step-{step:08d}"
        self._pending = self._dcp.save(self.workload.model, self.workload.optimizer, target)
        self._unstaged = self._pending if self._pending.staged is not None else None
        self._done_at = None
        self._pending.upload.add_done_callback(self._mark_done)  # runs in DCP's thread when the save is durable
        self._dirs.append(target)
        return time.perf_counter() - t0

    def _before_step(self, *_: Any) -> None:
        if self._unstaged is not None:
            self._unstaged.wait_staged()
            self._unstaged = None

    def _wait_previous(self) -> None:
        if self._pending is None:
            return
        self._pending.wait()
        done_at = self._done_at or time.perf_counter()  # result() may return before the callback ran
        self._persists.append(done_at - self._pending.started)
        self._pending = self._unstaged = None
        while len(self._dirs) > 1:
            shutil.rmtree(self._dirs.pop(0), ignore_errors=True)

    def _mark_done(self, _: Any) -> None:
        self._done_at = time.perf_counter()

    def finish(self) -> None:
        self._wait_previous()

    def close(self) -> None:
        self.finish()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._dcp.close()


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
    if method in RECIPES:
        return DcpAsyncSave(workload, directory, RECIPES[method])
    if method in ("pe", "pe-overlap"):
        return PeSave(workload, directory, overlap=method == "pe-overlap")
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
