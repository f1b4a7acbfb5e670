"""Study storage in SQLite (standard library): crash-safe, shared by threads and processes.

Schema: one row per study, one per trial, one per reported intermediate value. Every change
is a transaction; WAL mode lets readers run while one writer commits, and
`synchronous=FULL` makes a committed trial survive a power cut, not only a killed process.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyengine.tune.trial import FrozenTrial, TrialState

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


class Storage:
    """SQLite-backed trial records of one study.

    Concurrency contract: one `Storage` per process per study; its methods may be called from
    any thread (a lock serialises use of the single connection). Several processes may open
    the same file: `transaction()` takes SQLite's write lock (BEGIN IMMEDIATE) for its whole
    body, so a read-decide-insert sequence such as "look at all trials, pick a new point,
    insert it" is atomic across processes. A crash at any moment leaves the last committed
    transaction; nothing is half-written.

    Args:
        path: database file, or None for an in-memory database (this process only).
        busy_timeout_s: how long to wait for another process's write lock before raising.
    """

    def __init__(self, path: str | Path | None, busy_timeout_s: float = 120.0) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None and self.path.suffix not in (".db", ".sqlite", ".sqlite3"):
            raise ValueError(f"storage={str(path)!r}: expected a SQLite file path ending in .db, .sqlite or .sqlite3")
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
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
        with self.transaction() as c:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    c.execute(stmt)
        self.study_id = -1

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the database write lock (and this process's lock) for the body; commit or roll back."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def open_study(self, name: str, direction: str, space_json: str, seed: int) -> int:
        """Create the study, or check that an existing one has the same direction and space."""
        with self.transaction() as c:
            row = c.execute("SELECT id, direction, space, seed FROM studies WHERE name=?", (name,)).fetchone()
            if row is None:
                cur = c.execute(
                    "INSERT INTO studies (name, direction, space, seed, created) VALUES (?,?,?,?,?)",
                    (name, direction, space_json, seed, time.time()),
                )
                self.study_id = int(cur.lastrowid)
                return self.study_id
        sid, old_direction, old_space, _ = row
        where = f"study {name!r} in {self.path}"
        if old_direction != direction:
            raise ValueError(
                f"{where} has direction={old_direction!r}, not {direction!r}; "
                "use the same direction or another study_name"
            )
        if old_space != space_json:
            raise ValueError(
                f"{where} was created with a different search space:\n  stored: {old_space}\n  given:  "
                f"{space_json}\nuse the same space, another study_name or another storage file"
            )
        self.study_id = int(sid)
        return self.study_id

    # --- methods below must run inside `transaction()` when they write, unless stated ---

    def trials(
        self, c: sqlite3.Connection | None = None, states: tuple[TrialState, ...] | None = None
    ) -> list[FrozenTrial]:
        """All trials of the study, with their intermediate values, ordered by number."""
        with self._lock:
            conn = c or self._conn
            rows = conn.execute(
                "SELECT id, number, state, params, value, started, finished, heartbeat, host, pid, retries, error "
                "FROM trials WHERE study_id=? ORDER BY number",
                (self.study_id,),
            ).fetchall()
            inter: dict[int, dict[int, float]] = {}
            for tid, step, value in conn.execute(
                "SELECT i.trial_id, i.step, i.value FROM intermediate i JOIN trials t ON t.id = i.trial_id "
                "WHERE t.study_id=? ORDER BY i.step",
                (self.study_id,),
            ):
                inter.setdefault(tid, {})[step] = value
        out = []
        for tid, number, state, params, value, started, finished, hb, host, pid, retries, error in rows:
            st = TrialState(state)
            if states is None or st in states:
                out.append(
                    FrozenTrial(
                        id=tid,
                        number=number,
                        state=st,
                        params=json.loads(params),
                        value=value,
                        intermediate=inter.get(tid, {}),
                        started=started,
                        finished=finished,
                        heartbeat=hb,
                        host=host,
                        pid=pid,
                        retries=retries,
                        error=error,
                    )
                )
        return out

    def insert_trial(self, c: sqlite3.Connection, params: dict[str, Any], key: str, host: str, pid: int) -> FrozenTrial:
        (number,) = c.execute(
            "SELECT COALESCE(MAX(number) + 1, 0) FROM trials WHERE study_id=?", (self.study_id,)
        ).fetchone()
        now = time.time()
        cur = c.execute(
            "INSERT INTO trials (study_id, number, state, params, key, started, heartbeat, host, pid) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (self.study_id, number, TrialState.RUNNING.value, json.dumps(params), key, now, now, host, pid),
        )
        return FrozenTrial(
            id=int(cur.lastrowid),
            number=number,
            state=TrialState.RUNNING,
            params=params,
            value=None,
            intermediate={},
            started=now,
            heartbeat=now,
            host=host,
            pid=pid,
        )

    def set_state(
        self,
        c: sqlite3.Connection,
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
        finished = now if state.is_finished() else None
        c.execute(
            "UPDATE trials SET state=?, value=COALESCE(?, value), error=COALESCE(?, error), finished=?, "
            "heartbeat=?, host=COALESCE(?, host), pid=COALESCE(?, pid), retries=retries+? WHERE id=?",
            (state.value, value, error, finished, now, host, pid, retries_inc, trial_id),
        )

    def report(self, trial_id: int, step: int, value: float, replace_from: bool) -> None:
        """Record an intermediate value (own transaction).

        Args:
            replace_from: delete values at `step` and later first (a crashed trial resuming
                from a checkpoint older than its last report legitimately repeats steps).

        Raises:
            ValueError: if `step` is not greater than the last reported step and not replacing.
        """
        with self.transaction() as c:
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
        """Refresh the heartbeat of running trials (own transaction)."""
        if not trial_ids:
            return
        with self.transaction() as c:
            c.executemany(
                "UPDATE trials SET heartbeat=? WHERE id=? AND state=?",
                [(time.time(), t, TrialState.RUNNING.value) for t in trial_ids],
            )
