"""The one restore path: the ranks agree on one step, or all raise the same error.

    candidates   rank 0 lists the committed steps and proposes them, newest first
    verify       every rank opens the step and reads (checksums verified) and checks what it
                 will load: its own part's per-rank entries, every piece of the shared tensors
    agree        the ranks exchange their verdicts: if all succeeded, all load; if a rank found
                 damage, every rank warns with the same message and moves to the next older step
                 together, and only then, with every rank done reading, rank 0 moves the damaged
                 step aside (when it may write); if a rank was refused (a different model, keys
                 the checkpoint lacks), every rank raises that error

A world of one is the same with nobody to disagree. A rank that dies during a restore breaks
the exchange, and every other rank raises CheckpointError instead of waiting for it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pyengine.checkpoint import partitioned
from pyengine.checkpoint.state_codec import decode, tensor_names
from pyengine.checkpoint.stateful import check_loadable
from pyengine.checkpoint.storage import FileSystemStorage
from pyengine.errors import CheckpointError

if TYPE_CHECKING:
    from pyengine.checkpoint.object_storage import ObjectStorage


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint failed verification and an older one was used."""


class MissingKeysError(CheckpointError):
    """A caller asked for keys the checkpoint lacks: not damage, so no fallback."""


# Errors a rank may be refused with, rebuilt under the same type on every rank.
_REFUSALS: dict[str, type[BaseException]] = {
    "ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError,
    "MissingKeysError": MissingKeysError, "CheckpointError": CheckpointError, "OSError": OSError,
    "PermissionError": PermissionError,
}


def load_agreed(storage: FileSystemStorage | ObjectStorage, coordinator: Any, step: int | None,
                objects: Mapping[str, Any] | None, *, threads: int,
                may_quarantine: bool) -> tuple[int, dict[str, Any], Any] | None:
    """Finds the step every rank can load and returns (step, values, rng tree) on every rank.

    objects: the targets of restore() (their keys are read, pipeline stages take their slice,
        every value is checked against its target's shapes), or None for every saved object.
    step: a given step (it must verify), or None for the newest step that verifies.

    Returns None when the directory holds no committed step.
    """
    listed = coordinator.broadcast(storage.steps() if coordinator.rank == 0 else None)
    if step is not None:
        if step not in listed:
            raise CheckpointError(f"{storage.root} has no committed checkpoint for step {step}; it holds {listed}")
        candidates = [step]
    else:
        candidates = list(reversed(listed))
    localizers = _localizers(objects) if objects is not None else {}
    keys = list(objects) if objects is not None else None
    failures = []
    for candidate in candidates:
        try:
            values, rng = _load_step(storage, candidate, coordinator.rank, keys, localizers, threads)
            if objects is not None:
                for key, obj in objects.items():  # every entry is checked before the first is loaded
                    check_loadable(key, obj, values[key])
            verdict: tuple = ("ok",)
        except CheckpointError as e:
            verdict = ("refused", type(e).__name__, str(e)) if isinstance(e, MissingKeysError) else ("damaged", str(e))
            local_error: BaseException = e
        except Exception as e:  # noqa: BLE001 - a different model, an unreadable file: every rank raises it
            verdict, local_error = ("refused", type(e).__name__, str(e)), e
        verdicts = coordinator.all_gather(verdict)
        refused = [(r, v) for r, v in enumerate(verdicts) if v[0] == "refused"]
        if refused:
            if verdict[0] == "refused" and coordinator.world == 1:
                raise local_error
            rank, (_, kind, message) = refused[0]
            raise _REFUSALS.get(kind, CheckpointError)(f"rank {rank}: {message}")
        damaged = [(r, v[1]) for r, v in enumerate(verdicts) if v[0] == "damaged"]
        if not damaged:
            return candidate, values, rng
        reason = damaged[0][1] if coordinator.world == 1 else "; ".join(f"rank {r}: {m}" for r, m in damaged)
        if step is not None:
            raise CheckpointError(f"checkpoint step {candidate} fails verification: {reason}")
        moved = ""
        if may_quarantine and coordinator.rank == 0:  # every rank is done reading it (the exchange above)
            try:
                moved = f"; moved aside to {storage.quarantine(candidate).name}"
            except OSError as e:
                moved = f"; could not move it aside ({e})"
        moved = coordinator.broadcast(moved)
        warnings.warn(f"checkpoint step {candidate} failed verification: {reason}{moved}. Trying an older one.",
                      CheckpointFallbackWarning, stacklevel=4)
        failures.append(f"step {candidate}: {reason}")
    if failures:
        raise CheckpointError(f"no checkpoint in {storage.root} verifies:\n  " + "\n  ".join(failures))
    return None


def _localizers(objects: Mapping[str, Any]) -> dict[str, Callable[[Any], Any]]:
    # A pipeline stage takes its slice of the plain-form state, before any tensor is read.
    stages = partitioned.partitions_in(objects)
    return {key: functools.partial(partitioned.localize, kind, partition=p, optimizer=opt, key=key)
            for key, (kind, p, opt) in stages.items()}


def _load_step(storage: FileSystemStorage | ObjectStorage, step: int, rank: int, keys: Iterable[str] | None,
               localizers: Mapping[str, Callable[[Any], Any]], threads: int) -> tuple[dict[str, Any], Any]:
    opened = storage.open_step(step, rank, threads)
    objects = opened.objects
    if keys is not None:
        missing = [k for k in keys if k not in objects]
        if missing:
            raise MissingKeysError(f"checkpoint step {step} has no {missing}; it holds {sorted(objects)}")
        objects = {k: objects[k] for k in keys}
    if localizers:
        objects = {k: localizers[k](v) if k in localizers else v for k, v in objects.items()}
    tensors = opened.read(tensor_names([objects, opened.rng]))
    return decode(objects, tensors), decode(opened.rng, tensors)
