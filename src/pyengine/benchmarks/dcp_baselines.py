"""torch.distributed.checkpoint (DCP) `async_save` in one process, as documented and as its best
users configure it: the baselines of the checkpoint benchmark and the frequency study.

    dcp.async_save      as documented: async_save(sd, checkpoint_id=dir). DCP builds a fresh
                        DefaultStager per call and closes it after the upload, so every save
                        allocates (and page-faults) new CPU memory while it copies.
    dcp.cached          a DefaultStager kept for the whole run: its StateDictStager caches one CPU
                        storage per source storage, so after the first save the blocking part is
                        one copy into already-touched buffers (synchronous staging).
    dcp.async-thread    the same kept stager with use_async_staging=True: async_save returns after
                        get_state_dict, the copy runs in the stager's thread, and training must
                        wait for it (staging_completion) before optimizer.step(), as torchtitan
                        does; the upload runs in a thread of this process.
    dcp.async-process   torchtitan's async_with_pinned_mem recipe: the kept stager in shared
                        memory, async staging, AsyncCheckpointerType.PROCESS (a daemon process
                        plans, serialises and writes, away from the trainer's GIL).

The configured ones use FileSystemWriter(thread_count=writer_threads, sync_files=True,
overwrite=False) and DefaultSavePlanner(enable_plan_caching=True). Pinned memory and
non-blocking copies are on only with CUDA: without it DCP ignores the first with a warning and
refuses the second. Every save calls get_state_dict(model, optimizer), as a DCP user must.

Durability: DCP fsyncs every file it writes and writes `.metadata` last (tmp, fsync, rename),
but never fsyncs the directory, so a power cut can still lose a "completed" save.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class DcpRecipe:
    """One way to call async_save: `reuse_stager` keeps a DefaultStager for the run,
    `async_staging` copies in the stager's thread, `process` writes in DCP's daemon process."""

    name: str
    label: str
    reuse_stager: bool
    async_staging: bool = False
    process: bool = False


DEFAULT = DcpRecipe("dcp.async_save", "DCP async_save, default", reuse_stager=False)
CACHED = DcpRecipe("dcp.cached", "DCP, reused stager, sync staging", reuse_stager=True)
ASYNC_THREAD = DcpRecipe("dcp.async-thread", "DCP, reused stager, async staging, THREAD", True, True)
ASYNC_PROCESS = DcpRecipe("dcp.async-process", "DCP, reused stager, async staging, PROCESS", True, True, True)
RECIPES: dict[str, DcpRecipe] = {r.name: r for r in (DEFAULT, CACHED, ASYNC_THREAD, ASYNC_PROCESS)}
CONFIGURED = (CACHED, ASYNC_THREAD, ASYNC_PROCESS)


def init_process_group(directory: Path) -> None:
    """Starts a gloo group of one (a file:// rendezvous in `directory`) unless one exists:
    DCP's collectives need a group, and its PROCESS executor broadcasts its daemon's address."""
    import torch.distributed as dist

    if not dist.is_initialized():
        directory.mkdir(parents=True, exist_ok=True)
        dist.init_process_group("gloo", init_method=f"file://{directory.resolve()}/pg", rank=0, world_size=1)


def close_process_group() -> None:
    """Destroys the default process group, if there is one (the PROCESS daemon keeps its own)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class DcpPending:
    """One save in flight. Times are time.perf_counter() readings; `staged` is None when the
    copy was done before async_save returned (synchronous staging)."""

    path: Path
    started: float
    returned: float
    staged: Future | None
    upload: Future

    @property
    def stall_seconds(self) -> float:
        """The caller's blocked time: get_state_dict plus async_save until it returned."""
        return self.returned - self.started

    def wait_staged(self) -> None:
        """Blocks until the copy is done: what optimizer.step() must wait for."""
        if self.staged is not None:
            self.staged.result()

    def wait(self) -> None:
        """Blocks until the files are written and fsynced and `.metadata` is renamed into place;
        re-raises the save's error."""
        self.wait_staged()
        self.upload.result()


class DcpSaver:
    """async_save with one recipe, its stager (if any) kept across saves.

    Called from the training thread only. It does not bound saves in flight: the caller waits for
    one (`DcpPending.wait`) before starting the next, as DCP's recipes do, since a kept stager
    copies into the same buffers every time. `close()` closes the stager. The PROCESS recipe's
    daemon is DCP's, kept in a module global for the life of the interpreter (DCP offers no
    public way to stop it); it serves every PROCESS saver of this process.
    """

    def __init__(self, recipe: DcpRecipe, workdir: Path, writer_threads: int = 1) -> None:
        if writer_threads < 1:
            raise ValueError(f"writer_threads must be >= 1, got {writer_threads}")
        if recipe.process:
            # The daemon's own gloo group rendezvouses at MASTER_ADDR; a group of one needs only
            # the loopback address (DCP's fallback, the host's FQDN, may not resolve in a container).
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        init_process_group(workdir)
        self.recipe = recipe
        self.writer_threads = writer_threads
        self.daemon_log = workdir / "dcp-daemon.log"
        self._stager: Any = None
        if recipe.reuse_stager:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=recipe.process,
                                                        use_async_staging=recipe.async_staging,
                                                        use_non_blocking_copy=cuda))

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> DcpPending:
        """Starts a save of model and optimizer into the new directory `path`."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

        started = time.perf_counter()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state_dict = {"model": model_sd, "optim": optim_sd}
        if self._stager is None:
            response = dcp.async_save(state_dict, checkpoint_id=str(path))
        else:
            response = dcp.async_save(state_dict, **self._configured_arguments(path))
        returned = time.perf_counter()
        if isinstance(response, AsyncSaveResponse):  # async staging: the copy may still be running
            return DcpPending(path, started, returned, response.staging_completion, response.upload_completion)
        return DcpPending(path, started, returned, None, response)

    def _configured_arguments(self, path: Path) -> dict[str, Any]:
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        return {"storage_writer": FileSystemWriter(str(path), thread_count=self.writer_threads, sync_files=True,
                                                   overwrite=False),
                "planner": DefaultSavePlanner(enable_plan_caching=True),
                "async_stager": self._stager,
                "async_checkpointer_type": (AsyncCheckpointerType.PROCESS if self.recipe.process
                                            else AsyncCheckpointerType.THREAD)}

    def warm_up(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
        """One save, waited for and deleted, to keep one-time costs out of the measurements: DCP's
        first planning, the stager's allocation of its cache, the PROCESS daemon's start. The
        daemon logs every request at INFO level to the stderr it inherits, so it starts with
        stderr pointed at `daemon_log` (this process's stderr goes there too meanwhile)."""
        with _stderr_to(self.daemon_log) if self.recipe.process else contextlib.nullcontext():
            self.save(model, optimizer, path).wait()
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None


@contextlib.contextmanager
def _stderr_to(log: Path) -> Iterator[None]:
    """Points file descriptor 2 at `log` (a process spawned meanwhile inherits it), then restores it."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
