"""Study storage in SQLite (standard library): crash-safe, shared by threads and processes of ONE host.

Every change is a transaction; WAL mode lets readers (snapshots, suggestions) run while one
writer commits, and `synchronous=FULL` makes a committed trial survive a power cut, not only a
killed process. The clock is this process's `time.time()`: a SQLite file is used from one
host (WAL does not work over a network file system), so all workers share the host's clock.
For many hosts use PostgreSQL, whose server clock stamps heartbeats.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from pyengine.tune.storage.base import (
    TRIAL_COLUMNS,
    DuplicateTrial,
    Snapshot,
    Storage,
    T,
    Transaction,
    check_same_study,
    rows_to_trials,
)
from pyengine.tune.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, direction TEXT NOT NULL,
    space TEXT NOT NULL, seed INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY, study_id INTEGER NOT NULL REFERENCES studies(id),
    number INTEGER NOT NULL, state TEXT NOT NULL, params TEXT NOT NULL, key TEXT NOT NULL,
    value REAL, started REAL, finished REAL, heartbeat REAL, host TEXT, pid INTEGER,
    retries INTEGER NOT NULL DEFAULT 0, error TEXT, UNIQUE (study_id, number));
CREATE TABLE IF NOT EXISTS intermediate (
    trial_id INTEGER NOT NULL REFERENCES trials(id), step INTEGER NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (trial_id, step));
"""
# Files written before the key became unique get the index when they are opened.
_KEY_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS trials_study_key ON trials (study_id, key)"


class _SQLiteTransaction(Transaction):
    def __init__(self, storage: SQLiteStorage, conn: sqlite3.Connection) -> None:
        self._s, self._c = storage, conn

    def now(self) -> float:
        return time.time()

    def trials(self, intermediate: bool = True, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self._s._read(self._c, intermediate, states)

    def has_key(self, key: str) -> bool:
        sql = "SELECT 1 FROM trials WHERE study_id=? AND key=?"
        return self._c.execute(sql, (self._s.study_id, key)).fetchone() is not None

    def insert_trial(self, params: dict[str, Any], key: str, host: str, pid: int) -> FrozenTrial:
        sid = self._s.study_id
        (number,) = self._c.execute(
            "SELECT COALESCE(MAX(number) + 1, 0) FROM trials WHERE study_id=?", (sid,)
        ).fetchone()
        now = time.time()
        try:
            cur = self._c.execute(
                "INSERT INTO trials (study_id, number, state, params, key, started, heartbeat, host, pid) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (sid, number, TrialState.RUNNING.value, json.dumps(params), key, now, now, host, pid),
            )
        except sqlite3.IntegrityError as e:
            raise DuplicateTrial(f"{key} is already in the study ({e})") from e
        return FrozenTrial(
            id=int(cur.lastrowid), number=number, state=TrialState.RUNNING, params=params, value=None,
            started=now, heartbeat=now, host=host, pid=pid,
        )  # fmt: skip

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
        now = time.time()
        self._c.execute(
            "UPDATE trials SET state=?, value=COALESCE(?, value), error=COALESCE(?, error), finished=?, "
            "heartbeat=?, host=COALESCE(?, host), pid=COALESCE(?, pid), retries=retries+? WHERE id=?",
            (state.value, value, error, now if state.is_finished() else None, now, host, pid, retries_inc, trial_id),
        )


class SQLiteStorage(Storage):
    """SQLite-backed trial records of one study.

    Concurrency contract: as `Storage`; one connection per instance, used by one thread at a
    time (an RLock). `atomic` takes SQLite's write lock (BEGIN IMMEDIATE) for its body, so it
    is serialised against every other process on the file; `snapshot` is a read transaction
    and waits for no writer (WAL).

    Args:
        path: database file, or None for an in-memory database (this process only).
        busy_timeout_s: how long to wait for another process's write lock before raising.
    """

    def __init__(self, path: str | Path | None, busy_timeout_s: float = 120.0) -> None:
        super().__init__()
        self.path = None if path is None else Path(path)
        if self.path is not None and self.path.suffix not in (".db", ".sqlite", ".sqlite3"):
            raise ValueError(
                f"storage={str(path)!r}: expected a SQLite file path ending in .db, .sqlite or .sqlite3, "
                "or a postgresql:// URL"
            )
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.description = "in-memory storage" if self.path is None else str(self.path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            ":memory:" if path is None else str(path),
            timeout=busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._write() as c:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    c.execute(stmt)
        try:
            with self._write() as c:
                c.execute(_KEY_INDEX)
        except sqlite3.IntegrityError:
            log.warning("%s holds repeated configurations; duplicates are then only prevented by the lock", path)

    @contextmanager
    def _write(self, kind: str | None = None) -> Iterator[sqlite3.Connection]:
        """This process's lock and SQLite's write lock (BEGIN IMMEDIATE) for the body; commit or roll back."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            locked = time.perf_counter()
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            if kind is not None:
                self._record_hold(kind, time.perf_counter() - locked)

    def atomic(self, fn: Callable[[Transaction], T], kind: str = "write") -> T:
        with self._write(kind) as c:
            return fn(_SQLiteTransaction(self, c))

    def snapshot(self) -> Snapshot:
        with self._lock:
            self._conn.execute("BEGIN")  # deferred: a read transaction, one consistent view
            try:
                return Snapshot(self._read(self._conn, True), time.time())
            finally:
                self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def default_checkpoint_root(self, study_name: str) -> Path | None:
        return None if self.path is None else self.path.with_name(self.path.stem + f"-{study_name}-trials")

    def open_study(self, name: str, direction: str, space_json: str, seed: int) -> int:
        with self._write() as c:
            row = c.execute("SELECT id, direction, space, seed FROM studies WHERE name=?", (name,)).fetchone()
            if row is None:
                cur = c.execute(
                    "INSERT INTO studies (name, direction, space, seed, created) VALUES (?,?,?,?,?)",
                    (name, direction, space_json, seed, time.time()),
                )
                self.study_id = int(cur.lastrowid)
                return self.study_id
        self.study_id = check_same_study(f"study {name!r} in {self.path}", row, direction, space_json)
        return self.study_id

    def _read(
        self, conn: sqlite3.Connection, intermediate: bool, states: tuple[TrialState, ...] | None = None
    ) -> list[FrozenTrial]:
        with self._lock:
            where, args = "study_id=?", list[Any]([self.study_id])
            if states is not None:
                where += f" AND state IN ({','.join('?' * len(states))})"
                args += [s.value for s in states]
            rows = conn.execute(f"SELECT {TRIAL_COLUMNS} FROM trials WHERE {where} ORDER BY number", args).fetchall()
            inter: dict[int, dict[int, float]] = {}
            if intermediate:
                for tid, step, value in conn.execute(
                    "SELECT i.trial_id, i.step, i.value FROM intermediate i JOIN trials t ON t.id = i.trial_id "
                    "WHERE t.study_id=? ORDER BY i.step",
                    (self.study_id,),
                ):
                    inter.setdefault(tid, {})[step] = value
        return rows_to_trials(rows, inter)

    def report(self, trial_id: int, step: int, value: float, replace_from: bool) -> None:
        with self._write() as c:
            (last,) = c.execute("SELECT MAX(step) FROM intermediate WHERE trial_id=?", (trial_id,)).fetchone()
            if last is not None and step <= last:
                if not replace_from:
                    raise ValueError(
                        f"trial.report(step={step}) but step {last} was already reported: steps must increase. "
                        "A resumed trial should continue from its checkpoint's step + 1"
                    )
                c.execute("DELETE FROM intermediate WHERE trial_id=? AND step>=?", (trial_id, step))
            c.execute("INSERT INTO intermediate (trial_id, step, value) VALUES (?,?,?)", (trial_id, step, value))

    def heartbeat(self, trial_ids: list[int]) -> None:
        if not trial_ids:
            return
        with self._write() as c:
            now = time.time()
            c.executemany(
                "UPDATE trials SET heartbeat=? WHERE id=? AND state=?",
                [(now, t, TrialState.RUNNING.value) for t in sorted(trial_ids)],
            )
