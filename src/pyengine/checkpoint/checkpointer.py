"""pe.Checkpointer: asynchronous, sharded, atomic, verified checkpoints of full training state."""

from __future__ import annotations

import errno
import numbers
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyengine.checkpoint import directory as ckdir
from pyengine.checkpoint import exit_saves
from pyengine.checkpoint.coordinator import coordinator_for_this_process
from pyengine.checkpoint.object_storage import ObjectStorage, is_object_url
from pyengine.checkpoint.overlap import OverlapGuard
from pyengine.checkpoint.policies import PolicyFeed, SavePolicy
from pyengine.checkpoint.restorer import CheckpointFallbackWarning, load_agreed
from pyengine.checkpoint.rng import restore_rng_state
from pyengine.checkpoint.save_engine import CheckpointPruneWarning, SaveEngine, SaveHandle
from pyengine.checkpoint.stateful import load_object
from pyengine.checkpoint.storage import FileSystemStorage
from pyengine.checkpoint.writer_lease import WriterLease
from pyengine.errors import CheckpointError

__all__ = ["CheckpointFallbackWarning", "CheckpointPruneWarning", "Checkpointer", "SaveHandle"]


class Checkpointer:
    """Saves and restores full training state in `directory`.

    Concurrency: one thread (the training loop) calls every method. Saves run in C++
    threads; at most `max_in_flight` are unfinished, and a further save() waits. A
    background error is raised by the next save() or wait(). One Checkpointer (one
    process) writes a directory at a time; others may read it.

    Args:
        directory: where step-N/ checkpoint directories live; created if missing. Or an
            object-store URL, "s3://bucket/prefix" (see object_storage.py; needs
            `pip install "pyengine[s3]"`).
        keep_last: committed checkpoints to keep (older ones are pruned after each new
            commit); 0 keeps all.
        policy: when maybe_save() saves (a pyengine.checkpoint.SavePolicy, e.g.
            Every(steps=100) or OverheadBudget(0.01)); None: maybe_save() is unavailable.
        max_shards: shard files per checkpoint, written in parallel.
        copy_threads: threads that copy tensors into staging memory.
        max_in_flight: saves that may be unfinished at once.
        staging_cap_bytes: cap on staging memory (0: none). A save larger than the cap fails.
        capture_rng: store the torch, CUDA, numpy and Python RNG states with every save and
            restore them with restore().
        background_nice: added to the nice value (0-19) of the threads that copy (overlap=True),
            checksum and write in the background. When training keeps every core busy (CPU
            training), they then run in the gaps rather than preempting a training thread; they
            still finish, at the latest while the next save() waits for them (max_in_flight).
            0 keeps the training process's priority.
        storage_options: for an s3:// URL only: endpoint_url, region_name, credentials, transfer
            sizes, retries, lease and spool settings (pyengine.checkpoint.object_store.S3Options).
            Credentials left out come from the environment or the AWS config, as for boto3.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, *, policy: SavePolicy | None = None,
                 max_shards: int = 4, copy_threads: int = 2,
                 read_threads: int = 4, max_in_flight: int = 1, staging_cap_bytes: int = 0,
                 capture_rng: bool = True, background_nice: int = 10,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        for name, value, low in (("keep_last", keep_last, 0), ("max_shards", max_shards, 1),
                                 ("copy_threads", copy_threads, 1), ("read_threads", read_threads, 1),
                                 ("max_in_flight", max_in_flight, 1), ("staging_cap_bytes", staging_cap_bytes, 0),
                                 ("background_nice", background_nice, 0)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if background_nice > 19:
            raise ValueError(f"background_nice must be in 0..19 (a nice increment), got {background_nice}")
        self.policy = policy
        self._policy_feed = PolicyFeed(policy) if policy is not None else None  # refuses a bad policy first
        self.directory: str | Path
        self._storage: FileSystemStorage | ObjectStorage
        self._lock: ckdir.WriterLock | WriterLease
        if is_object_url(directory):
            self._storage = ObjectStorage(str(directory), storage_options)
            self.directory = self._storage.root
            self._lock = self._storage.writer_lease()
        else:
            if storage_options is not None:
                raise ValueError("storage_options applies to object-store URLs (s3://bucket/prefix); a local "
                                 f"directory ({directory}) takes none")
            self.directory = Path(directory)
            if self.directory.exists() and not self.directory.is_dir():
                raise NotADirectoryError(f"checkpoint directory {self.directory} exists and is not a directory")
            self._storage = FileSystemStorage(self.directory)
            self._lock = ckdir.WriterLock(self.directory)
        self.keep_last = int(keep_last)
        self.capture_rng = capture_rng
        self._read_threads = read_threads
        self._coordinator = coordinator_for_this_process()  # a collective in a world of many ranks
        # Only rank 0 (the only rank in a world of one) owns DIR: it holds the lock, cleans up
        # and commits. Whether it may write is agreed, so every rank refuses saves alike.
        refusal = self._take_directory() if self._coordinator.rank == 0 else None
        self._refusal: str | None = self._coordinator.broadcast(refusal)
        self._engine = SaveEngine(self._storage, self._coordinator, keep_last=self.keep_last,
                                  max_in_flight=max_in_flight,
                                  writer_options=dict(max_shards=max_shards, copy_threads=copy_threads,
                                                      staging_cap_bytes=staging_cap_bytes,
                                                      background_nice=background_nice))
        self._guard = OverlapGuard()
        self._newest_step: int | None = None  # no save may take a step <= this one (see _check_step)
        self._closed = False
        exit_saves.finish_at_exit(self, "close", "checkpoint")

    def _take_directory(self) -> str | None:
        """Creates DIR, takes its writer lock and removes torn saves; returns why this process
        may not write DIR (it may still read it), or None."""
        try:
            self._storage.create()
            if isinstance(self.directory, Path) and not os.access(self.directory, os.W_OK | os.X_OK):
                return f"{self.directory} is read-only for this process"
            if not self._lock.try_acquire():
                return _LOCKED
            self._storage.remove_torn()
        except PermissionError as e:
            return f"{self.directory} cannot be written by this process ({e.strerror})"
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES):
                return f"{self.directory} is on a read-only file system ({e.strerror})"
            raise
        return None

    # ----------------------------------------------------------------------------- saving

    def save(self, step: int, state: Mapping[str, Any], *, overlap: bool = False,
             rng: bool | None = None) -> SaveHandle:
        """Snapshots `state` and writes it in the background; returns once the snapshot is taken.

        With overlap=True, parameters and optimizer state are copied during the next
        forward/backward instead; the next optimizer step waits for that copy. Module
        buffers (e.g. BatchNorm statistics) and everything else are copied before return.
        In a world of several ranks every rank calls save() for the same steps; each writes
        its share, and an error on any rank is raised by wait() on every rank.

        Raises:
            ValueError / TypeError: bad step or state (nothing is written).
            CheckpointError / OSError: an earlier save failed in the background, or this
                process may not write the directory (read-only, or another writer holds it).
        """
        self._check_open()
        self._check_writable()
        step = self._check_step(step)
        _check_state(state)
        self._guard.drain()  # no earlier snapshot may still read the buffers refilled below
        handle = self._engine.save(step, state, capture_rng=self.capture_rng if rng is None else rng,
                                   overlap=overlap)
        if handle.overlapped:
            self._guard.add(handle.wait_snapshot)
        return handle

    def reserve(self, state: Mapping[str, Any]) -> int:
        """Allocates the staging memory a save of `state` needs now, so that the first save()
        does not stall for it (a few hundred MB cost more in page faults than in copying).

        Call it once the state has its full size: after the first optimizer step, which
        creates Adam's moments. Nothing is written; it blocks while the memory is allocated
        and touched (and, with staging_cap_bytes, until enough is free). One save's worth is
        reserved, also with max_in_flight > 1. In a distributed world each rank reserves what
        its own part needs (no collective). Returns the staging bytes held.
        """
        self._check_open()
        self._guard.drain()  # encoding refills CUDA mirrors that an overlapped save may still read
        _check_state(state)
        return self._engine.reserve(state)

    @property
    def staging_bytes(self) -> int:
        """Host memory held for snapshots (allocated by the first save or by reserve(), then reused)."""
        return self._engine.staging_bytes

    def maybe_save(self, step: int, state: Mapping[str, Any], **save_kwargs: Any) -> SaveHandle | None:
        """Saves `state` when the policy says so; call it once per training step.

        The policy is fed the time between calls (the training step), each save's stall and,
        once it finishes, its persist time. In a world of several ranks rank 0's policy decides.

        Returns:
            The save's handle, or None when the policy skipped this step.

        Raises:
            ValueError: the Checkpointer has no policy, or a bad step; and whatever save() raises.
        """
        if self._policy_feed is None:
            raise ValueError("maybe_save() needs a policy, e.g. "
                             "Checkpointer(directory, policy=pe.checkpoint.Every(steps=100))")
        due = self._coordinator.agree(self._policy_feed.due(step))  # every rank must save, or none
        if not due:
            return None
        handle = self.save(step, state, **save_kwargs)
        self._policy_feed.saved(step, handle)
        return handle

    def wait(self) -> None:
        """Blocks until every save is durable; raises the first background error not yet raised."""
        self._guard.drain()
        self._engine.wait()

    def _check_writable(self) -> None:
        if self._refusal == _LOCKED and self._coordinator.world == 1 and self._lock.try_acquire():
            self._refusal = None  # the other writer has closed the directory since
        if self._refusal == _LOCKED:
            raise CheckpointError(f"{self.directory} is being written by another Checkpointer (another "
                                  "process holds its lock); use a different directory")
        if self._refusal is not None:
            raise CheckpointError(f"{self._refusal}: its checkpoints can be restored, not saved to; save into a "
                                  "directory this process can write")

    def _check_step(self, step: Any) -> int:
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        # Committed steps and saves still in flight bound the next step; a save that failed does not.
        # Listing the directory costs a quarter of a small save's stall, so it is done only when
        # the step is not above every step known here (nobody else commits while we hold the lock;
        # a quarantined, failed or deleted step only lowers the bound, and then we list again).
        if self._lock.held and self._newest_step is not None and step > self._newest_step:
            self._newest_step = int(step)
            return int(step)
        newest = max(self.steps() + self._engine.pending_steps(), default=None)
        if newest is not None and step <= newest:
            raise CheckpointError(
                f"cannot save step {step}: {self.directory} already holds step {newest}, and saving "
                "an older step would mix two training histories; nothing was written. Restore the newest "
                "checkpoint, or save into a new directory.")
        if self._lock.held:  # a listing taken without the lock may be outdated by the time we get it
            self._newest_step = int(step)
        return int(step)

    # ---------------------------------------------------------------------------- loading

    def steps(self) -> list[int]:
        """Steps of committed checkpoints, oldest first (not verified: see restore())."""
        return self._storage.steps()

    def latest_step(self) -> int | None:
        return max(self.steps(), default=None)

    def restore(self, objects: Mapping[str, Any], step: int | None = None, *, rng: bool = True) -> int | None:
        """Loads a checkpoint into `objects` in place and returns its step.

        With step=None the newest checkpoint that verifies is used: one that fails
        verification is reported with a CheckpointFallbackWarning, moved aside to
        step-N.corrupt-<time>/ (when this Checkpointer may write), and the next older one
        is tried. In a world of several ranks, every rank verifies what it reads and the
        ranks move to an older step together: every rank returns the same step or raises
        the same error. Returns None when the directory holds no checkpoint. Works on a
        directory this process can only read.

        Raises:
            CheckpointError: the requested step fails verification, no checkpoint verifies,
                or the checkpoint lacks one of `objects`' keys (nothing is changed then).
            ValueError: a saved tensor's shape differs from its target's (a different model;
                nothing is changed then).
        """
        if not isinstance(objects, Mapping):
            raise ValueError("objects must be a mapping from the names used at save() to objects")
        found = self._load_agreed(step, objects)
        if found is None:
            return None
        loaded_step, values, rng_state = found
        for key, obj in objects.items():
            load_object(key, obj, values[key])
        if rng and rng_state is not None:
            restore_rng_state(rng_state)
        return loaded_step

    def load(self, step: int | None = None) -> dict[str, Any]:
        """Returns a checkpoint as plain nested dicts of tensors and values (newest valid by default)."""
        found = self._load_agreed(step, None)
        if found is None:
            raise CheckpointError(f"{self.directory} holds no checkpoint")
        return found[1]

    def _load_agreed(self, step: int | None, objects: Mapping[str, Any] | None) -> tuple[int, dict, Any] | None:
        self.wait()  # no save in flight: the commit thread leaves the checkpoint group to the restore
        return load_agreed(self._storage, self._coordinator, step, objects, threads=self._read_threads,
                           may_quarantine=self._lock.held)

    # ---------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Waits for every save, then releases the directory."""
        if self._closed:
            return
        try:
            self._guard.drain()
            self._engine.close()
        finally:
            self._closed = True
            self._guard.close()
            self._lock.release()
            self._storage.close()
            exit_saves.forget(self)

    def __del__(self) -> None:
        # A Checkpointer dropped without close() still finishes its saves and frees its lock.
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception as e:  # noqa: BLE001 - nothing can be raised from __del__
                print(f"pyengine: a checkpoint save failed when its Checkpointer was dropped: {e}", file=sys.stderr)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this Checkpointer is closed")

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # A repr must not touch the network: a listing of object storage can hang or raise in
        # a log line or a debugger. On S3, steps() says what is there.
        if isinstance(self._storage, ObjectStorage):
            return f"Checkpointer({str(self.directory)!r}, keep_last={self.keep_last})"
        return f"Checkpointer({str(self.directory)!r}, keep_last={self.keep_last}, steps={self.steps()})"


_LOCKED = "locked"  # another process holds the writer lock


def _check_state(state: Any) -> None:
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and not k.startswith("__") for k in state):
        raise ValueError("state must be a mapping from names (str, not starting with '__') to objects")
