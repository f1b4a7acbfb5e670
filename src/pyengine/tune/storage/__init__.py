"""Where a study's trials live: SQLite (one host) or PostgreSQL (many hosts) behind one `Storage`."""

from __future__ import annotations

from pathlib import Path

from pyengine.tune.storage.base import DuplicateTrial, LockStats, Snapshot, Storage, Transaction
from pyengine.tune.storage.postgres import PostgresStorage, is_postgres_url
from pyengine.tune.storage.sqlite import SQLiteStorage

__all__ = [
    "DuplicateTrial",
    "LockStats",
    "PostgresStorage",
    "SQLiteStorage",
    "Snapshot",
    "Storage",
    "Transaction",
    "open_storage",
]


def open_storage(storage: str | Path | Storage | None) -> Storage:
    """A `Storage` for `Study(storage=...)`.

    Args:
        storage: None (in memory, this process only), a SQLite file path (.db / .sqlite /
            .sqlite3), a `postgresql://` URL, or a `Storage` instance (used as is).

    Raises:
        ValueError: a path with another suffix, or a malformed URL.
        ImportError: a PostgreSQL URL without psycopg installed.
        ConnectionError: the PostgreSQL server cannot be reached.
    """
    if isinstance(storage, Storage):
        return storage
    if is_postgres_url(storage):
        return PostgresStorage(str(storage))
    if isinstance(storage, str) and "://" in storage:
        scheme = storage.split("://")[0]
        raise ValueError(f"storage={scheme + '://...'!r}: expected a postgresql:// URL or a SQLite file path")
    return SQLiteStorage(storage)
