"""What `pyengine inspect DIR` reports: every checkpoint, verified, and which one restore
would use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pyengine.checkpoint import directory as ckdir
from pyengine.checkpoint.manifest import read_manifest, verify_files
from pyengine.checkpoint.sharded import read_sharded_manifest
from pyengine.errors import CheckpointError


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    bytes: int
    created_unix: float
    tensors: int
    error: str | None  # None when every file verifies

    @property
    def ok(self) -> bool:
        return self.error is None


def inspect_directory(root: str | Path) -> list[CheckpointInfo]:
    """Verifies every committed checkpoint in `root` (reads every byte); oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {root}")
    infos = []
    for step in ckdir.committed_steps(root):
        path = ckdir.step_dir(root, step)
        try:
            # A rank-sharded step holds one ordinary checkpoint per rank under a top manifest.
            doc = read_sharded_manifest(path)
            parts = [read_manifest(path / part) for part in doc["parts"]] if doc else [read_manifest(path)]
            for manifest in parts:
                verify_files(manifest)
            infos.append(CheckpointInfo(step, path, sum(m.total_bytes for m in parts),
                                        max(m.created_unix for m in parts), sum(len(m.tensors) for m in parts), None))
        except (CheckpointError, OSError) as e:
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            infos.append(CheckpointInfo(step, path, size, os.path.getmtime(path), 0, str(e)))
    return infos


def restore_candidate(infos: list[CheckpointInfo]) -> CheckpointInfo | None:
    """The checkpoint restore(step=None) would use: the newest that verifies."""
    return next((i for i in reversed(infos) if i.ok), None)
