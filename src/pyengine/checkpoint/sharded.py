"""The rank-sharded layout: one committed step written by a world of W > 1 ranks.

    DIR/step-00000040/
        manifest.json                    written LAST by rank 0 (the commit marker): format
                                         "pyengine.sharded-checkpoint", in the self-checking
                                         envelope, the global shape and piece layout of every
                                         shared tensor, the shared objects' JSON, the parts
        rank-00000/step-00000040/        rank 0's part: an ordinary pyengine checkpoint (safetensors
        rank-00001/step-00000040/        shards + verified manifest.json) written by its C++ writer
        ...

Who writes which tensor is the plan's business (plan.py); how a save is committed across
ranks is the save engine's (save_engine.py). This module builds and checks the top manifest,
and reads a step back: shared tensors are reassembled from their pieces, so a checkpoint loads
at any world size, and into DTensor targets (see dtensors.py). Rank r restores per-rank
entries from part r (part 0 when the saving world had no rank r; a pe.data.Loader then
refuses the different order with ValueError).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from pyengine.checkpoint import partitioned
from pyengine.checkpoint.dtypes import CODE_TO_TORCH
from pyengine.checkpoint.envelope import is_sealed, seal, unseal
from pyengine.checkpoint.manifest import MANIFEST, Manifest, check_state, read_manifest, read_tensors
from pyengine.errors import CheckpointError

FORMAT = "pyengine.sharded-checkpoint"
VERSION = 1
_PART_DIR = re.compile(r"^rank-\d{5}/step-\d{8}$")
_MAX_DIM = 1 << 63  # torch sizes are int64


def part_name(rank: int, step_name: str) -> str:
    """Where rank `rank`'s part lies inside the step directory."""
    return f"rank-{rank:05d}/{step_name}"


def build_manifest(step: int, step_name: str, gathered: list[Any]) -> bytes:
    """The top manifest of a sharded step from every rank's (error, pieces, (shared, owned)).

    Raises:
        CheckpointError: the ranks' state does not form one checkpoint (different models,
            pieces that do not tile a tensor).
    """
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
           "world_size": len(gathered), "parts": [part_name(r, step_name) for r in range(len(gathered))],
           "objects": objects, "tensors": tensors}
    return seal(doc)


def check_tiling(name: str, entry: dict) -> None:
    """Raises unless the pieces cover the global tensor exactly once."""
    shape, pieces = entry["shape"], entry["pieces"]
    if any(p["dim"] is None for p in pieces):
        if len(pieces) != 1:
            raise CheckpointError(f"tensor {name!r} is written {len(pieces)} times")
        return
    if not pieces:
        if math.prod(shape) > 0:  # a scalar (shape []) has one element too
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
    if not is_sealed(raw) or FORMAT.encode() not in raw[:200]:
        return None
    doc = unseal(raw, path)
    if doc.get("format") != FORMAT:
        return None
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{path} has sharded format version {doc.get('version')}; this pyengine reads "
                              f"{VERSION}. Upgrade pyengine to read it.")
    parts = doc.get("parts")
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) and _PART_DIR.match(p) for p in parts):
        raise CheckpointError(f"{path} names parts pyengine never writes; refusing it")
    tensors, objects = doc.get("tensors"), doc.get("objects")
    if not isinstance(tensors, dict) or not isinstance(objects, dict):
        raise CheckpointError(f"{path} has no tensor table or no saved objects")
    for name, entry in tensors.items():
        _check_entry(name, entry, len(parts), path)
        check_tiling(name, entry)
    check_state(objects, path)
    return doc


def _check_entry(name: str, entry: Any, n_parts: int, path: Path) -> None:
    """Types and ranges of one shared tensor's entry; check_tiling then checks the pieces' layout."""
    def index(v: Any, bound: int | None = None) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (bound is None or v < bound)

    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in CODE_TO_TORCH:
        raise CheckpointError(f"{path}: tensor {name!r} has no known dtype")
    shape, pieces = entry.get("shape"), entry.get("pieces")
    if not isinstance(shape, list) or not all(index(d, _MAX_DIM) for d in shape) or not isinstance(pieces, list):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape or piece list")
    for p in pieces:
        if (not isinstance(p, dict) or not index(p.get("part"), n_parts) or not index(p.get("offset"))
                or not index(p.get("length")) or "dim" not in p
                or not (p["dim"] is None or index(p["dim"], len(shape)))):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed piece {str(p)[:80]} "
                                  f"(or names a part that does not exist)")


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
        self.step = own.step
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
            dtype = CODE_TO_TORCH[entry["dtype"]]
            # Every piece is checked against the entry before the whole tensor is allocated: the
            # pieces, whose sizes the parts' files bound, then tile exactly what is allocated.
            for p in entry["pieces"]:
                piece, want = read[p["part"]][name], list(entry["shape"])
                if p["dim"] is not None:
                    want[p["dim"]] = p["length"]
                if list(piece.shape) != want or piece.dtype != dtype:
                    raise CheckpointError(f"{self.path}: piece of {name!r} in part {p['part']} is "
                                          f"{piece.dtype} {tuple(piece.shape)}, the manifest says "
                                          f"{dtype} {tuple(want)}")
            full = torch.empty(entry["shape"], dtype=dtype)
            for p in entry["pieces"]:
                target = full if p["dim"] is None else full.narrow(p["dim"], p["offset"], p["length"])
                target.copy_(read[p["part"]][name])
            out[name] = full
        return out
