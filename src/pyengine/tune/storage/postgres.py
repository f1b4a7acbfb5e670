"""Study storage on a PostgreSQL server through psycopg 3: many processes on many hosts.

`storage="postgresql://user[:password]@host[:port]/dbname"` or any libpq URL, including a Unix
socket directory as `postgresql:///dbname?host=/run/postgresql`.

- Atomic claims: `atomic` takes a per-study session advisory lock, THEN opens a SERIALIZABLE
  transaction (its snapshot is therefore taken after the lock is granted: a transaction that
  took the lock as its first statement would read a snapshot older than the previous
  holder's commit). `(study, number)` and `(study, key)` are unique as a second line of
  defence: no two workers ever get the same configuration.
- The clock is the server's: started / heartbeat / finished are `now()` on the server and
  reaping compares them with the server's `now()`, so hosts with skewed clocks agree.
- Transient failures: serialization failures and deadlocks (SQLSTATE 40001 / 40P01), for
  example a heartbeat committing under a reaper that read the old one, re-run the whole
  transaction after an exponential backoff with jitter; a broken connection is reopened.
- Durability: a committed transaction is the server's to keep; a dying worker's session ends
  and its lock with it (over TCP, server-side keepalives notice a vanished host in ~25 s).
- Connect directly or through a session-pooling proxy: a transaction-pooling PgBouncer does
  not keep session advisory locks, and then only the unique key prevents duplicates.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
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

# Advisory locks are (class, object) pairs of int4: this class is pyengine's ("pyne"), the
# object is the study id (0: schema and study creation).
_LOCK_CLASS = 0x70796E65
_NOW = "extract(epoch from now())::float8"
_TRANSIENT = {"40001": "serialization failure", "40P01": "deadlock"}
_INSTALL = 'pip install "pyengine[postgres]"'

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS pyengine_studies (
        id BIGSERIAL PRIMARY KEY, name TEXT UNIQUE NOT NULL, direction TEXT NOT NULL,
        space TEXT NOT NULL, seed BIGINT NOT NULL, created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pyengine_trials (
        id BIGSERIAL PRIMARY KEY, study_id BIGINT NOT NULL REFERENCES pyengine_studies(id),
        number INTEGER NOT NULL, state TEXT NOT NULL, params TEXT NOT NULL, key TEXT NOT NULL,
        value DOUBLE PRECISION, started DOUBLE PRECISION, finished DOUBLE PRECISION,
        heartbeat DOUBLE PRECISION, host TEXT, pid INTEGER, retries INTEGER NOT NULL DEFAULT 0,
        error TEXT, UNIQUE (study_id, number), UNIQUE (study_id, key))""",
    """CREATE TABLE IF NOT EXISTS pyengine_intermediate (
        trial_id BIGINT NOT NULL REFERENCES pyengine_trials(id), step INTEGER NOT NULL,
        value DOUBLE PRECISION NOT NULL, PRIMARY KEY (trial_id, step))""",
]


def is_postgres_url(storage: object) -> bool:
    return isinstance(storage, str) and storage.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    url = re.sub(r"^(postgres(?:ql)?://[^/?#@:]*):[^/?#@]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


def _import_psycopg(url: str) -> Any:
    try:
        import psycopg
    except ImportError as e:
        raise ImportError(
            f"storage={redact(url)!r} needs psycopg 3, which is not installed here: {_INSTALL} "
            '(or pip install "psycopg[binary]")'
        ) from e
    return psycopg


def _connect_hint(message: str) -> str:
    m = message.lower()
    if "database" in m and "does not exist" in m:
        return "create the database first (createdb NAME, or CREATE DATABASE NAME as a user allowed to)"
    if "role" in m and "does not exist" in m or "authentication failed" in m or "no password supplied" in m:
        return "check the user name and password in the URL (or PGPASSWORD / ~/.pgpass) and pg_hba.conf"
    return (
        "check that the server is running and listening at that host and port, or in that socket "
        "directory (`pg_isready -d URL` tells), and that nothing blocks the connection"
    )


class _PgTransaction(Transaction):
    def __init__(self, storage: PostgresStorage, conn: Any) -> None:
        self._s, self._c = storage, conn

    def now(self) -> float:
        return float(self._c.execute(f"SELECT {_NOW}").fetchone()[0])

    def trials(self, intermediate: bool = True, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self._s._read(self._c, intermediate, states)

    def has_key(self, key: str) -> bool:
        sql = "SELECT 1 FROM pyengine_trials WHERE study_id=%s AND key=%s"
        return self._c.execute(sql, (self._s.study_id, key)).fetchone() is not None

    def insert_trial(self, params: dict[str, Any], key: str, host: str, pid: int) -> FrozenTrial:
        sid = self._s.study_id
        (number,) = self._c.execute(
            "SELECT COALESCE(MAX(number) + 1, 0) FROM pyengine_trials WHERE study_id=%s", (sid,)
        ).fetchone()
        try:
            tid, now = self._c.execute(
                "INSERT INTO pyengine_trials (study_id, number, state, params, key, started, heartbeat, host, pid) "
                f"VALUES (%s, %s, %s, %s, %s, {_NOW}, {_NOW}, %s, %s) RETURNING id, started",
                (sid, number, TrialState.RUNNING.value, json.dumps(params), key, host, pid),
            ).fetchone()
        except self._s._psycopg.errors.UniqueViolation as e:
            raise DuplicateTrial(f"{key} is already in the study ({e})") from e
        return FrozenTrial(
            id=int(tid), number=int(number), state=TrialState.RUNNING, params=params, value=None,
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
        finished = _NOW if state.is_finished() else "NULL"
        self._c.execute(
            "UPDATE pyengine_trials SET state=%s, value=COALESCE(%s, value), error=COALESCE(%s, error), "
            f"finished={finished}, heartbeat={_NOW}, host=COALESCE(%s, host), pid=COALESCE(%s, pid), "
            "retries=retries+%s WHERE id=%s",
            (state.value, value, error, host, pid, retries_inc, trial_id),
        )


class PostgresStorage(Storage):
    """PostgreSQL-backed trial records of one study.

    Concurrency contract: as `Storage`. One connection per instance, used by one thread at a
    time (an RLock); across processes and hosts `atomic` bodies of one study are serialised by
    the advisory lock, while snapshots, heartbeats and reports take no study lock.

    Args:
        url: a libpq URL (postgresql://...).
        connect_timeout_s: libpq's connect_timeout, unless the URL sets one.
        max_attempts: tries of a transaction that keeps failing with 40001 / 40P01 or a broken
            connection before the error is raised.
        backoff_s: first backoff; doubles per attempt (capped at 1 s), with full jitter.

    Attributes:
        transient_retries: transactions re-run after a serialization failure, deadlock or
            reconnection (counted for tests and logs).

    Raises:
        ImportError: psycopg is not installed.
        ValueError: the URL is not a valid libpq URL.
        ConnectionError: the server cannot be reached or refuses the connection.
    """

    def __init__(self, url: str, connect_timeout_s: int = 10, max_attempts: int = 10, backoff_s: float = 0.01) -> None:
        super().__init__()
        self._psycopg = _import_psycopg(url)
        self.description = redact(url)
        from psycopg.conninfo import conninfo_to_dict

        try:
            info = conninfo_to_dict(url)
        except self._psycopg.ProgrammingError as e:
            raise ValueError(self._bad_url(str(e))) from e
        if "port" in info and not all(p.strip().isdigit() for p in str(info["port"]).split(",")):
            raise ValueError(self._bad_url(f"port {info['port']!r} is not a number"))
        self._url = url
        self._connect_kwargs: dict[str, Any] = {}
        if "connect_timeout" not in info:
            self._connect_kwargs["connect_timeout"] = int(connect_timeout_s)
        if "application_name" not in info:
            self._connect_kwargs["application_name"] = "pyengine-tune"
        self._dbname = str(info.get("dbname") or info.get("user") or "postgres")
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.transient_retries = 0
        self._lock = threading.RLock()
        self._cwd = Path.cwd()
        self._conn = self._connect()
        self._run("create the schema", self._create_schema)

    def _bad_url(self, reason: str) -> str:
        return (
            f"storage={self.description!r} is not a valid PostgreSQL URL: {reason}. Expected "
            "postgresql://user[:password]@host[:port]/dbname, or postgresql:///dbname?host=/socket/dir "
            "for a Unix socket"
        )

    def _connect(self) -> Any:
        try:
            conn = self._psycopg.connect(self._url, autocommit=True, **self._connect_kwargs)
        except self._psycopg.OperationalError as e:
            msg = " ".join(str(e).split())
            raise ConnectionError(
                f"storage={self.description!r}: cannot connect to the PostgreSQL server: {msg}. {_connect_hint(msg)}"
            ) from e
        # Over TCP, a host that vanishes (power, network) while holding the study lock would
        # hold it until the server noticed, by default after hours: probe idle peers within ~25 s.
        conn.execute("SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3")
        return conn

    def _run(self, what: str, fn: Callable[[Any], T]) -> T:
        """`fn(conn)` under this instance's lock, re-run after 40001 / 40P01 or a broken connection."""
        for attempt in range(1, self.max_attempts + 1):
            with self._lock:
                try:
                    if self._conn.closed or self._conn.broken:
                        self._conn = self._connect()
                    return fn(self._conn)
                except self._psycopg.OperationalError as e:
                    reason = _TRANSIENT.get(getattr(e, "sqlstate", None) or "")
                    if reason is None and not self._conn.broken:
                        raise
                    reason = reason or "connection lost"
                    if attempt == self.max_attempts:
                        raise RuntimeError(
                            f"{what} on {self.description} failed {attempt} times ({reason}: "
                            f"{' '.join(str(e).split())}); the server is overloaded or a client holds locks for long"
                        ) from e
                    self.transient_retries += 1
            delay = random.uniform(0.0, min(1.0, self.backoff_s * 2**attempt))
            log.info("%s: %s on %s; retrying in %.3f s", what, reason, self.description, delay)
            time.sleep(delay)  # outside the lock: other threads of this process go on meanwhile
        raise AssertionError("unreachable")

    @staticmethod
    def _in_transaction(conn: Any, begin: str, body: Callable[[], T]) -> T:
        conn.execute(begin)
        try:
            result = body()
        except BaseException:
            if not conn.broken:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _create_schema(self, conn: Any) -> None:
        def body() -> None:
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_CLASS,))
            for stmt in _SCHEMA:
                conn.execute(stmt)

        self._in_transaction(conn, "BEGIN", body)

    def open_study(self, name: str, direction: str, space_json: str, seed: int) -> int:
        def body(conn: Any) -> Any:
            def create_or_read() -> Any:
                # Read committed and the lock as first statement: each later statement sees
                # every study committed before the lock was granted.
                conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_CLASS,))
                row = conn.execute(
                    "SELECT id, direction, space, seed FROM pyengine_studies WHERE name=%s", (name,)
                ).fetchone()
                if row is None:
                    (sid,) = conn.execute(
                        f"INSERT INTO pyengine_studies (name, direction, space, seed, created) "
                        f"VALUES (%s, %s, %s, %s, {_NOW}) RETURNING id",
                        (name, direction, space_json, seed),
                    ).fetchone()
                    return int(sid)
                return row

            return self._in_transaction(conn, "BEGIN ISOLATION LEVEL READ COMMITTED", create_or_read)

        got = self._run("open the study", body)
        where = f"study {name!r} in {self.description}"
        self.study_id = got if isinstance(got, int) else check_same_study(where, got, direction, space_json)
        return self.study_id

    def _read(self, conn: Any, intermediate: bool, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        where, args = "study_id=%s", list[Any]([self.study_id])
        if states is not None:
            where += " AND state = ANY(%s)"
            args.append([s.value for s in states])
        rows = conn.execute(
            f"SELECT {TRIAL_COLUMNS} FROM pyengine_trials WHERE {where} ORDER BY number", args
        ).fetchall()
        inter: dict[int, dict[int, float]] = {}
        if intermediate:
            for tid, step, value in conn.execute(
                "SELECT i.trial_id, i.step, i.value FROM pyengine_intermediate i "
                "JOIN pyengine_trials t ON t.id = i.trial_id WHERE t.study_id=%s ORDER BY i.step",
                (self.study_id,),
            ):
                inter.setdefault(int(tid), {})[int(step)] = value
        return rows_to_trials(rows, inter)

    def snapshot(self) -> Snapshot:
        def body(conn: Any) -> Snapshot:
            def read() -> Snapshot:
                now = float(conn.execute(f"SELECT {_NOW}").fetchone()[0])
                return Snapshot(self._read(conn, True), now)

            return self._in_transaction(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", read)

        return self._run("read the study", body)

    def atomic(self, fn: Callable[[Transaction], T], kind: str = "write") -> T:
        def body(conn: Any) -> T:
            conn.execute("SELECT pg_advisory_lock(%s, %s)", (_LOCK_CLASS, self.study_id))
            locked = time.perf_counter()
            try:
                result = self._in_transaction(
                    conn, "BEGIN ISOLATION LEVEL SERIALIZABLE", lambda: fn(_PgTransaction(self, conn))
                )
            finally:
                if not conn.broken:
                    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_CLASS, self.study_id))
            self._record_hold(kind, time.perf_counter() - locked)
            return result

        return self._run(f"a {kind} transaction", body)

    def report(self, trial_id: int, step: int, value: float, replace_from: bool) -> None:
        def body(conn: Any) -> None:
            def write() -> None:
                (last,) = conn.execute(
                    "SELECT MAX(step) FROM pyengine_intermediate WHERE trial_id=%s", (trial_id,)
                ).fetchone()
                if last is not None and step <= last:
                    if not replace_from:
                        raise ValueError(
                            f"trial.report(step={step}) but step {last} was already reported: steps must increase. "
                            "A resumed trial should continue from its checkpoint's step + 1"
                        )
                    conn.execute("DELETE FROM pyengine_intermediate WHERE trial_id=%s AND step>=%s", (trial_id, step))
                conn.execute(
                    "INSERT INTO pyengine_intermediate (trial_id, step, value) VALUES (%s, %s, %s)",
                    (trial_id, step, value),
                )

            self._in_transaction(conn, "BEGIN ISOLATION LEVEL READ COMMITTED", write)

        self._run("report", body)

    def heartbeat(self, trial_ids: list[int]) -> None:
        if not trial_ids:
            return
        ids = sorted(trial_ids)  # one lock order for every writer of several rows
        self._run(
            "heartbeat",
            lambda conn: conn.execute(
                f"UPDATE pyengine_trials SET heartbeat={_NOW} WHERE id = ANY(%s) AND state=%s",
                (ids, TrialState.RUNNING.value),
            ),
        )

    def now(self) -> float:
        """The server's clock."""
        return self._run("read the clock", lambda conn: float(conn.execute(f"SELECT {_NOW}").fetchone()[0]))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def default_checkpoint_root(self, study_name: str) -> Path | None:
        # No file to sit beside: the directory the study was opened from. Workers on several
        # hosts must pass a checkpoint_root they all see, or a re-queued trial restarts.
        return self._cwd / f"pyengine-{self._dbname}-{study_name}-trials"
