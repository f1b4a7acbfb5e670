"""Storages that fail on purpose, for the fault-injection tests (as torchsnapshot's tests do):
the real file-system storage, except that one named operation raises once (or blocks)."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any, Optional

from pyengine.checkpoint.storage import FileSystemStorage

# Every operation the save path performs on storage, in the order a save performs them.
OPERATIONS = ("write_part", "finish_part", "write_manifest", "sync_dir", "rename", "prune")


class FaultyStorage(FileSystemStorage):
    """Raises OSError(EIO) once `fail_at` has run `skip` times, `times` times in a row
    (finish_part: after the part is on disk, as a failed fsync would)."""

    def __init__(self, root: Path, fail_at: str, times: int = 1, skip: int = 0) -> None:
        super().__init__(root)
        if fail_at not in OPERATIONS:
            raise ValueError(f"unknown operation {fail_at!r}; one of {OPERATIONS}")
        self.fail_at = fail_at
        self.left = times
        self.skip = skip

    def _fault(self, operation: str) -> None:
        if operation != self.fail_at:
            return
        if self.skip > 0:
            self.skip -= 1
        elif self.left > 0:
            self.left -= 1
            raise OSError(errno.EIO, f"injected failure in {operation}")

    def write_part(self, *args: Any, **kwargs: Any) -> int:
        self._fault("write_part")
        return super().write_part(*args, **kwargs)

    def finish_part(self, *args: Any, **kwargs: Any) -> None:
        super().finish_part(*args, **kwargs)
        self._fault("finish_part")

    def write_manifest(self, tmp: Path, data: bytes) -> None:
        self._fault("write_manifest")
        super().write_manifest(tmp, data)

    def sync_dir(self, path: Path) -> None:
        self._fault("sync_dir")
        super().sync_dir(path)

    def rename(self, src: Path, dst: Path) -> None:
        self._fault("rename")
        super().rename(src, dst)

    def prune(self, keep_last: int) -> list[int]:
        self._fault("prune")
        return super().prune(keep_last)


class StuckStorage(FileSystemStorage):
    """The part is written, but never reported durable: the process dies while it waits."""

    def finish_part(self, *args: Any, **kwargs: Any) -> None:
        super().finish_part(*args, **kwargs)
        threading.Event().wait()


def inject(ckpt: Any, storage: FileSystemStorage) -> None:
    """Makes a Checkpointer's saves go through `storage` from now on."""
    ckpt._engine.storage = storage
    ckpt._storage = storage


class SlowStorage(FileSystemStorage):
    """A stalled file system (an NFS server that answers late): each part is reported durable
    only `seconds` after it is, or, given `until`, `seconds` after that event is set (at most a
    minute), so a test's interruption always lands inside the stall however slow the machine."""

    def __init__(self, root: Path, seconds: float, until: Optional[threading.Event] = None) -> None:
        super().__init__(root)
        self.seconds = seconds
        self.until = until

    def finish_part(self, *args: Any, **kwargs: Any) -> None:
        super().finish_part(*args, **kwargs)
        if self.until is not None:
            self.until.wait(60.0)
        threading.Event().wait(self.seconds)
