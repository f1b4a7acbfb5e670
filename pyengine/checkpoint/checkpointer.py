"""pe.Checkpointer: asynchronous, sharded, atomic, verified checkpoints of full training state."""

from __future__ import annotations

import atexit
import functools
import json
import numbers
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pyengine import _core
from pyengine.checkpoint import directory as ckdir
from pyengine.checkpoint import partitioned
from pyengine.checkpoint.cuda_staging import PinnedMirror
from pyengine.checkpoint.manifest import Manifest, read_manifest, read_tensors
from pyengine.checkpoint.overlap import OverlapGuard
from pyengine.checkpoint.policies import PolicyFeed, SavePolicy
from pyengine.checkpoint.rng import capture_rng_state, restore_rng_state
from pyengine.checkpoint.sharded import ShardedSaver, ShardedStep, read_sharded_manifest
from pyengine.checkpoint.state_codec import NamedTensor, StateEncoder, decode, tensor_names, writer_source
from pyengine.checkpoint.stateful import check_loadable, encode_object, load_object
from pyengine.errors import CheckpointError

_RNG_KEY = "__rng__"


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint failed verification and an older one was used."""


class SaveHandle:
    """One save in flight. `wait()` returns once it is durable (or raises its error)."""

    def __init__(self, writer: Any, save_id: int, step: int, stall_seconds: float, sources: list | None) -> None:
        self._writer = writer
        self._id = save_id
        self.step = step
        self.stall_seconds = stall_seconds
        self._sources = sources  # keeps source buffers alive while an overlapped copy reads them
        self._final_stats: dict[str, Any] | None = None

    def wait_snapshot(self) -> None:
        """Blocks until every byte is staged; the saved objects may change after this."""
        self._writer.wait_snapshot(self._id)
        self._sources = None

    def wait(self) -> None:
        """Blocks until the checkpoint is committed and durable; raises if the save failed."""
        try:
            self._writer.wait(self._id)
        finally:
            self._sources = None

    def done(self) -> bool:
        return bool(self._stats()["done"])

    @property
    def path(self) -> Path:
        return Path(self._stats()["path"])

    @property
    def stats(self) -> dict[str, Any]:
        """bytes, stall_seconds (the caller blocked), snapshot_seconds, persist_seconds (to commit)."""
        return {**self._stats(), "stall_seconds": self.stall_seconds}

    def _stats(self) -> dict[str, Any]:
        # The core forgets long-finished saves, so final figures are kept here.
        if self._final_stats is not None:
            return self._final_stats
        stats = self._writer.stats(self._id)
        if stats["done"]:
            self._final_stats = stats
        return stats


class Checkpointer:
    """Saves and restores full training state in `directory`.

    Concurrency: one thread (the training loop) calls every method. Saves run in C++
    threads; at most `max_in_flight` are unfinished, and a further save() waits. A
    background error is raised by the next save() or wait(). One Checkpointer (one
    process) writes a directory at a time; others may read it.

    Args:
        directory: where step-N/ checkpoint directories live; created if missing.
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
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, *, policy: SavePolicy | None = None,
                 max_shards: int = 4, copy_threads: int = 2,
                 read_threads: int = 4, max_in_flight: int = 1, staging_cap_bytes: int = 0,
                 capture_rng: bool = True, background_nice: int = 10) -> None:
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
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"checkpoint directory {self.directory} exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = int(keep_last)
        self.capture_rng = capture_rng
        self._writer_options = dict(max_shards=max_shards, copy_threads=copy_threads, max_in_flight=max_in_flight,
                                    staging_cap_bytes=staging_cap_bytes, keep_last=keep_last,
                                    background_nice=background_nice)
        self._read_threads = read_threads
        self._lock = ckdir.WriterLock(self.directory)
        # In a distributed world every rank saves its part, but only rank 0 owns DIR (see sharded.py).
        self._sharded: ShardedSaver | None = None
        distributed = _distributed_rank()
        if distributed is not None:
            if distributed == 0 and self._lock.try_acquire():
                ckdir.remove_temp_dirs(self.directory)
            self._sharded = ShardedSaver(self.directory, self.keep_last, self._writer_options)
        elif self._lock.try_acquire():
            ckdir.remove_temp_dirs(self.directory)
        self._writer: Any = None
        self._guard = OverlapGuard()
        self._mirror: PinnedMirror | None = None
        self._pending: list[SaveHandle] = []
        self._newest_step: int | None = None  # no save may take a step <= this one (see _check_step)
        self._closed = False
        _open_checkpointers.add(self)

    # ----------------------------------------------------------------------------- saving

    def save(self, step: int, state: Mapping[str, Any], *, overlap: bool = False,
             rng: bool | None = None) -> SaveHandle:
        """Snapshots `state` and writes it in the background; returns once the snapshot is taken.

        With overlap=True, parameters and optimizer state are copied during the next
        forward/backward instead; the next optimizer step waits for that copy. Module
        buffers (e.g. BatchNorm statistics) and everything else are copied before return.

        Raises:
            ValueError / TypeError: bad step or state (nothing is written).
            CheckpointError / OSError: an earlier save failed in the background.
        """
        started = time.perf_counter()
        self._check_open()
        self._pending = [h for h in self._pending if not h.done()]
        step = self._check_step(step)
        _check_state(state)
        if self._sharded is not None:
            self._guard.drain()  # no earlier snapshot may still read the buffers
            sharded_handle = self._sharded.save(step, state, self.capture_rng if rng is None else rng, overlap)
            if sharded_handle.overlapped:
                self._guard.add(sharded_handle.wait_snapshot)
            self._pending.append(sharded_handle)  # type: ignore[arg-type]
            return sharded_handle  # type: ignore[return-value]
        writer = self._ensure_writer()
        self._guard.drain()  # no earlier snapshot may still read the buffers refilled below
        sources, sync_count, state_json = self._encode(state, overlap, rng)
        save_id = writer.save(step, sources, state_json, sync_count)
        keep_alive = sources if sync_count < len(sources) else None
        handle = SaveHandle(writer, save_id, step, time.perf_counter() - started, keep_alive)
        if keep_alive is not None:
            self._guard.add(handle.wait_snapshot)
        self._pending.append(handle)
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
        if self._sharded is not None:
            return self._sharded.reserve(state)
        sources, _, _ = self._encode(state, False, None)
        return int(self._ensure_writer().reserve(sources))

    @property
    def staging_bytes(self) -> int:
        """Host memory held for snapshots (allocated by the first save or by reserve(), then reused)."""
        if self._sharded is not None:
            return self._sharded.staging_bytes
        return int(self._writer.staging_bytes) if self._writer is not None else 0

    def _encode(self, state: Mapping[str, Any], overlap: bool, rng: bool | None) -> tuple[list[tuple], int, str]:
        encoder = StateEncoder()
        objects = {key: encode_object(encoder, key, obj) for key, obj in state.items()}
        capture = self.capture_rng if rng is None else rng
        rng_tree = encoder.encode(capture_rng_state(), (_RNG_KEY,)) if capture else None
        state_json = json.dumps({"objects": objects, "rng": rng_tree}, allow_nan=False, separators=(",", ":"))
        sources, sync_count = self._sources(encoder.tensors, overlap)
        return sources, sync_count, state_json

    def maybe_save(self, step: int, state: Mapping[str, Any], **save_kwargs: Any) -> SaveHandle | None:
        """Saves `state` when the policy says so; call it once per training step.

        The policy is fed the time between calls (the training step), each save's stall and,
        once it finishes, its persist time.

        Returns:
            The save's handle, or None when the policy skipped this step.

        Raises:
            ValueError: the Checkpointer has no policy, or a bad step; and whatever save() raises.
        """
        if self._policy_feed is None:
            raise ValueError("maybe_save() needs a policy, e.g. "
                             "Checkpointer(directory, policy=pe.checkpoint.Every(steps=100))")
        due = self._policy_feed.due(step)
        if self._sharded is not None:
            due = self._sharded.agree(due)  # every rank must save, or none
        if not due:
            return None
        handle = self.save(step, state, **save_kwargs)
        self._policy_feed.saved(step, handle)
        return handle

    def wait(self) -> None:
        """Blocks until every save is durable; raises the first background error not yet raised."""
        self._guard.drain()
        if self._writer is not None:
            self._writer.wait_all()
        if self._sharded is not None:
            self._sharded.wait()
        self._pending.clear()

    def _sources(self, tensors: list[NamedTensor], overlap: bool) -> tuple[list[tuple], int]:
        on_device = [(t.name, t.tensor) for t in tensors if t.tensor.device.type == "cuda"]
        if on_device and self._mirror is None:
            self._mirror = PinnedMirror()
        host = self._mirror.to_host(on_device) if on_device else {}
        now, later = [], []
        for item in tensors:
            t = host.get(item.name, item.tensor)
            if t.device.type != "cpu" or t.layout != torch.strided:
                raise ValueError(f"cannot checkpoint tensor {item.name!r} on {t.device} with layout {t.layout}")
            source, private = writer_source(item.name, t)
            stable = item.stable or private or item.name in host  # a pinned mirror is a private copy
            (later if overlap and stable else now).append(source)
        return now + later, len(now)

    def _ensure_writer(self) -> Any:
        if self._writer is None:
            if not self._lock.try_acquire():
                raise CheckpointError(f"{self.directory} is being written by another Checkpointer (another "
                                      "process holds its lock); use a different directory")
            self._writer = _core.AsyncCheckpointWriter(str(self.directory), **self._writer_options)
        return self._writer

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
        newest = max(self.steps() + [h.step for h in self._pending], default=None)
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
        return ckdir.committed_steps(self.directory)

    def latest_step(self) -> int | None:
        return max(self.steps(), default=None)

    def restore(self, objects: Mapping[str, Any], step: int | None = None, *, rng: bool = True) -> int | None:
        """Loads a checkpoint into `objects` in place and returns its step.

        With step=None the newest checkpoint that verifies is used: one that fails
        verification is reported with a CheckpointFallbackWarning, moved aside to
        step-N.corrupt-<time>/ (when this Checkpointer may write), and the next older one
        is tried. Returns None when the directory holds no checkpoint.

        Raises:
            CheckpointError: the requested step fails verification, no checkpoint verifies,
                or the checkpoint lacks one of `objects`' keys (nothing is changed then).
            ValueError: a saved tensor's shape differs from its target's (a different model;
                nothing is changed then).
        """
        if not isinstance(objects, Mapping):
            raise ValueError("objects must be a mapping from the names used at save() to objects")
        # A pipeline stage takes its slice of the plain-form state, before any tensor is read.
        stages = partitioned.partitions_in(objects)
        localizers = {key: functools.partial(partitioned.localize, kind, partition=p, optimizer=opt, key=key)
                      for key, (kind, p, opt) in stages.items()}
        found = self._load_newest_valid(step, list(objects), localizers)
        if found is None:
            return None
        loaded_step, values, rng_state = found
        for key, obj in objects.items():  # every entry is checked before the first is loaded
            check_loadable(key, obj, values[key])
        for key, obj in objects.items():
            load_object(key, obj, values[key])
        if rng and rng_state is not None:
            restore_rng_state(rng_state)
        return loaded_step

    def load(self, step: int | None = None) -> dict[str, Any]:
        """Returns a checkpoint as plain nested dicts of tensors and values (newest valid by default)."""
        found = self._load_newest_valid(step, None)
        if found is None:
            raise CheckpointError(f"{self.directory} holds no checkpoint")
        return found[1]

    def _load_newest_valid(self, step: int | None, keys: Iterable[str] | None,
                           localizers: Mapping[str, Callable[[Any], Any]] | None = None,
                           ) -> tuple[int, dict[str, Any], Any] | None:
        self.wait()
        if step is not None:
            if step not in self.steps():
                raise CheckpointError(f"{self.directory} has no committed checkpoint for step {step}; "
                                      f"it holds {self.steps()}")
            return (step, *self._load_step(step, keys, localizers))
        failures = []
        for candidate in reversed(self.steps()):
            try:
                return (candidate, *self._load_step(candidate, keys, localizers))
            except _MissingKeys:
                raise
            except CheckpointError as e:
                moved = ""
                if self._lock.held:
                    moved = f"; moved aside to {ckdir.quarantine(self.directory, candidate).name}"
                warnings.warn(f"checkpoint step {candidate} failed verification: {e}{moved}. Trying an older one.",
                              CheckpointFallbackWarning, stacklevel=3)
                failures.append(f"step {candidate}: {e}")
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} verifies:\n  " + "\n  ".join(failures))
        return None

    def _load_step(self, step: int, keys: Iterable[str] | None,
                   localizers: Mapping[str, Callable[[Any], Any]] | None = None) -> tuple[dict[str, Any], Any]:
        path = ckdir.step_dir(self.directory, step)
        sharded_doc = read_sharded_manifest(path)
        if sharded_doc is not None:
            opened = ShardedStep(path, sharded_doc, _distributed_rank() or 0, self._read_threads)
            objects, rng_tree, read = opened.objects, opened.rng, opened.read
        else:
            manifest = read_manifest(path)
            objects, rng_tree = _split_state(manifest)
            read = functools.partial(read_tensors, manifest, threads=self._read_threads)
        if keys is not None:
            missing = [k for k in keys if k not in objects]
            if missing:
                raise _MissingKeys(f"checkpoint step {step} has no {missing}; it holds {sorted(objects)}")
            objects = {k: objects[k] for k in keys}
        if localizers:
            objects = {k: localizers[k](v) if k in localizers else v for k, v in objects.items()}
        tensors = read(tensor_names([objects, rng_tree]))
        return decode(objects, tensors), decode(rng_tree, tensors)

    # ---------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Waits for every save, then releases the directory."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._guard.close()
            self._writer = None
            self._lock.release()
            _open_checkpointers.discard(self)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this Checkpointer is closed")

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.directory)!r}, keep_last={self.keep_last}, steps={self.steps()})"


def _check_state(state: Any) -> None:
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and not k.startswith("__") for k in state):
        raise ValueError("state must be a mapping from names (str, not starting with '__') to objects")


class _MissingKeys(CheckpointError):
    """A caller asked for keys the checkpoint lacks: not corruption, so no fallback."""


def _distributed_rank() -> int | None:
    """This process's rank in a torch.distributed world of more than one rank, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return None


def _split_state(manifest: Manifest) -> tuple[dict[str, Any], Any]:
    state = manifest.state
    if not isinstance(state, dict) or not isinstance(state.get("objects"), dict):
        raise CheckpointError(f"{manifest.directory}/manifest.json has no saved objects")
    return state["objects"], state.get("rng")


_open_checkpointers: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


@atexit.register
def _finish_saves_at_exit() -> None:
    # A save in flight at a normal interpreter exit still becomes durable.
    for ckpt in list(_open_checkpointers):
        try:
            ckpt.close()
        except Exception as e:  # noqa: BLE001 - nothing can be raised at exit
            print(f"pyengine: a checkpoint save failed at exit: {e}", file=sys.stderr)
