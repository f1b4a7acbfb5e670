"""Durability on a POSIX file system: the one place that fsyncs and renames for checkpoints,
exported weights and datasets.

A file is durable once its bytes are fsynced; its *name* is durable only once the directory
that holds the entry is fsynced too (rename(2) and creat(2) change the directory, not the
file). Every helper here leaves both durable before it returns.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Makes the entries of directory `path` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: str | Path, data: bytes) -> None:
    """Creates `path` (it must not exist), writes `data` and fsyncs it. The caller fsyncs the
    directory (usually once, after all its files)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_durably(src: str | Path, dst: str | Path, *, replace: bool = False) -> None:
    """Renames src to dst and fsyncs the directories involved.

    replace=False uses rename(2), which refuses to replace a non-empty directory: an existing
    checkpoint step is never overwritten. replace=True replaces an existing file (os.replace).
    """
    (os.replace if replace else os.rename)(src, dst)
    dst_parent = Path(dst).absolute().parent
    fsync_dir(dst_parent)
    src_parent = Path(src).absolute().parent
    if src_parent != dst_parent:
        fsync_dir(src_parent)


def make_dirs_durably(path: str | Path) -> None:
    """Creates `path` and any missing parents, and makes each new entry durable in its parent."""
    path = Path(path).absolute()
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for created in reversed(missing):
        try:
            created.mkdir()
        except FileExistsError:
            if not created.is_dir():
                raise
        fsync_dir(created.parent)
