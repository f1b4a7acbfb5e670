"""Rank-sharded checkpoints: every rank of a torch.distributed job saves at once.

Layout of one committed step (world of W ranks):

    DIR/step-00000040/
        manifest.json                    written LAST by rank 0: format "pyengine.sharded-checkpoint",
                                         its own CRC32C, the global shape and piece layout of every
                                         shared tensor, the shared objects' JSON, the parts
        rank-00000/step-00000040/        rank 0's part: an ordinary pyengine checkpoint (safetensors
        rank-00001/step-00000040/        shards + verified manifest.json) written by the C++ writer
        ...

Who writes what. Entries of `state` that are nn.Modules or optimizers are *shared*: every
rank holds the same logical tensors. A DTensor sharded along one dim of a 1-D mesh (FSDP2)
is written by its owners, each its local shard, as a piece (dim, offset, length) of the
global tensor. Every other shared tensor is replicated (DDP keeps replicas equal) and is
written exactly once, by the rank a deterministic greedy plan gives it, so the bytes are
spread across ranks. A pipeline stage (and the optimizer over its parameters) is *owned*:
only its rank holds it, so that rank writes all of it, its optimizer state renumbered to the
full model's parameter ids, and rank 0 merges the stages' structures into the plain model's
(partitioned.py). Every other entry (loader, RNG, extras) is *per rank*: each rank
stores its own in its part's state, and rank r restores part r (part 0 when the saving
world had no rank r; a pe.data.Loader then refuses the different order with ValueError).

Commit protocol, on a separate gloo group (pe.distributed.checkpoint_group) so it never
interleaves with training collectives:
 1. save(): rank 0 broadcasts a fresh temp name DIR/step-N.tmp-dist-<token>; every rank
    snapshots its tensors with its C++ writer, which commits its part under <tmp>/rank-R/,
    and returns. Each rank keeps one writer for the Checkpointer's life, so its staging
    memory is allocated once (or ahead, by reserve()) and reused by every save.
 2. A background thread per rank waits until its part is durable (shards fsynced, part
    manifest written, renamed, directory fsynced), then all ranks all_gather their status
    and piece tables.
 3. Only if every rank succeeded, rank 0 checks that the pieces tile every global tensor,
    writes manifest.json, fsyncs, renames <tmp> to step-N and fsyncs DIR; then prunes beyond
    keep_last. Rank 0 broadcasts the outcome; every rank raises the same CheckpointError
    from wait() when any rank failed. A rank that dies mid-save breaks the gather, so nothing
    is committed; the temp directory is removed when a Checkpointer next opens DIR.

Contract for callers: every rank constructs its Checkpointer (that creates the checkpoint
groups, a collective) and calls save() / maybe_save() for the same steps. An error in one
rank's save() (bad state, full disk) is reported by wait() (or the next save()) on every
rank, never raised at once on one rank only, which would leave the others waiting.
maybe_save() follows rank 0's policy decision. save(overlap=True) works as in one process:
parameters and optimizer state (a DTensor's local shard) are copied during the next forward
and backward, and the next optimizer step waits for that copy; buffers and per-rank entries
are copied before save() returns. CUDA tensors are copied to the host before save() returns
(synchronously, unlike the single-process path's pinned mirror on a side stream).

The single-process path (pe.Checkpointer without a distributed world) never comes here.
Restore reads the pieces of each tensor it needs and reassembles the global tensor, so a
checkpoint loads at any world size, and into DTensor targets (see dtensors.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pyengine import _core
from pyengine.checkpoint import directory as ckdir
from pyengine.checkpoint import partitioned
from pyengine.checkpoint.dtypes import CODE_TO_TORCH, code_of_torch
from pyengine.checkpoint.manifest import MANIFEST, Manifest, read_manifest, read_tensors
from pyengine.checkpoint.rng import capture_rng_state
from pyengine.checkpoint.state_codec import NamedTensor, StateEncoder, writer_source
from pyengine.checkpoint.stateful import encode_object, parameter_ptrs, unwrap_module
from pyengine.errors import CheckpointError

FORMAT = "pyengine.sharded-checkpoint"
VERSION = 1
_PREFIX = re.compile(rb'^\{"manifest_crc32c":"([0-9a-f]{8})","manifest":')
_PART_DIR = re.compile(r"^rank-\d{5}/step-\d{8}$")
_RNG_KEY = "__rng__"

WriterFactory = Callable[..., Any]


def is_shared(obj: Any) -> bool:
    """Modules and optimizers hold the same logical tensors on every rank."""
    return isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))


class ShardedSaveHandle:
    """One distributed save: snapshot taken; wait() blocks until committed everywhere."""

    def __init__(self, step: int, stall_seconds: float, path: Path) -> None:
        self.step = step
        self.stall_seconds = stall_seconds
        self.persist_seconds = 0.0  # save() to commit (or failure), set by the commit thread
        self.path = path
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._reported = False
        self._writer: Any = None  # set, with the save id and the sources, while a copy is overlapped
        self._save_id = 0
        self._sources: list | None = None  # keeps source buffers alive while the overlapped copy reads them

    @property
    def overlapped(self) -> bool:
        """Some tensors are still being copied: the saved objects must not change yet."""
        return self._sources is not None

    def wait_snapshot(self) -> None:
        """Blocks until every byte is staged; the saved objects may change after this."""
        if self._sources is not None:
            self._writer.wait_snapshot(self._save_id)
            self._sources = None

    def wait(self) -> None:
        """Blocks until rank 0 committed (or every rank learned that the save failed)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    @property
    def stats(self) -> dict[str, Any]:
        return {"step": self.step, "stall_seconds": self.stall_seconds, "persist_seconds": self.persist_seconds,
                "done": self.done(), "failed": self._error is not None, "path": str(self.path)}


class ShardedSaver:
    """The saving side for one rank; made by Checkpointer when a world of >1 ranks exists.

    Concurrency: the training thread calls save(); one commit thread per save runs the
    checkpoint-group collectives. At most one save is in flight: save() first waits for the
    previous one (and raises its error).
    """

    def __init__(self, directory: Path, keep_last: int, writer_options: dict[str, Any],
                 make_writer: WriterFactory | None = None) -> None:
        from pyengine.distributed.process_group import checkpoint_group

        self.directory = directory
        self.keep_last = keep_last
        self.group = checkpoint_group()  # collective: every rank constructs its Checkpointer
        # maybe_save() decisions travel on their own group: the commit thread may be using `group`.
        self._decisions = dist.new_group(backend="gloo")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self._options = {k: writer_options[k]
                         for k in ("max_shards", "copy_threads", "staging_cap_bytes", "background_nice")}
        self.make_writer = make_writer or _core.AsyncCheckpointWriter
        self._writer: Any = None  # made by the first save() or reserve(), then reused
        self._last: ShardedSaveHandle | None = None

    def _ensure_writer(self) -> Any:
        if self._writer is None:
            # Its own directory is never written: every save names its part's temp root.
            self._writer = self.make_writer(str(self.directory), max_in_flight=1, keep_last=0, **self._options)
        return self._writer

    def _plan(self, state: Mapping[str, Any], capture_rng: bool
              ) -> tuple[list[dict], list[NamedTensor], Any, str]:
        """This rank's pieces, the tensors it writes, the structure rank 0 merges, and its part's JSON."""
        shared, shared_enc, local_enc, local_objects, owned, owned_enc = _encode(state, capture_rng)
        pieces, mine = plan_pieces(shared_enc.tensors, self.rank, self.world)
        for t in owned_enc.tensors:  # a stage's own tensors: nobody else holds them
            pieces.append(_piece(t.name, t.tensor, None, 0, 0))
            mine.append(t)
        state_json = json.dumps({"objects": local_objects[0], "rng": local_objects[1]},
                                allow_nan=False, separators=(",", ":"))
        return pieces, mine + local_enc.tensors, (shared, owned), state_json

    def reserve(self, state: Mapping[str, Any]) -> int:
        """Allocates the staging memory this rank's part of a save of `state` needs. Local (no
        collective): each rank holds only what it writes. Nothing is copied."""
        self.wait()  # the writer serves one save at a time
        _, tensors, _, _ = self._plan(state, capture_rng=True)
        sizes = [_source(t.name, t.tensor, copy=False)[0] for t in tensors]
        return int(self._ensure_writer().reserve(sizes))

    @property
    def staging_bytes(self) -> int:
        return int(self._writer.staging_bytes) if self._writer is not None else 0

    def save(self, step: int, state: Mapping[str, Any], capture_rng: bool,
             overlap: bool = False) -> ShardedSaveHandle:
        started = time.perf_counter()
        self.wait()
        token = [uuid.uuid4().hex[:12] if self.rank == 0 else None]
        dist.broadcast_object_list(token, src=0, group=self.group)
        tmp = self.directory / f"{ckdir.step_dir(self.directory, step).name}.tmp-dist-{token[0]}"
        handle = ShardedSaveHandle(step, 0.0, ckdir.step_dir(self.directory, step))
        writer, save_id, sources = None, 0, None
        try:
            part_root = tmp / f"rank-{self.rank:05d}"
            part_root.mkdir(parents=True, exist_ok=True)
            pieces, tensors, shared, state_json = self._plan(state, capture_rng)
            sources, sync_count = _sources(tensors, overlap)
            # Copies sources[:sync_count] now; with overlap the rest during the next forward/backward.
            save_id = self._ensure_writer().save(step, sources, state_json, sync_count, str(part_root))
            writer = self._writer
            if sync_count < len(sources):
                handle._writer, handle._save_id, handle._sources = writer, save_id, sources
        except BaseException as e:  # noqa: BLE001 - the other ranks must learn of it in the gather
            if save_id:  # the C++ copy started (e.g. KeyboardInterrupt just after): it may still read
                writer = self._writer
                handle._writer, handle._save_id, handle._sources = writer, save_id, sources
            pieces, shared = [], None
            failure: BaseException | None = e
        else:
            failure = None
        del sources
        handle.stall_seconds = time.perf_counter() - started
        handle._thread = threading.Thread(
            target=self._commit, name=f"pyengine-ckpt-commit-{step}", daemon=True,
            args=(handle, tmp, writer, save_id, pieces, shared, failure, started))
        handle._thread.start()
        self._last = handle
        return handle

    def agree(self, due: bool) -> bool:
        """Rank 0's answer to "save now?", so that a time-based policy cannot split the ranks."""
        flag = torch.tensor([1 if due else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0, group=self._decisions)
        return bool(flag.item())

    def wait(self) -> None:
        if self._last is not None:
            last, self._last = self._last, None
            last.wait()

    def _commit(self, handle: ShardedSaveHandle, tmp: Path, writer: Any, save_id: int,
                pieces: list[dict], shared: Any, failure: BaseException | None, started: float) -> None:
        try:
            error = None if failure is None else f"{type(failure).__name__}: {failure}"
            if writer is not None:
                try:
                    writer.wait(save_id)
                except Exception as e:  # noqa: BLE001 - gathered below
                    error = f"{type(e).__name__}: {e}"
                finally:
                    handle._sources = None  # staged (or failed): the buffers may be released
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, (error, pieces, shared), group=self.group)
            failures = [f"rank {r}: {g[0]}" for r, g in enumerate(gathered) if g[0] is not None]
            outcome: list[Any] = [None]
            if self.rank == 0:
                if not failures:
                    try:
                        self._write_manifest(tmp, handle.step, gathered)
                    except Exception as e:  # noqa: BLE001 - broadcast to every rank
                        failures.append(f"rank 0 commit: {type(e).__name__}: {e}")
                if failures:
                    shutil.rmtree(tmp, ignore_errors=True)
                outcome = [failures]
            dist.broadcast_object_list(outcome, src=0, group=self.group)
            if outcome[0]:
                raise CheckpointError(f"distributed save of step {handle.step} failed, nothing was committed:\n  "
                                      + "\n  ".join(outcome[0]))
        except BaseException as e:  # noqa: BLE001 - re-raised by handle.wait()
            handle._error = e if isinstance(e, CheckpointError) else CheckpointError(
                f"distributed save of step {handle.step} failed, nothing was committed: {type(e).__name__}: {e}")
        finally:
            handle.persist_seconds = time.perf_counter() - started

    def _write_manifest(self, tmp: Path, step: int, gathered: list[Any]) -> None:
        # The manifest keeps rank 0's structure of the shared state, and replicated tensors are
        # planned as if every rank held them: a rank holding other modules than rank 0 (and not
        # marked as a pipeline stage) would commit a checkpoint that names tensors nobody wrote.
        for rank, (_, _, (shared, owned)) in enumerate(gathered):
            if shared != gathered[0][2][0]:
                raise CheckpointError(f"rank {rank} holds different models/optimizers than rank 0; a sharded "
                                      "checkpoint needs the same logical state on every rank, except pipeline "
                                      "stages made by pe.distributed.PipelineParallel")
            kinds = {k: kind for k, (kind, _) in owned.items()}
            kinds0 = {k: kind for k, (kind, _) in gathered[0][2][1].items()}
            if kinds != kinds0:
                raise CheckpointError(f"rank {rank} saves pipeline-stage entries {kinds}, rank 0 saves {kinds0}: "
                                      "every rank must save its stage and optimizer under the same names")
        objects = dict(gathered[0][2][0])
        for key, (kind, _) in gathered[0][2][1].items():
            objects[key] = partitioned.merge(key, kind, [g[2][1][key][1] for g in gathered])
        tensors: dict[str, dict] = {}
        for rank, (_, rank_pieces, _) in enumerate(gathered):
            for p in rank_pieces:
                entry = tensors.setdefault(p["name"], {"dtype": p["dtype"], "shape": p["shape"], "pieces": []})
                if entry["dtype"] != p["dtype"] or entry["shape"] != p["shape"]:
                    raise CheckpointError(f"ranks disagree on tensor {p['name']!r}: {entry} vs {p}")
                entry["pieces"].append({"part": rank, "dim": p["dim"], "offset": p["offset"], "length": p["length"]})
        for name, entry in tensors.items():
            check_tiling(name, entry)
        doc = {"format": FORMAT, "version": VERSION, "step": step, "created_unix": time.time(),
               "world_size": self.world,
               "parts": [f"rank-{r:05d}/{ckdir.step_dir(self.directory, step).name}" for r in range(self.world)],
               "objects": objects, "tensors": tensors}
        body = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
        raw = b'{"manifest_crc32c":"%08x","manifest":' % _core.crc32c(memoryview(body)) + body + b"}\n"
        _write_durable(tmp / MANIFEST, raw)
        _fsync_dir(tmp)
        final = ckdir.step_dir(self.directory, step)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        self._prune()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        steps = ckdir.committed_steps(self.directory)
        for old in steps[:-self.keep_last]:
            doomed = self.directory / f"{ckdir.step_dir(self.directory, old).name}.tmp-prune-{uuid.uuid4().hex[:8]}"
            os.rename(ckdir.step_dir(self.directory, old), doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _encode(state: Mapping[str, Any],
            capture_rng: bool) -> tuple[dict, StateEncoder, StateEncoder, tuple, dict, StateEncoder]:
    """Splits the state: shared (the same on every rank), owned (a pipeline stage's, in global
    parameter ids: see partitioned.py) and per-rank entries, each encoded."""
    shared_enc, local_enc, owned_enc = StateEncoder(), StateEncoder(), StateEncoder()
    shared, local, owned = {}, {}, {}
    stages = partitioned.partitions_in(state)
    for key, obj in state.items():
        if key in stages:
            kind, partition, _ = stages[key]
            if kind == partitioned.MODULE:
                module = unwrap_module(obj)
                owned[key] = (kind, owned_enc.encode(module.state_dict(), (key,), parameter_ptrs(module)))
            else:
                sd = partitioned.globalize_optimizer(obj.state_dict(), obj, partition)
                owned[key] = (kind, owned_enc.encode(sd, (key,), all_stable=True))
        elif isinstance(obj, torch.nn.Module):
            module = unwrap_module(obj)  # parameters are stable until the optimizer step, buffers are not
            shared[key] = shared_enc.encode(module.state_dict(), (key,), parameter_ptrs(module))
        elif isinstance(obj, torch.optim.Optimizer):
            shared[key] = shared_enc.encode(obj.state_dict(), (key,), all_stable=True)
        else:
            local[key] = encode_object(local_enc, key, obj)
    rng = local_enc.encode(capture_rng_state(), (_RNG_KEY,)) if capture_rng else None
    return shared, shared_enc, local_enc, (local, rng), owned, owned_enc


def plan_pieces(tensors: list[NamedTensor], rank: int, world: int) -> tuple[list[dict], list[NamedTensor]]:
    """Returns this rank's piece table and the tensors it writes.

    Sharded DTensors: the local shard, if not empty. Replicated tensors: assigned greedily,
    largest first, to the least-loaded rank; every rank computes the same plan.
    """
    pieces: list[dict] = []
    mine: list[NamedTensor] = []
    replicated: list[tuple[str, torch.Tensor]] = []
    for item in tensors:
        t = item.tensor
        shard = _shard_of(item.name, t)
        if shard is None:
            replicated.append(NamedTensor(item.name, t.to_local() if _is_dtensor(t) else t,  # type: ignore[attr-defined]
                                          item.stable))
            continue
        dim, offset, local = shard
        if local.numel() > 0:
            pieces.append(_piece(item.name, t, dim, offset, local.shape[dim]))
            mine.append(NamedTensor(item.name, local, item.stable))
    load = [0] * world
    for item in sorted(replicated, key=lambda nt: (-nt.tensor.numel() * nt.tensor.element_size(), nt.name)):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += item.tensor.numel() * item.tensor.element_size()
        if owner == rank:
            pieces.append(_piece(item.name, item.tensor, None, 0, 0))
            mine.append(item)
    return pieces, mine


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local")


def _shard_of(name: str, t: torch.Tensor) -> tuple[int, int, torch.Tensor] | None:
    if not _is_dtensor(t):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = t.placements  # type: ignore[attr-defined]
    if all(isinstance(p, Replicate) for p in placements):
        return None
    if len(placements) != 1 or not isinstance(placements[0], Shard):
        raise ValueError(f"cannot checkpoint DTensor {name!r} with placements {placements}: only Shard(d) or "
                         "Replicate() on a 1-D mesh (FSDP2) is supported")
    dim = placements[0].dim
    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, placements)  # type: ignore[attr-defined]
    return dim, int(offsets[dim]), t.to_local()  # type: ignore[attr-defined]


def _piece(name: str, t: torch.Tensor, dim: int | None, offset: int, length: int) -> dict:
    return {"name": name, "dtype": code_of_torch(t.dtype, name), "shape": list(t.shape),
            "dim": dim, "offset": offset, "length": length}


def _sources(tensors: list[NamedTensor], overlap: bool) -> tuple[list[tuple], int]:
    """The writer's sources, those to copy now first; returns them and how many to copy now.
    With overlap, stable tensors (and private copies) are copied later, in the background."""
    now, later = [], []
    for item in tensors:
        source, private = _source(item.name, item.tensor)
        (later if overlap and (item.stable or private) else now).append(source)
    return now + later, len(now)


def _source(name: str, t: torch.Tensor, copy: bool = True) -> tuple[tuple, bool]:
    """(name, dtype, shape, bytes) of a tensor, and whether those bytes are a private copy.

    A device tensor is copied to the host here, synchronously: the distributed path has no
    pinned mirror on a side stream yet, so with overlap only the host-side copy is deferred.
    copy=False (sizing only): a device tensor gets an untouched host buffer of its size instead.
    """
    if _is_dtensor(t):  # in a per-rank entry (e.g. early stopping's best weights): this rank's shard
        t = t.to_local()  # type: ignore[attr-defined]
    t = t.detach()
    on_device = t.device.type != "cpu"
    if on_device:
        t = t.cpu() if copy else torch.empty(t.shape, dtype=t.dtype)
    source, private = writer_source(name, t)
    return source, private or on_device


def check_tiling(name: str, entry: dict) -> None:
    """Raises unless the pieces cover the global tensor exactly once."""
    shape, pieces = entry["shape"], entry["pieces"]
    if any(p["dim"] is None for p in pieces):
        if len(pieces) != 1:
            raise CheckpointError(f"tensor {name!r} is written {len(pieces)} times")
        return
    if not pieces:
        if all(d > 0 for d in shape) and shape:
            raise CheckpointError(f"tensor {name!r} has no pieces")
        return
    dims = {p["dim"] for p in pieces}
    if len(dims) != 1 or not 0 <= next(iter(dims)) < len(shape):
        raise CheckpointError(f"tensor {name!r} has pieces along dims {sorted(dims)}")
    dim, at = dims.pop(), 0
    for p in sorted(pieces, key=lambda p: p["offset"]):
        if p["offset"] != at or p["length"] <= 0:
            raise CheckpointError(f"tensor {name!r}: pieces do not tile dim {dim} (gap or overlap at {at})")
        at += p["length"]
    if at != shape[dim]:
        raise CheckpointError(f"tensor {name!r}: pieces cover {at} of {shape[dim]} along dim {dim}")


# ----------------------------------------------------------------------------- loading

def read_sharded_manifest(step_path: Path) -> dict | None:
    """The top-level manifest of a sharded step, or None when the step is an ordinary one."""
    path = step_path / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    match = _PREFIX.match(raw)
    if match is None or FORMAT.encode() not in raw[:200]:
        return None
    body = raw[match.end():-2]
    if not raw.endswith(b"}\n") or _core.crc32c(memoryview(body)) != int(match.group(1), 16):
        raise CheckpointError(f"{path} fails its checksum: the manifest is corrupt")
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if doc.get("format") != FORMAT:
        return None
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{path} has sharded format version {doc.get('version')}; this pyengine reads "
                              f"{VERSION}. Upgrade pyengine to read it.")
    parts = doc.get("parts")
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) and _PART_DIR.match(p) for p in parts):
        raise CheckpointError(f"{path} names parts pyengine never writes; refusing it")
    for name, entry in doc["tensors"].items():
        if any(not isinstance(p.get("part"), int) or not 0 <= p["part"] < len(parts) for p in entry["pieces"]):
            raise CheckpointError(f"{path}: tensor {name!r} names a part that does not exist")
        if entry["dtype"] not in CODE_TO_TORCH:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
        check_tiling(name, entry)
    return doc


class ShardedStep:
    """A committed sharded step opened for rank `rank` of the loading world."""

    def __init__(self, step_path: Path, doc: dict, rank: int, threads: int) -> None:
        self.path = step_path
        self.doc = doc
        self.threads = threads
        self._parts: dict[int, Manifest] = {}
        own = self._part(rank if rank < len(doc["parts"]) else 0)
        state = own.state
        if not isinstance(state, dict) or not isinstance(state.get("objects"), dict):
            raise CheckpointError(f"{own.directory}/{MANIFEST} has no saved objects")
        self._own = own
        self.objects = {**doc["objects"], **state["objects"]}
        self.rng = state.get("rng")

    def _part(self, index: int) -> Manifest:
        if index not in self._parts:
            self._parts[index] = read_manifest(self.path / self.doc["parts"][index])
        return self._parts[index]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Reads tensors by name: per-rank ones from this rank's part, shared ones reassembled."""
        shared = self.doc["tensors"]
        own = [n for n in names if n not in shared]
        out = read_tensors(self._own, own, self.threads) if own else {}
        wanted: dict[int, list[str]] = {}
        for name in (n for n in names if n in shared):
            for p in shared[name]["pieces"]:
                wanted.setdefault(p["part"], []).append(name)
        read = {part: read_tensors(self._part(part), sorted(set(ns)), self.threads) for part, ns in wanted.items()}
        for name in (n for n in names if n in shared):
            entry = shared[name]
            full = torch.empty(entry["shape"], dtype=CODE_TO_TORCH[entry["dtype"]])
            for p in entry["pieces"]:
                piece = read[p["part"]][name]
                target = full if p["dim"] is None else full.narrow(p["dim"], p["offset"], p["length"])
                if tuple(piece.shape) != tuple(target.shape):
                    raise CheckpointError(f"{self.path}: piece of {name!r} in part {p['part']} has shape "
                                          f"{tuple(piece.shape)}, the manifest says {tuple(target.shape)}")
                target.copy_(piece)
            out[name] = full
        return out


def _write_durable(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
