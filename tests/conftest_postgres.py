"""Fixtures: one real PostgreSQL server per test session, a fresh database per test.

Imported by conftest.py. Tests that use them skip, saying why, only when psycopg or the
server binaries are missing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from postgres_server import PostgresServer, find_bindir

_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    pytest.importorskip("psycopg", reason='psycopg 3 is not installed: pip install "pyengine[postgres]"')
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in $PYENGINE_PG_BIN, "
            "/usr/lib/postgresql/15/bin or $PATH: apt-get install postgresql-15"
        )
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database on the session's server."""
    return postgres_server.create_database(f"test_{next(_databases)}")
