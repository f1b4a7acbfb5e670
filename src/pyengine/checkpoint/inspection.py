"""What `pyengine inspect DIR` reports: every checkpoint, verified, and which one restore
would use. DIR may be an object-store URL (s3://bucket/prefix): each committed step is then
downloaded into a local spool directory and verified there, the same way."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from pyengine.checkpoint import directory as ckdir
from pyengine.checkpoint.local_spool import remove_quietly
from pyengine.checkpoint.manifest import read_manifest, verify_files
from pyengine.checkpoint.object_storage import ObjectPath, ObjectStorage, is_object_url
from pyengine.checkpoint.sharded import read_sharded_manifest
from pyengine.errors import CheckpointError


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Union[Path, ObjectPath]
    bytes: int
    created_unix: float
    tensors: int
    error: str | None  # None when every file verifies

    @property
    def ok(self) -> bool:
        return self.error is None


def inspect_directory(root: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> list[CheckpointInfo]:
    """Verifies every committed checkpoint in `root` (reads every byte); oldest first.

    Raises:
        FileNotFoundError: no such directory (or bucket).
        OSError: an object store could not be reached or refused access (PermissionError).
    """
    if is_object_url(root):
        storage = ObjectStorage(str(root), storage_options)
        try:
            return _inspect_object_store(storage)
        finally:
            storage.close()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {root}")
    infos = []
    for step in ckdir.committed_steps(root):
        path = ckdir.step_dir(root, step)
        try:
            infos.append(_verified(step, path, path))
        except (CheckpointError, OSError) as e:
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            infos.append(CheckpointInfo(step, path, size, os.path.getmtime(path), 0, str(e)))
    return infos


def _inspect_object_store(storage: ObjectStorage) -> list[CheckpointInfo]:
    storage.create()  # a missing bucket is an error, not an empty listing
    infos = []
    for step in storage.steps():
        where = storage.step_path(step)
        try:
            local = storage.fetch_step(step)
        except CheckpointError as e:  # an object went missing; an unreachable server raises instead
            infos.append(_damaged(storage, step, str(e)))
            continue
        try:
            infos.append(_verified(step, local, where))
        except CheckpointError as e:
            infos.append(_damaged(storage, step, str(e).replace(str(local), where.url)))
        finally:
            remove_quietly(local)
    return infos


def _verified(step: int, path: Path, where: Union[Path, ObjectPath]) -> CheckpointInfo:
    # A rank-sharded step holds one ordinary checkpoint per rank under a top manifest.
    doc = read_sharded_manifest(path)
    parts = [read_manifest(path / part) for part in doc["parts"]] if doc else [read_manifest(path)]
    for manifest in parts:
        verify_files(manifest)
    return CheckpointInfo(step, where, sum(m.total_bytes for m in parts), max(m.created_unix for m in parts),
                          sum(len(m.tensors) for m in parts), None)


def _damaged(storage: ObjectStorage, step: int, error: str) -> CheckpointInfo:
    objects = storage.step_objects(step)
    return CheckpointInfo(step, storage.step_path(step), sum(o.bytes for o in objects),
                          max((o.modified_unix for o in objects), default=0.0), 0, error)


def restore_candidate(infos: list[CheckpointInfo]) -> CheckpointInfo | None:
    """The checkpoint restore(step=None) would use: the newest that verifies."""
    return next((i for i in reversed(infos) if i.ok), None)
