"""Where checkpoints live: the storage interface and its one implementation today, a local or
shared POSIX file system.

The save engine (save_engine.py) drives a storage through a fixed sequence, the same for a
world of one and of many:

    tmp = temp_dir(step, token)             DIR/step-N.tmp-<token>/ (removed when a writer next opens DIR)
    part = part_dir(tmp, rank, world, step) tmp itself in a world of one, else tmp/rank-R/step-N/
    begin_part(part)                        every rank
    id = write_part(writer, ..., part)      every rank: the C++ writer stages, writes shards
                                            (O_DIRECT), the part manifest, fsyncs them and part
    finish_part(writer, id, part, tmp)      every rank: waits until the part is durable, makes
                                            its directory entries durable up to tmp
    commit(tmp, step, top_manifest)         rank 0, once every part is durable: writes the top
                                            manifest (many ranks) LAST, fsyncs tmp, renames tmp
                                            to step-N, fsyncs DIR. A step is committed exactly
                                            when step-N exists; nothing else is ever loaded.
    abort(tmp)                              rank 0, when any rank failed
    prune(keep_last)                        rank 0, after a commit; a failure there is a warning

This class is the only checkpoint code that fsyncs, renames and deletes (through
pyengine.durable). Tests subclass it to inject a failure at any one operation.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from pyengine import durable
from pyengine.checkpoint import directory as ckdir
from pyengine.checkpoint.manifest import MANIFEST
from pyengine.checkpoint.sharded import part_name
from pyengine.checkpoint.step_reader import OpenStep, open_step
from pyengine.errors import CheckpointError


class FileSystemStorage:
    """Checkpoints of one directory. Reading needs only read access; every method that
    changes DIR is called only by the process that holds its writer lock (rank 0), except
    the part methods, which every rank of a save calls on its own part."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # ----------------------------------------------------------------------------- reading

    def steps(self) -> list[int]:
        """Committed steps, oldest first (not verified)."""
        return ckdir.committed_steps(self.root)

    def step_path(self, step: int) -> Path:
        return ckdir.step_dir(self.root, step)

    def open_step(self, step: int, rank: int, threads: int) -> OpenStep:
        return open_step(self.step_path(step), rank, threads)

    # ----------------------------------------------------------------------------- writing

    def create(self) -> None:
        """Creates DIR if missing, its entry in its parent made durable."""
        durable.make_dirs_durably(self.root)

    def remove_torn(self) -> list[str]:
        """Removes leftovers of saves that never committed (and of interrupted pruning); only the
        holder of the writer lock may, since they may be another writer's saves in flight."""
        return ckdir.remove_temp_dirs(self.root)

    def temp_dir(self, step: int, token: str) -> Path:
        return self.root / f"{ckdir.step_dir(self.root, step).name}.tmp-{token}"

    def part_dir(self, tmp: Path, rank: int, world: int, step: int) -> Path:
        return tmp if world == 1 else tmp / part_name(rank, ckdir.step_dir(self.root, step).name)

    def begin_part(self, part: Path) -> None:
        part.mkdir(parents=True, exist_ok=part.parent != self.root)

    def write_part(self, writer: Any, step: int, sources: list, state_json: str, sync_count: int,
                   part: Path) -> int:
        """Starts the C++ writer on this rank's part; returns its save id once sources[:sync_count]
        are staged (the rest are copied in the background)."""
        return int(writer.save(step, sources, state_json, sync_count, str(part)))

    def finish_part(self, writer: Any, save_id: int, part: Path, tmp: Path) -> None:
        """Waits until the part's files are durable (raises the writer's error), then the entries
        that lead to it (tmp/rank-R/step-N in tmp/rank-R, tmp/rank-R in tmp)."""
        writer.wait(save_id)
        at = part
        while at != tmp:
            self.sync_dir(at.parent)
            at = at.parent

    def commit(self, tmp: Path, step: int, top_manifest: bytes | None) -> Path:
        """Publishes a step whose parts are all durable. Raises with nothing committed: a failed
        rename leaves tmp (removed by abort), and a failure to make the rename durable moves the
        step back under its temp name first."""
        if top_manifest is not None:
            self.write_manifest(tmp, top_manifest)
            self.sync_dir(tmp)
        final = self.step_path(step)
        self.rename(tmp, final)
        try:
            self.sync_dir(self.root)
        except OSError:
            os.rename(final, tmp)  # not known to be durable: not committed
            raise
        return final

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def prune(self, keep_last: int) -> list[int]:
        """Removes committed steps beyond the newest `keep_last`; returns the steps removed. Each
        is renamed first (atomic), so a crash mid-delete leaves a temp dir, never a torn step."""
        steps = self.steps()
        doomed_steps = steps[:-keep_last] if keep_last > 0 else []
        for old in doomed_steps:
            doomed = self.temp_dir(old, f"prune-{uuid.uuid4().hex[:8]}")
            self.rename(self.step_path(old), doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        if doomed_steps:
            self.sync_dir(self.root)
        return doomed_steps

    def quarantine(self, step: int) -> Path:
        """Moves a step that failed verification aside (kept for inspection, never loaded)."""
        moved = ckdir.quarantine(self.root, step)
        self.sync_dir(self.root)
        return moved

    def close(self) -> None:
        """Nothing to release here (the writer lock is the Checkpointer's); an object store
        closes its client."""

    # ------------------------------------------------ the primitive operations (fault-injection points)

    def write_manifest(self, tmp: Path, data: bytes) -> None:
        durable.write_new_file(tmp / MANIFEST, data)

    def sync_dir(self, path: Path) -> None:
        durable.fsync_dir(path)

    def rename(self, src: Path, dst: Path) -> None:
        try:
            os.rename(src, dst)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise CheckpointError(f"{dst} already exists; it is never overwritten") from None
            raise
