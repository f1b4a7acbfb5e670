"""Lightning's checkpoints written by pyengine: asynchronous, atomic, checksummed, never pickled.

    import lightning as L
    from pyengine.integrations.lightning import PyEngineCheckpointIO

    trainer = L.Trainer(plugins=[PyEngineCheckpointIO()], callbacks=[
        L.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=100, save_last=True)])
    trainer.fit(model, train_dataloaders=pe.data.Loader(dataset, batch_size=256), ckpt_path="last")

Layout: the path Lightning names (`epoch=1-step=20.ckpt`, `last.ckpt`) is a directory holding
one committed pyengine checkpoint, the files of a `pe.Checkpointer` step: shard-*.safetensors
and manifest.json, written last. Lightning's checkpoint dict is stored as it is, under its own
keys (tensors in the shards, everything else as JSON in the manifest), with the RNG states.

Commit protocol, per path:
- a save is written into a hidden sibling `.NAME.pyengine-tmp-<id>/` by the C++ writer threads
  and renamed to NAME once its files are durable; save_checkpoint() returns after the snapshot;
- a save to a path that exists (ModelCheckpoint(save_last=True) rewrites last.ckpt each time)
  is swapped in by one atomic rename (Linux renameat2 RENAME_EXCHANGE), so the path always
  holds a whole checkpoint, the old one or the new one;
- remove_checkpoint() of a path waits, without blocking training, for the saves made before it:
  ModelCheckpoint removes the previous best right after saving the new one, and that save may
  still be in flight. Should it fail, the old checkpoint is kept;
- leftovers of a killed process are cleaned up when a writer next saves into the directory,
  which it holds with an flock on the directory itself (no lock file among the checkpoints).

Data position: `pe.data.Loader` has state_dict() / load_state_dict(), so Lightning stores its
cursor (epoch, next batch) in checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
and puts it back on resume: a run resumed mid-epoch sees exactly the batches it would have seen.

Limits: `LightningModule.load_from_checkpoint()` reads with torch.load, not through the plugin;
use `trainer.validate/test(model, ckpt_path=...)`, or `PyEngineCheckpointIO().load_checkpoint(path)`
and `model.load_state_dict(checkpoint["state_dict"])`. With ModelCheckpoint(save_last="link"),
Lightning links last.ckpt to a save that may still be in flight: a crash before it commits leaves
the link dangling, and fit(ckpt_path="last") then finds no last checkpoint and starts afresh;
save_last=True (a copy, swapped in atomically) has no such window. Local or mounted file systems only.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import numbers
import os
import re
import shutil
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

try:
    from lightning.fabric.plugins import CheckpointIO
    from lightning_utilities.core.apply_func import apply_to_collection
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        'pyengine.integrations.lightning needs Lightning: pip install "pyengine[lightning]" (lightning>=2.2)'
    ) from e

from pyengine import durable
from pyengine.checkpoint import directory as ckdir
from pyengine.checkpoint import exit_saves
from pyengine.checkpoint.coordinator import LocalCoordinator
from pyengine.checkpoint.rng import restore_rng_state
from pyengine.checkpoint.save_engine import SaveEngine, SaveHandle
from pyengine.checkpoint.state_codec import StateEncoder, UnstorableValueError, decode, tensor_names
from pyengine.checkpoint.step_reader import open_step
from pyengine.errors import CheckpointError

__all__ = ["CheckpointRemovalWarning", "PyEngineCheckpointIO"]


class CheckpointRemovalWarning(UserWarning):
    """A checkpoint Lightning asked to remove was kept: a save before the removal failed, or deleting failed."""


class PyEngineCheckpointIO(CheckpointIO):
    """A Lightning CheckpointIO plugin that saves through pyengine's asynchronous checkpoint engine.

    Concurrency: Lightning calls every method from its main thread; saves and removals come
    from global rank 0 only, loads from every rank. Saves are persisted by C++ threads, at
    most `max_in_flight` at once (a further save waits). A save's error is raised by the next
    save_checkpoint(), remove_checkpoint(), load_checkpoint() or teardown(); Lightning calls
    teardown() at the end of every fit / validate / test, which waits until every save is
    durable. A save made after that (trainer.save_checkpoint) starts the engine again, and one
    still in flight when the interpreter exits normally is finished first.

    Args:
        rng: store the torch, numpy and Python RNG states with every checkpoint and restore them
            in load_checkpoint(), which Lightning calls just before it resumes, so a model with
            dropout resumes bit for bit (unless something draws random numbers between the load
            and the first training step: a torch DataLoader's iterator does, a pe.data.Loader not).
        max_in_flight: saves that may be persisting at once. ModelCheckpoint(save_last=True) saves
            the same state twice per event (the top-k file and last.ckpt): 2 lets both overlap
            training.
        max_shards, copy_threads, background_nice: as for `pe.Checkpointer`.
        read_threads: threads that read and verify a checkpoint's shards.
    """

    def __init__(self, *, rng: bool = True, max_in_flight: int = 2, max_shards: int = 4, copy_threads: int = 2,
                 read_threads: int = 4, background_nice: int = 10) -> None:
        for name, value, low in (("max_in_flight", max_in_flight, 1), ("max_shards", max_shards, 1),
                                 ("copy_threads", copy_threads, 1), ("read_threads", read_threads, 1),
                                 ("background_nice", background_nice, 0)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if background_nice > 19:
            raise ValueError(f"background_nice must be in 0..19 (a nice increment), got {background_nice}")
        self.rng = bool(rng)
        self.max_in_flight = int(max_in_flight)
        self.read_threads = int(read_threads)
        self._writer_options = dict(max_shards=max_shards, copy_threads=copy_threads, staging_cap_bytes=0,
                                    background_nice=background_nice)
        self._storage = _PathStorage()
        self._engine: Optional[SaveEngine] = None
        self._in_flight: list[SaveHandle] = []  # not yet reported
        self._claims: dict[Path, _DirectoryClaim] = {}
        exit_saves.finish_at_exit(self, "teardown", "Lightning checkpoint")

    # ------------------------------------------------------------------------ CheckpointIO

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Union[str, os.PathLike],
                        storage_options: Optional[Any] = None) -> None:
        """Snapshots `checkpoint` and writes it to the directory `path` in the background.

        Raises:
            TypeError: a value that cannot be stored without pickling (named by its key path),
                or storage_options were given; nothing is written and nothing saved is touched.
            CheckpointError / OSError: an earlier save failed, or another process writes
                checkpoints into the same directory.
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options (got {storage_options!r})")
        _check_storable(checkpoint)
        target = _local_path(path)
        self._settle()
        self._claim(target.parent)
        step = checkpoint.get("global_step")
        step = step if isinstance(step, int) and step >= 0 else 0  # the manifest's step
        self._storage.aim(target)
        handle = self._running_engine().save(step, checkpoint, capture_rng=self.rng, overlap=False)
        self._in_flight.append(handle)

    def load_checkpoint(self, path: Union[str, os.PathLike], map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Reads and verifies the checkpoint at `path` (waiting for saves in flight first).

        Nothing is unpickled, whatever `weights_only` says. With rng=True the saved RNG states
        are restored. `map_location` may be None (tensors on the CPU), a device or its name.

        Raises:
            CheckpointError: `path` is not a pyengine checkpoint (e.g. a torch.save file), or a
                file fails verification (the error names it).
            FileNotFoundError: nothing at `path`.
        """
        self.wait()
        source = _local_path(path)
        if not source.exists():
            raise FileNotFoundError(errno.ENOENT, "no checkpoint at this path", str(source))
        if not source.is_dir():
            raise CheckpointError(
                f"{source} is a file, not a pyengine checkpoint directory: it was probably written by torch.save "
                "(Lightning's default TorchCheckpointIO). PyEngineCheckpointIO never unpickles; load it without this "
                "plugin, or resume from a checkpoint that PyEngineCheckpointIO wrote.")
        opened = open_step(source, rank=0, threads=self.read_threads)
        tensors = opened.read(tensor_names([opened.objects, opened.rng]))
        checkpoint = decode(opened.objects, tensors)
        if self.rng and opened.rng is not None:
            restore_rng_state(decode(opened.rng, tensors))
        return _moved(checkpoint, map_location)

    def remove_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Removes the checkpoint at `path` once every save made before this call is committed:
        at once when none is in flight, else by the commit thread, right after the last of them
        commits; kept, with a warning, if one of them fails."""
        target = _local_path(path)
        self._settle()
        self._storage.remove_after_saves_in_flight(target)

    def teardown(self) -> None:
        """Waits until every save is durable and every removal done, then releases the
        directories; raises the first save error not raised yet."""
        try:
            self.wait()
        finally:
            if self._engine is not None:
                self._engine.close()
                self._engine = None
            for claim in self._claims.values():
                claim.release()
            self._claims.clear()

    # ------------------------------------------------------------------------ pyengine's own

    def wait(self) -> None:
        """Blocks until every save is durable and every requested removal is done; raises the
        first save error not raised yet."""
        try:
            if self._engine is not None:
                self._engine.wait()
        finally:
            self._settle()

    def _settle(self) -> None:
        """Reports what finished in the background: removals that were not carried out (as
        warnings) and the first failed save (raised)."""
        for problem in self._storage.take_problems():
            warnings.warn(problem, CheckpointRemovalWarning, stacklevel=3)
        done = {id(h) for h in self._in_flight if h.done()}  # asked once: a save may finish meanwhile
        finished = [h for h in self._in_flight if id(h) in done]
        self._in_flight = [h for h in self._in_flight if id(h) not in done]
        for handle in finished:
            handle.wait()  # raises a failure once (the engine marks it reported)

    def _running_engine(self) -> SaveEngine:
        if self._engine is None:
            # _PathStorage has every method the engine calls on a FileSystemStorage (keep_last=0: no prune).
            self._engine = SaveEngine(self._storage, LocalCoordinator(), keep_last=0,  # type: ignore[arg-type]
                                      max_in_flight=self.max_in_flight, writer_options=self._writer_options)
        return self._engine

    def _claim(self, directory: Path) -> None:
        if directory not in self._claims:
            durable.make_dirs_durably(directory)
            self._claims[directory] = _DirectoryClaim(directory)

    def __del__(self) -> None:
        # A plugin dropped without teardown() still finishes its saves and frees its directories.
        if getattr(self, "_engine", None) is not None or getattr(self, "_claims", None):
            try:
                self.teardown()
            except Exception as e:  # noqa: BLE001 - nothing can be raised from __del__
                print(f"pyengine: a Lightning checkpoint save failed when its plugin was dropped: {e}",
                      file=sys.stderr)


# ------------------------------------------------------------------------------ what is stored

def _check_storable(checkpoint: Mapping[str, Any]) -> None:
    """Refuses, before anything is written, a value pyengine cannot store without pickling,
    naming where it is (checkpoint['hyper_parameters']['tokenizer']). The rule is the encoder's
    own: a dry run of it (it walks the values and records tensor names, copying nothing)."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a Lightning checkpoint is a dict, got {type(checkpoint).__qualname__}")
    for key in checkpoint:
        if not isinstance(key, str) or key.startswith("__"):
            raise TypeError(f"cannot store checkpoint key {key!r}: top-level keys must be strings that do not "
                            "start with '__' (pyengine keeps those for itself); nothing was saved")
    try:
        StateEncoder().encode(checkpoint, ())
    except UnstorableValueError as e:
        where = "".join(" (a key)" if part == "<key>" else f"[{part!r}]" for part in e.path)
        raise _refusal(where, e.what) from None


def _refusal(where: str, what: str) -> TypeError:
    if where.startswith("['hyper_parameters']"):
        hint = ("Keep the object out of the hyper-parameters (self.save_hyperparameters(ignore=[...])) or pass a "
                "plain description of it (a name, its arguments).")
    else:
        hint = "Convert it to plain data in on_save_checkpoint (a state_dict, its arguments) or leave it out."
    return TypeError(f"cannot store checkpoint{where}: it is {what}. PyEngineCheckpointIO stores tensors, numpy "
                     "arrays and plain values (dict, list, tuple, str, int, float, bool, None) and never pickles, so "
                     f"nothing was saved and the checkpoints already saved are untouched. {hint}")


def _moved(checkpoint: dict[str, Any], map_location: Any) -> dict[str, Any]:
    if map_location is None:
        return checkpoint
    if isinstance(map_location, (str, torch.device)):
        device = torch.device(map_location)
        if device.type == "cpu":
            return checkpoint
        return apply_to_collection(checkpoint, torch.Tensor, lambda t: t.to(device))
    raise TypeError(f"map_location must be None, a torch.device or a device name for PyEngineCheckpointIO, got "
                    f"{type(map_location).__qualname__} (tensors are read into CPU memory, then moved)")


def _local_path(path: Union[str, os.PathLike]) -> Path:
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"PyEngineCheckpointIO writes to local or mounted file systems, got {text!r}")
    return Path(text.removeprefix("file://")).absolute()


# ------------------------------------------------------------------------------ the files

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.pyengine-(?P<kind>tmp|replaced|removed)-[0-9a-f-]+$")


def _hidden(final: Path, kind: str, token: str) -> Path:
    """A sibling of `final` that Lightning never lists (no .ckpt suffix) and a writer cleans up."""
    return final.parent / f".{final.name}.pyengine-{kind}-{token}"


class _PathStorage:
    """The save engine's storage (the sequence it drives is in pyengine/checkpoint/storage.py)
    for saves that each name their final path, in a world of one, and the removals that wait
    for them.

    The training thread calls aim() (the next save's path, just before the engine asks for its
    temp dir), temp_dir(), step_path(), begin_part(), write_part() and
    remove_after_saves_in_flight(); the engine's one commit thread calls finish_part(),
    commit() and abort(), for the saves in the order they were made. `_lock` guards the saves
    in flight and the waiting removals, which both threads change.
    """

    def __init__(self) -> None:
        self._aimed: Optional[Path] = None
        self._lock = threading.Lock()
        self._finals: dict[Path, Path] = {}  # temp dir -> final path, per save not yet committed or aborted
        self._removals: list[tuple[Path, set[Path]]] = []  # a path, and the temp dirs of the saves it waits for
        self._problems: list[str] = []  # removals not carried out, for the training thread to report

    def aim(self, final: Path) -> None:
        with self._lock:  # a removal asked for before this save must not delete what it writes
            self._removals = [(path, waits) for path, waits in self._removals if path != final]
        self._aimed = final

    def temp_dir(self, step: int, token: str) -> Path:
        assert self._aimed is not None
        tmp = _hidden(self._aimed, "tmp", token)
        with self._lock:
            self._finals[tmp] = self._aimed
        return tmp

    def step_path(self, step: int) -> Path:
        assert self._aimed is not None
        return self._aimed

    def part_dir(self, tmp: Path, rank: int, world: int, step: int) -> Path:
        return tmp

    def begin_part(self, part: Path) -> None:
        part.mkdir()

    def write_part(self, writer: Any, step: int, sources: list, state_json: str, sync_count: int,
                   part: Path) -> int:
        return int(writer.save(step, sources, state_json, sync_count, str(part)))

    def finish_part(self, writer: Any, save_id: int, part: Path, tmp: Path) -> None:
        writer.wait(save_id)  # the writer fsyncs every file and the directory

    def commit(self, tmp: Path, step: int, top_manifest: Optional[bytes]) -> Path:
        final = self._finals[tmp]
        _publish(tmp, final)
        self._decided(tmp, committed=True)
        return final

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        self._decided(tmp, committed=False)

    def prune(self, keep_last: int) -> list[int]:
        return []  # Lightning decides what to remove (remove_checkpoint)

    def remove_after_saves_in_flight(self, path: Path) -> None:
        with self._lock:
            if self._finals:
                self._removals.append((path, set(self._finals)))
                return
        _remove(path)

    def take_problems(self) -> list[str]:
        with self._lock:
            problems, self._problems = self._problems, []
        return problems

    def _decided(self, tmp: Path, committed: bool) -> None:
        """A save is committed or failed: the removals that waited for it (and for nothing else
        any more) are carried out, or, after a failure, dropped."""
        with self._lock:
            self._finals.pop(tmp, None)
            due, waiting = [], []
            for path, waits in self._removals:
                if tmp not in waits:
                    waiting.append((path, waits))
                elif not committed:
                    self._problems.append(f"kept {path}: Lightning asked to remove it after a save that failed")
                elif waits == {tmp}:
                    due.append(path)
                else:
                    waiting.append((path, waits - {tmp}))
            self._removals = waiting
            doomed = []
            for path in due:  # under the lock: a new save to `path` is aimed before or after, not during
                try:
                    doomed.append(_set_aside(path))
                except OSError as e:
                    self._problems.append(f"kept {path}: removing it failed: {e}")
        for leftover in doomed:
            if leftover is not None:
                _delete(leftover)


def _publish(tmp: Path, final: Path) -> None:
    """Makes the durable checkpoint in `tmp` the one at `final` in one atomic step; whatever was
    at `final` (a checkpoint, a file, a symlink) is deleted afterwards."""
    if not os.path.lexists(final):
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        else:
            durable.fsync_dir(final.parent)
            return
    if _exchange(tmp, final):  # tmp now holds the old one, under a name the next writer removes
        durable.fsync_dir(final.parent)
        _delete(tmp)
        return
    # No atomic exchange here: the old one steps aside under a name that the next writer
    # renames back should a crash come before the new one is in place.
    aside = _hidden(final, "replaced", uuid.uuid4().hex[:12])
    os.rename(final, aside)
    os.rename(tmp, final)
    durable.fsync_dir(final.parent)
    _delete(aside)


def _remove(path: Path) -> None:
    doomed = _set_aside(path)
    if doomed is not None:
        _delete(doomed)


def _set_aside(path: Path) -> Optional[Path]:
    """Takes a checkpoint away from its name, atomically: a directory is renamed to a leftover
    name first (returned, to be deleted), so a crash mid-delete leaves something the next
    writer removes, never a torn checkpoint under its name. A file or symlink is unlinked."""
    if not os.path.lexists(path):
        return None
    if path.is_dir() and not path.is_symlink():
        doomed = _hidden(path, "removed", uuid.uuid4().hex[:12])
        os.rename(path, doomed)
        durable.fsync_dir(path.parent)
        return doomed
    path.unlink()
    durable.fsync_dir(path.parent)
    return None


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc before 2.28, or another C library
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (renameat2 with RENAME_EXCHANGE); False where the system or
    the file system has no such call."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class _DirectoryClaim:
    """This process writes checkpoints into `directory`: an flock on the directory itself, which
    the kernel drops when the process dies (even by SIGKILL). Taking it cleans up what a killed
    writer left: temp dirs of saves in flight, checkpoints half deleted, and a checkpoint that
    stood aside for its replacement when no atomic exchange was available (put back if the
    replacement never arrived)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = ckdir.WriterLock(directory, on_directory=True)
        if not self._lock.try_acquire():
            raise CheckpointError(f"another writer (a process, or another PyEngineCheckpointIO) is writing "
                                  f"checkpoints into {directory}: it holds the directory's lock. Give each run its "
                                  "own checkpoint directory")
        try:
            self._clean_up()
        except BaseException:
            self.release()
            raise

    def _clean_up(self) -> None:
        for name in os.listdir(self.directory):
            match = _LEFTOVER.match(name)
            if match is None:
                continue
            leftover, final = self.directory / name, self.directory / match["name"]
            if match["kind"] == "replaced" and not os.path.lexists(final):
                os.rename(leftover, final)
            else:
                _delete(leftover)
        durable.fsync_dir(self.directory)

    def release(self) -> None:
        self._lock.release()
