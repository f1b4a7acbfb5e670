"""The checkpoint directory: naming of committed and temporary step directories,
listing, clean-up of torn saves, and the lock that keeps one writer per directory.

    DIR/step-00001200/               committed (only these are ever loaded)
    DIR/step-00001300.tmp-<id>/      in flight, torn, or being pruned: removed on open
    DIR/step-00001100.corrupt-<t>/   failed verification on restore: kept for inspection
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
from pathlib import Path

from pyengine.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")
LOCK_FILE = ".pyengine-writer.lock"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def committed_steps(root: Path) -> list[int]:
    """Steps of committed checkpoints, oldest first. A missing directory has none."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    steps = [int(m.group(1)) for m in map(STEP_DIR.match, names) if m and (root / m.group(0)).is_dir()]
    return sorted(steps)


def committed_step_dir(root: Path, step: int | None) -> Path:
    """The directory of committed `step` under `root` (the newest when None), or `root` itself
    when it is a step directory (holds a manifest): what a reader given either path opens.

    Raises:
        CheckpointError: `root` holds no committed checkpoint, or none for `step`.
    """
    if (root / "manifest.json").exists():
        return root
    steps = committed_steps(root)
    if not steps:
        raise CheckpointError(f"{root} holds no committed checkpoint (no step-N directory): check the path, "
                              "or save one first")
    if step is not None and step not in steps:
        raise CheckpointError(f"{root} has no committed step {step}; it holds {steps}")
    return step_dir(root, steps[-1] if step is None else step)


def remove_temp_dirs(root: Path) -> list[str]:
    """Removes leftovers of saves that never committed (and of interrupted pruning)."""
    removed = []
    for name in os.listdir(root):
        if name.startswith("step-") and ".tmp-" in name:
            shutil.rmtree(root / name, ignore_errors=True)
            removed.append(name)
    return removed


def quarantine(root: Path, step: int) -> Path:
    """Moves a checkpoint that failed verification aside, so it is neither loaded nor
    pruned, and a new save of the same step cannot collide with it. Nothing is deleted."""
    src = step_dir(root, step)
    base, attempt = f"{src.name}.corrupt-{int(time.time())}", 0
    while True:
        # The same step may fail twice within a second (saved again after the first failure).
        dst = root / (base if attempt == 0 else f"{base}-{attempt}")
        try:
            os.rename(src, dst)
            return dst
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        attempt += 1


class WriterLock:
    """An advisory lock (flock) that one Checkpointer holds while it may write DIR.
    The kernel drops it when the process dies, even by SIGKILL, so a crash never leaves
    a stale lock behind."""

    def __init__(self, root: Path, *, on_directory: bool = False) -> None:
        """`on_directory`: lock the directory itself instead of a lock file in it, for
        directories that are not ours to add a file to (Lightning's holds the user's files)."""
        if on_directory:
            self._path, self._flags = root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        else:
            self._path, self._flags = root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self._path, self._flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)  # never leak the descriptor, whatever flock raised
            raise
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
