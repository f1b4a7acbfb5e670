"""The one save path, for a world of one and of many: plan -> stage -> write parts -> agree ->
commit -> prune.

    save()   (training thread)  plan this rank's share (plan.py); copy CUDA tensors into pinned
                                host buffers on a side stream; the C++ writer stages the bytes
                                (overlap=True: parameters and optimizer state in the background,
                                during the next forward/backward) and writes the part; returns.
    commit   (one thread per    waits until this rank's part is durable; the ranks exchange
             engine, in order)  their results (coordinator.py); rank 0 commits only if every
                                part is durable (storage.py), then tells every rank the outcome;
                                rank 0 prunes beyond keep_last (a failure there is a warning:
                                the new step is committed all the same).

Saves commit in the order they were made, so with max_in_flight > 1 the parts of later saves
are written while an earlier one commits, and prunes never run two at a time. Every rank
makes the same saves, so every rank runs the same collectives in the same order and learns
the same outcome: a failure on one rank is raised by wait() on every rank.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pyengine import _core
from pyengine.checkpoint.cuda_staging import PinnedMirror
from pyengine.checkpoint.plan import SavePlan, plan_save
from pyengine.checkpoint.sharded import build_manifest
from pyengine.checkpoint.state_codec import NamedTensor, writer_source
from pyengine.checkpoint.storage import FileSystemStorage
from pyengine.errors import CheckpointError

if TYPE_CHECKING:
    from pyengine.checkpoint.object_storage import ObjectPath, ObjectStorage

_POLL_SECONDS = 0.1  # waits wake this often, so Ctrl-C is seen at once


class CheckpointPruneWarning(UserWarning):
    """A checkpoint was committed, but removing older ones (keep_last) failed."""


class SaveHandle:
    """One save in flight. `wait()` returns once it is committed and durable on every rank
    (or raises its error, the same on every rank)."""

    def __init__(self, step: int, path: Path | ObjectPath, started: float) -> None:
        self.step = step
        self.path = path
        self.stall_seconds = 0.0
        self._started = started
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._reported = False
        self._prune_error: str | None = None
        self._writer: Any = None  # set while some of the copy runs in the background
        self._save_id = 0
        self._bytes = 0
        self._snapshot_seconds: float | None = None
        self._persist_seconds: float | None = None

    @property
    def overlapped(self) -> bool:
        """Some tensors may still be being copied: the saved objects must not change yet."""
        return self._writer is not None

    def wait_snapshot(self) -> None:
        """Blocks until every byte is staged; the saved objects may change after this."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.wait_snapshot(self._save_id)

    def wait(self) -> None:
        """Blocks until the checkpoint is committed and durable; raises if the save failed."""
        self._join()
        self._report()

    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def stats(self) -> dict[str, Any]:
        """bytes, stall_seconds (the caller blocked), snapshot_seconds, persist_seconds (save() until the
        step was committed and durable on every rank; pruning older steps comes after)."""
        done = self.done()
        return {"step": self.step, "bytes": self._bytes, "stall_seconds": self.stall_seconds,
                "snapshot_seconds": self._snapshot_seconds, "persist_seconds": self._persist_seconds,
                "snapshot_done": done or self._writer is None, "done": done,
                "failed": done and self._error is not None, "path": str(self.path), "prune_error": self._prune_error}

    def _join(self) -> None:
        while not self._finished.wait(_POLL_SECONDS):
            pass

    def _report(self) -> None:
        if self._prune_error is not None:
            message, self._prune_error = self._prune_error, None
            warnings.warn(message, CheckpointPruneWarning, stacklevel=3)
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def _finish(self, error: BaseException | None, prune_error: str | None, decided: float) -> None:
        self._error = error
        self._prune_error = prune_error
        self._persist_seconds = decided - self._started  # to the commit (or the failure), not the prune
        self._writer = None
        self._finished.set()


class _Job:
    """What the commit thread needs of one save."""

    def __init__(self, handle: SaveHandle, tmp: Path, part: Path, save_id: int | None,
                 failure: BaseException | None, plan: SavePlan | None) -> None:
        self.handle, self.tmp, self.part, self.save_id, self.failure = handle, tmp, part, save_id, failure
        self.pieces = plan.pieces if plan is not None else []
        self.shared = plan.shared if plan is not None else None


class SaveEngine:
    """Saves of one Checkpointer on one rank. The training thread calls save(), reserve(),
    wait() and close(); one commit thread finishes the saves in order."""

    def __init__(self, storage: FileSystemStorage | ObjectStorage, coordinator: Any, *, keep_last: int,
                 max_in_flight: int, writer_options: Mapping[str, Any]) -> None:
        self.storage = storage
        self.coordinator = coordinator
        self.keep_last = keep_last
        self.max_in_flight = max_in_flight
        self._writer_options = dict(writer_options)
        self._writer: Any = None
        self._mirror: PinnedMirror | None = None
        # Temp names must be the same on every rank, and the commit thread may be using the
        # group, so rank 0's token is agreed once, here (a collective), and numbered locally.
        self._token = coordinator.broadcast(uuid.uuid4().hex[:12])
        self._sequence = 0
        self._unjoined: collections.deque[SaveHandle] = collections.deque()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------- saving

    def save(self, step: int, state: Mapping[str, Any], *, capture_rng: bool, overlap: bool) -> SaveHandle:
        started = time.perf_counter()
        self._make_room()
        self._sequence += 1
        tmp = self.storage.temp_dir(step, f"{self._token}-{self._sequence}")
        part = self.storage.part_dir(tmp, self.coordinator.rank, self.coordinator.world, step)
        handle = SaveHandle(step, self.storage.step_path(step), started)
        plan: SavePlan | None = None
        save_id: int | None = None
        try:
            plan = plan_save(state, self.coordinator.rank, self.coordinator.world, capture_rng)
            sources, sync_count = self._sources(plan.tensors, overlap)
            self.storage.begin_part(part)
            save_id = self.storage.write_part(self.writer(), step, sources, plan.part_state_json, sync_count, part)
            del sources  # the writer holds them until their copy is done
            if sync_count < len(plan.tensors):
                handle._writer, handle._save_id = self._writer, save_id
        except Exception as e:
            if self.coordinator.world == 1:  # nothing started: the caller learns at once
                self.storage.abort(tmp)
                raise
            # The other ranks are about to wait for this rank's part: they learn of the failure
            # from the commit thread's exchange, and every rank raises it from wait().
            self._enqueue(_Job(handle, tmp, part, None, e, None))
        except BaseException as e:  # KeyboardInterrupt: the save is committed or not, never torn
            if save_id is not None:
                self._enqueue(_Job(handle, tmp, part, save_id, None, plan))
            elif self.coordinator.world > 1:
                self._enqueue(_Job(handle, tmp, part, None, e, None))
            else:
                self.storage.abort(tmp)
            raise
        else:
            self._enqueue(_Job(handle, tmp, part, save_id, None, plan))
        handle.stall_seconds = time.perf_counter() - started
        return handle

    def reserve(self, state: Mapping[str, Any]) -> int:
        """Allocates the staging memory this rank's part of a save of `state` needs (no collective,
        nothing copied; device tensors are sized, not copied)."""
        plan = plan_save(state, self.coordinator.rank, self.coordinator.world, capture_rng=True)
        sizes = []
        for item in plan.tensors:
            t = item.tensor.detach()
            if t.device.type != "cpu":
                t = torch.empty(t.shape, dtype=t.dtype)
            sizes.append(writer_source(item.name, t)[0])
        return int(self.writer().reserve(sizes))

    @property
    def staging_bytes(self) -> int:
        return int(self._writer.staging_bytes) if self._writer is not None else 0

    def pending_steps(self) -> list[int]:
        return [h.step for h in self._unjoined if not h.done()]

    def wait(self) -> None:
        """Blocks until every save is finished; raises the first error not yet raised."""
        first: BaseException | None = None
        while self._unjoined:
            handle = self._unjoined[0]
            handle._join()  # may raise KeyboardInterrupt: the handle stays queued
            self._unjoined.popleft()
            try:
                handle._report()
            except Exception as e:  # noqa: BLE001 - raised below, after every save finished
                first = first or e
        if first is not None:
            raise first

    def close(self) -> None:
        """Waits for every save, then stops the commit thread (also when a save failed)."""
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None
            self._writer = None

    def writer(self) -> Any:
        if self._writer is None:
            self._writer = _core.AsyncCheckpointWriter(max_in_flight=self.max_in_flight, **self._writer_options)
        return self._writer

    def _make_room(self) -> None:
        # The oldest saves are joined in the order they were made (not by which is done first),
        # so every rank raises a failed save's error from the same call.
        while len(self._unjoined) >= self.max_in_flight:
            self._unjoined[0]._join()
            self._unjoined.popleft()._report()

    def _enqueue(self, job: _Job) -> None:
        self._unjoined.append(job.handle)
        if self._thread is None:
            self._thread = threading.Thread(target=self._commit_loop, name="pyengine-ckpt-commit", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _sources(self, tensors: list[NamedTensor], overlap: bool) -> tuple[list, int]:
        """The writer's sources, those to copy now first, and how many to copy now. With overlap,
        stable tensors (parameters, optimizer state) and private copies are copied later."""
        on_device = [(t.name, t.tensor.detach()) for t in tensors if t.tensor.device.type == "cuda"]
        if on_device and self._mirror is None:
            self._mirror = PinnedMirror()
        host = self._mirror.to_host(on_device) if on_device else {}  # pinned, on a side stream
        now, later = [], []
        for item in tensors:
            t = host.get(item.name, item.tensor).detach()
            if t.device.type != "cpu" or t.layout != torch.strided:
                raise ValueError(f"cannot checkpoint tensor {item.name!r} on {t.device} with layout {t.layout}")
            source, private = writer_source(item.name, t)
            stable = item.stable or private or item.name in host  # a pinned mirror is a private copy
            (later if overlap and stable else now).append(source)
        return now + later, len(now)

    # ----------------------------------------------------------------------------- committing

    def _commit_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._commit(job)

    def _commit(self, job: _Job) -> None:
        rank, world = self.coordinator.rank, self.coordinator.world
        error: BaseException | None = job.failure
        prune_error = None
        decided = None
        outcome: list[str] | None = None
        try:
            if job.save_id is not None:
                try:
                    self.storage.finish_part(self._writer, job.save_id, job.part, job.tmp)
                except Exception as e:  # noqa: BLE001 - exchanged below
                    error = e
                stats = self._writer.stats(job.save_id)
                job.handle._bytes, job.handle._snapshot_seconds = stats["bytes"], stats["snapshot_seconds"]
            mine = None if error is None else f"{type(error).__name__}: {error}"
            gathered = self.coordinator.all_gather((mine, job.pieces, job.shared))
            failures = [f"rank {r}: {g[0]}" for r, g in enumerate(gathered) if g[0] is not None]
            if rank == 0:
                if not failures:
                    try:
                        top = None
                        if world > 1:
                            top = build_manifest(job.handle.step, job.handle.path.name, gathered)
                        self.storage.commit(job.tmp, job.handle.step, top)
                    except Exception as e:  # noqa: BLE001 - broadcast to every rank
                        error = error or e
                        failures.append(f"rank 0 commit: {type(e).__name__}: {e}")
                if failures:
                    self.storage.abort(job.tmp)
                outcome = failures
            outcome = self.coordinator.broadcast(outcome)
            decided = time.perf_counter()
            if outcome:
                error = _failure(job.handle.step, world, outcome, error)
            else:
                if rank == 0 and self.keep_last > 0:
                    try:
                        self.storage.prune(self.keep_last)
                    except Exception as e:  # noqa: BLE001 - the new step is committed all the same
                        prune_error = (f"checkpoint step {job.handle.step} is committed, but removing checkpoints "
                                       f"beyond keep_last={self.keep_last} failed: {type(e).__name__}: {e}. They "
                                       "stay on disk; the next save tries again.")
                # Every rank's wait() returns only once rank 0 has pruned, so that every rank then
                # lists the same steps; and every rank warns alike.
                prune_error = self.coordinator.broadcast(prune_error)
        except Exception as e:  # noqa: BLE001 - the thread must finish every job
            if decided is not None and not outcome:  # only the exchange after the commit failed
                error = CheckpointError(f"checkpoint step {job.handle.step} was committed, but the ranks lost "
                                        f"contact afterwards: {e}")
            else:
                if rank == 0:
                    self.storage.abort(job.tmp)
                error = e if isinstance(e, CheckpointError) else CheckpointError(
                    f"save of step {job.handle.step} failed, nothing was committed: {type(e).__name__}: {e}")
        job.handle._finish(error, prune_error, decided or time.perf_counter())


def _failure(step: int, world: int, failures: list[str], local: BaseException | None) -> BaseException:
    """The error every rank raises for a save that was not committed. A world of one raises the
    original exception (an OSError names its file); many ranks raise one CheckpointError."""
    if world == 1 and local is not None:
        return local
    return CheckpointError(f"save of step {step} failed on {'a rank' if world > 1 else 'this process'}, nothing "
                           "was committed; older checkpoints are intact:\n  " + "\n  ".join(failures))
