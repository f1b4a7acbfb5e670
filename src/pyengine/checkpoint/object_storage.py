"""Checkpoints in S3-compatible object storage, behind the storage interface the save engine
drives (storage.py), with the same verified format: `Checkpointer("s3://bucket/prefix")`.

    PREFIX/step-00001200/manifest.json         the commit marker, PUT LAST: a step is committed
                                               exactly when it exists (and only verified steps load)
    PREFIX/step-00001200/shard-*.safetensors   a world of one: its part's shards
    PREFIX/step-00001200/rank-R/step-00001200/ a world of many: each rank's part (shards + part
                                               manifest), as in the local layout (sharded.py)
    PREFIX/.pyengine-writer.lease              the writer's lease (writer_lease.py)

Saving. An object store has no rename, so nothing is written under a temporary name: the
C++ writer writes the part, unchanged, into a local spool directory (local_spool.py; memory
when it has room), and finish_part uploads its files straight to their final names, every
file at once in parallel multipart parts, then removes them from the spool. commit() PUTs the
marker (the part manifest in a world of one, the top manifest in a world of many) only once
every rank's upload has completed. Objects of a step without a marker are never listed or
loaded; a failed save deletes them (marker first), and whatever a killed writer left (its
objects, its unfinished multipart uploads) is deleted by the next writer that takes the lease,
as FileSystemStorage.remove_torn does. Pruning deletes the marker first, then the objects,
only after a newer step is committed. The spool's fsyncs (the writer's) are cheap in memory
and not needed for durability, which the upload's completion gives.

Reading. A step's objects are downloaded (large ones by parallel ranged GETs) into a spool
directory, which the existing reader opens and verifies (manifest envelope, sizes, CRC32C);
it is removed when the opened step is dropped. Every rank of a reading world downloads the
whole step. A missing object is damage (CheckpointError, so restore falls back to an older
step); an unreachable or refusing server is not (its OSError is raised).

Errors, retries and credentials: object_store.py. One writer per prefix: writer_lease.py.
"""

from __future__ import annotations

import contextlib
import re
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyengine.checkpoint import directory as ckdir
from pyengine.checkpoint.local_spool import LocalSpool, remove_quietly
from pyengine.checkpoint.manifest import MANIFEST
from pyengine.checkpoint.object_store import ObjectInfo, S3Options, S3Store
from pyengine.checkpoint.sharded import part_name
from pyengine.checkpoint.step_reader import OpenStep, open_step
from pyengine.checkpoint.writer_lease import LEASE_NAME, WriterLease
from pyengine.errors import CheckpointError

_SPOOL_LABEL = Path("spool")  # the save engine's temp paths live under this name; see _local()


def is_object_url(location: Any) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


@dataclass(frozen=True)
class ObjectPath:
    """Where a step lives in the object store, where a Path would name a local one."""

    url: str

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url


class ObjectStorage:
    """Checkpoints under one s3:// prefix. Reading needs only read access; the writing methods
    are called only by the holder of the writer lease (rank 0), except the part methods, which
    every rank calls on its own part. The training thread calls write_part; the commit thread
    finish_part, commit, abort and prune."""

    def __init__(self, url: str, options: S3Options | Mapping[str, Any] | None = None) -> None:
        self.options = options if isinstance(options, S3Options) else S3Options.from_mapping(options)
        self.store = S3Store(url, self.options)
        self.root = self.store.url
        self._spool = LocalSpool(self.options.spool_dir)
        self._spooled: dict[str, Path] = {}  # a save's temp name -> its local directory
        self._lease: WriterLease | None = None

    # ----------------------------------------------------------------------------- reading

    def steps(self) -> list[int]:
        """Committed steps (those whose marker exists), oldest first (not verified)."""
        return sorted(int(m.group(1)) for m in map(_MARKER.match, (o.name for o in self.store.list_objects())) if m)

    def step_path(self, step: int) -> ObjectPath:
        return ObjectPath(self.store.url_of(_step_name(step)))

    def step_objects(self, step: int) -> list[ObjectInfo]:
        return self.store.list_objects(f"{_step_name(step)}/")

    def open_step(self, step: int, rank: int, threads: int) -> OpenStep:
        local = self.fetch_step(step)
        try:
            return _FetchedStep(open_step(local, rank, threads), local, self.step_path(step).url, self)
        except CheckpointError as e:
            remove_quietly(local)
            raise CheckpointError(str(e).replace(str(local), self.step_path(step).url)) from None
        except BaseException:
            remove_quietly(local)
            raise

    def fetch_step(self, step: int) -> Path:
        """Downloads a committed step into a new local directory (the caller removes it)."""
        name = _step_name(step)
        objects = self.step_objects(step)
        if not any(o.name == f"{name}/{MANIFEST}" for o in objects):
            raise CheckpointError(f"{self.store.url_of(name)}/{MANIFEST} is missing: the step was never committed "
                                  "(or is being pruned)")
        # Only names the format has: nothing else is read, and a key such as "step-N/../x" must
        # not name a local path outside the copy.
        wanted = [o for o in objects if _STEP_FILE.match(o.name[len(name) + 1:])]
        local = self._spool.new_directory(f"{name}.read-{uuid.uuid4().hex[:8]}", sum(o.bytes for o in wanted))
        pairs = [(o.name, local / o.name[len(name) + 1:]) for o in wanted]
        for _, path in pairs:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.store.download(pairs)
        except FileNotFoundError as e:
            remove_quietly(local)
            raise CheckpointError(f"{e.strerror}: the checkpoint is incomplete") from None
        except BaseException:
            remove_quietly(local)
            raise
        return local

    # ----------------------------------------------------------------------------- writing

    def create(self) -> None:
        """Checks that the bucket exists and can be reached (prefixes need no creating)."""
        self.store.check_bucket()

    def writer_lease(self) -> WriterLease:
        """The writer lock of this prefix; commit() renews it before each marker."""
        if self._lease is None:
            self._lease = WriterLease(self.store, self.options.lease_seconds)
        return self._lease

    def remove_torn(self) -> list[str]:
        """Deletes what saves that never committed left: unfinished multipart uploads and the
        objects of steps without a marker. Only the lease holder may: they may be its own."""
        for name, upload_id in self.store.unfinished_uploads():
            if ckdir.STEP_DIR.match(name.split("/", 1)[0]):
                self.store.abort_upload(name, upload_id)
        by_step: dict[str, list[str]] = {}
        for o in self.store.list_objects():
            top = o.name.split("/", 1)[0]
            if ckdir.STEP_DIR.match(top) and "/" in o.name:
                by_step.setdefault(top, []).append(o.name)
        torn = sorted(top for top, names in by_step.items() if f"{top}/{MANIFEST}" not in names)
        if torn:
            self.delete([name for top in torn for name in by_step[top]])
        return torn

    def temp_dir(self, step: int, token: str) -> Path:
        return _SPOOL_LABEL / f"{_step_name(step)}.tmp-{token}"

    def part_dir(self, tmp: Path, rank: int, world: int, step: int) -> Path:
        return tmp if world == 1 else tmp / part_name(rank, _step_name(step))

    def begin_part(self, part: Path) -> None:
        pass  # the local directory is made by write_part, once the part's size is known

    def write_part(self, writer: Any, step: int, sources: list, state_json: str, sync_count: int,
                   part: Path) -> int:
        """Starts the C++ writer on this rank's part, in a new spool directory; returns its save id
        once sources[:sync_count] are staged."""
        tmp_name = part.relative_to(_SPOOL_LABEL).parts[0]
        if tmp_name not in self._spooled:
            self._spooled[tmp_name] = self._spool.new_directory(tmp_name, sum(int(s.nbytes) for s in sources))
        local = self._local(part)
        local.mkdir(parents=True, exist_ok=True)
        return int(writer.save(step, sources, state_json, sync_count, str(local)))

    def finish_part(self, writer: Any, save_id: int, part: Path, tmp: Path) -> None:
        """Waits for the writer, then uploads the part's files (all but a world of one's manifest,
        the commit marker) and removes them from the spool."""
        local_tmp, local_part = self._local(tmp), self._local(part)
        marker = local_tmp / MANIFEST if part == tmp else None
        files: list[Path] = []
        try:
            writer.wait(save_id)
            step_name = _step_of(tmp)
            files = sorted(f for f in local_part.rglob("*") if f.is_file() and f != marker)
            self.upload([(f, f"{step_name}/{f.relative_to(local_tmp).as_posix()}") for f in files])
        except OSError as e:
            raise type(e)(e.errno, f"checkpoint step {int(_step_of(tmp)[5:])} was not committed; older "
                                   f"checkpoints are intact. {e.strerror}") from None
        finally:
            if marker is None:
                self._drop_local(tmp)  # a world of many: no file of this rank's is needed any more
            else:
                for f in files:
                    f.unlink(missing_ok=True)

    def commit(self, tmp: Path, step: int, top_manifest: bytes | None) -> ObjectPath:
        """Publishes a step whose parts are all uploaded: renews the lease, then PUTs the marker."""
        if self._lease is not None:
            self._lease.confirm()
        data = top_manifest if top_manifest is not None else (self._local(tmp) / MANIFEST).read_bytes()
        try:
            self.put_marker(f"{_step_name(step)}/{MANIFEST}", data)
        except OSError as e:
            raise type(e)(e.errno, f"checkpoint step {step} is not known to be committed: its commit marker could not "
                                   f"be written ({e.strerror}). Older checkpoints are intact") from None
        self._drop_local(tmp)
        return self.step_path(step)

    def abort(self, tmp: Path) -> None:
        """Deletes a failed save's objects, marker first, and its spool; a failure to delete leaves
        them to the next writer's remove_torn (they are never loaded: no marker)."""
        self._drop_local(tmp)
        with contextlib.suppress(OSError):
            self._delete_step(_step_of(tmp))

    def prune(self, keep_last: int) -> list[int]:
        """Deletes committed steps beyond the newest `keep_last`, each marker first (a crash
        midway leaves objects without a marker, never a listed torn step)."""
        steps = self.steps()
        doomed = steps[:-keep_last] if keep_last > 0 else []
        for old in doomed:
            self._delete_step(_step_name(old))
        return doomed

    def quarantine(self, step: int) -> ObjectPath:
        """Copies a step that failed verification to step-N.corrupt-<id>/ (kept, never loaded), then
        deletes it, marker first."""
        name = _step_name(step)
        aside = f"{name}.corrupt-{uuid.uuid4().hex[:8]}"
        for o in self.step_objects(step):
            self.store.copy(o.name, aside + o.name[len(name):])
        self._delete_step(name)
        return ObjectPath(self.store.url_of(aside))

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------ the primitive operations (fault-injection points)

    def upload(self, files: list[tuple[Path, str]]) -> None:
        self.store.upload(files, progress=self.upload_progress)

    def upload_progress(self, nbytes: int) -> None:
        """Called from transfer threads as parts go up (a hook for tests)."""

    def put_marker(self, name: str, data: bytes) -> None:
        self.store.put(name, data)

    def delete(self, names: list[str]) -> None:
        self.store.delete(names)

    # ------------------------------------------------------------------------------ helpers

    def _delete_step(self, step_name: str) -> None:
        marker = f"{step_name}/{MANIFEST}"
        self.delete([marker])
        rest = [o.name for o in self.store.list_objects(f"{step_name}/") if o.name != marker]
        if rest:
            self.delete(rest)

    def _local(self, path: Path) -> Path:
        """The spool directory that holds the save engine's temp path `path`."""
        rel = path.relative_to(_SPOOL_LABEL)
        return self._spooled[rel.parts[0]].joinpath(*rel.parts[1:])

    def _drop_local(self, tmp: Path) -> None:
        local = self._spooled.pop(tmp.name, None)
        if local is not None:
            remove_quietly(local)

    def __repr__(self) -> str:
        return f"ObjectStorage({self.root!r})"


_MARKER = re.compile(rf"^step-(\d+)/{re.escape(MANIFEST)}$")
# A step's files, relative to it: a world of one's, or those of a rank's part (sharded.py).
_STEP_FILE = re.compile(rf"^(rank-\d{{5}}/step-\d{{8}}/)?"
                        rf"({re.escape(MANIFEST)}|shard-\d{{5}}-of-\d{{5}}\.safetensors)$")


def _step_name(step: int) -> str:
    return ckdir.step_dir(Path(), step).name  # the local layout's name, so both stores name steps alike


def _step_of(tmp: Path) -> str:
    return tmp.name.split(".tmp-", 1)[0]


class _FetchedStep:
    """An opened step read from its downloaded copy, which is removed when this is dropped.
    Errors name the object's URL, not the local copy. It keeps its storage alive, whose spool
    directory (removed with the storage) holds the copy."""

    def __init__(self, opened: OpenStep, local: Path, url: str, storage: ObjectStorage) -> None:
        self.step = opened.step
        self.objects = opened.objects
        self.rng = opened.rng
        self._opened = opened
        self._local = local
        self._url = url
        self._storage = storage
        weakref.finalize(self, remove_quietly, local)

    def read(self, names: list[str]) -> dict[str, Any]:
        try:
            return self._opened.read(names)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(str(self._local), self._url)) from None


__all__ = ["LEASE_NAME", "ObjectPath", "ObjectStorage", "is_object_url"]
