"""The storage interface a `Study` runs on: snapshots without locks, short locked transactions.

Two implementations share it and the same schema ideas (one row per study, per trial, per
reported intermediate value; `(study, number)` and `(study, key)` unique):
`SQLiteStorage` (one host, a file) and `PostgresStorage` (many hosts, a server).
"""

from __future__ import annotations

import abc
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from pyengine.tune.trial import FrozenTrial, TrialState

T = TypeVar("T")


class DuplicateTrial(Exception):
    """`insert_trial` found the configuration (or the number) already in the study."""


@dataclass
class Snapshot:
    """A consistent view of a study: every trial, and the storage clock when it was read.

    `now` and every trial's `started` / `heartbeat` / `finished` come from the same clock (the
    database server's for PostgreSQL), so `now - heartbeat` is meaningful on any host.
    """

    trials: list[FrozenTrial]
    now: float


@dataclass
class LockStats:
    """How long this process held the study's write lock, per kind of transaction."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    samples: list[float] = field(default_factory=list)

    def add(self, held_s: float) -> None:
        self.count += 1
        self.total_s += held_s
        self.max_s = max(self.max_s, held_s)
        if len(self.samples) < 10_000:
            self.samples.append(held_s)

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else 0.0


class Transaction(abc.ABC):
    """The writes of one `Storage.atomic` body; every method runs under the study's write lock."""

    @abc.abstractmethod
    def now(self) -> float:
        """The storage clock (seconds since the epoch) at this transaction."""

    @abc.abstractmethod
    def trials(self, intermediate: bool = True, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        """The study's trials (in `states`, default all) by number; `intermediate=False` skips reported values."""

    @abc.abstractmethod
    def has_key(self, key: str) -> bool:
        """Whether a trial of the study has the configuration `key` (`Space.key`)."""

    @abc.abstractmethod
    def insert_trial(self, params: dict[str, Any], key: str, host: str, pid: int) -> FrozenTrial:
        """Add a RUNNING trial with the next number, stamped with the storage clock.

        Raises:
            DuplicateTrial: if a trial of the study already has `key`.
        """

    @abc.abstractmethod
    def set_state(
        self,
        trial_id: int,
        state: TrialState,
        *,
        value: float | None = None,
        error: str | None = None,
        host: str | None = None,
        pid: int | None = None,
        retries_inc: int = 0,
    ) -> None:
        """Change a trial's state; refreshes its heartbeat and, when finished, its end time."""


class Storage(abc.ABC):
    """Trial records of one study, shared by threads, processes and (PostgreSQL) hosts.

    Concurrency contract: one `Storage` per process per study; methods may be called from any
    thread. `snapshot()` takes no write lock. `atomic(fn)` runs `fn(tx)` holding the study's
    write lock (SQLite: the database's; PostgreSQL: a per-study advisory lock), so a
    read-decide-write body is atomic across processes and hosts; the body may be run again
    after a serialization failure or deadlock, so it must not have effects outside `tx`. A
    process dying at any moment leaves the last committed transaction.

    Attributes:
        lock_stats: seconds the write lock was held, per `atomic(..., kind=)`.
    """

    description: str = "storage"

    def __init__(self) -> None:
        self.study_id = -1
        self.lock_stats: dict[str, LockStats] = {}
        self._stats_lock = threading.Lock()

    @abc.abstractmethod
    def open_study(self, name: str, direction: str, space_json: str, seed: int) -> int:
        """Create the study, or check that an existing one has the same direction and space.

        Raises:
            ValueError: if the stored study has another direction or search space.
        """

    @abc.abstractmethod
    def snapshot(self) -> Snapshot:
        """Every trial with its intermediate values, and the storage clock, read consistently."""

    def trials(self) -> list[FrozenTrial]:
        return self.snapshot().trials

    @abc.abstractmethod
    def atomic(self, fn: Callable[[Transaction], T], kind: str = "write") -> T:
        """Run `fn(tx)` in one transaction under the study's write lock and commit it."""

    @abc.abstractmethod
    def report(self, trial_id: int, step: int, value: float, replace_from: bool) -> None:
        """Record an intermediate value (own transaction, no study lock).

        Args:
            replace_from: delete values at `step` and later first (a crashed trial resuming
                from a checkpoint older than its last report legitimately repeats steps).

        Raises:
            ValueError: if `step` is not greater than the last reported step and not replacing.
        """

    @abc.abstractmethod
    def heartbeat(self, trial_ids: list[int]) -> None:
        """Stamp running trials with the storage clock (own transaction, no study lock)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def default_checkpoint_root(self, study_name: str) -> Path | None:
        """Where trial checkpoints go when the study is not told (None: a temporary directory)."""
        return None

    def _record_hold(self, kind: str, held_s: float) -> None:
        with self._stats_lock:
            self.lock_stats.setdefault(kind, LockStats()).add(held_s)


def check_same_study(where: str, row: tuple[Any, ...], direction: str, space_json: str) -> int:
    """The stored study's id, after checking that `direction` and `space_json` match it."""
    sid, old_direction, old_space = row[:3]
    if old_direction != direction:
        raise ValueError(
            f"{where} has direction={old_direction!r}, not {direction!r}; use the same direction or another study_name"
        )
    if old_space != space_json:
        raise ValueError(
            f"{where} was created with a different search space:\n  stored: {old_space}\n  given:  "
            f"{space_json}\nuse the same space, another study_name or another storage"
        )
    return int(sid)


def rows_to_trials(rows: list[tuple[Any, ...]], inter: dict[int, dict[int, float]]) -> list[FrozenTrial]:
    """FrozenTrials from `SELECT id, number, state, params, value, started, finished, heartbeat,
    host, pid, retries, error` rows and intermediate values keyed by trial id."""
    out = []
    for tid, number, state, params, value, started, finished, hb, host, pid, retries, error in rows:
        out.append(
            FrozenTrial(
                id=int(tid),
                number=int(number),
                state=TrialState(state),
                params=json.loads(params),
                value=value,
                intermediate=inter.get(int(tid), {}),
                started=started,
                finished=finished,
                heartbeat=hb,
                host=host,
                pid=pid,
                retries=int(retries),
                error=error,
            )
        )
    return out


TRIAL_COLUMNS = "id, number, state, params, value, started, finished, heartbeat, host, pid, retries, error"
