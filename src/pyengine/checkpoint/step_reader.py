"""Opening one committed step for reading, whatever its layout: the plain layout a world of
one writes (the step is one part) or the rank-sharded one (sharded.py). Both give the saved
objects' encoded structure, the RNG tree, and read(names) -> verified CPU tensors."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Protocol

import torch

from pyengine.checkpoint.manifest import MANIFEST, read_manifest, read_tensors
from pyengine.checkpoint.sharded import ShardedStep, read_sharded_manifest
from pyengine.errors import CheckpointError


class OpenStep(Protocol):
    step: int  # from the manifest, not the directory's name (an integration may name it otherwise)
    objects: dict[str, Any]
    rng: Any

    def read(self, names: list[str]) -> dict[str, torch.Tensor]: ...


class PlainStep:
    """A step written by a world of one."""

    def __init__(self, step_path: Path, threads: int) -> None:
        manifest = read_manifest(step_path)
        state = manifest.state
        if not isinstance(state, dict) or not isinstance(state.get("objects"), dict):
            raise CheckpointError(f"{step_path / MANIFEST} has no saved objects")
        self.step = manifest.step
        self.objects: dict[str, Any] = state["objects"]
        self.rng = state.get("rng")
        self.read = functools.partial(read_tensors, manifest, threads=threads)


def open_step(step_path: Path, rank: int, threads: int) -> OpenStep:
    """Opens a committed step for rank `rank` of the reading world (per-rank entries come
    from that rank's part). Raises CheckpointError when a manifest fails verification."""
    doc = read_sharded_manifest(step_path)
    if doc is not None:
        return ShardedStep(step_path, doc, rank, threads)
    return PlainStep(step_path, threads)
