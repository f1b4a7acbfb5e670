"""A throwaway PostgreSQL server for tests and benchmarks.

`initdb` into a temporary directory, listening only on a Unix socket in that directory (no
TCP), fsync off; `stop()` is `pg_ctl stop -m immediate` and removes the directory. As root the
binaries run as the `postgres` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATE_BINDIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")


def find_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: $PYENGINE_PG_BIN, Debian's layout, or $PATH."""
    candidates = [os.environ.get("PYENGINE_PG_BIN", ""), *CANDIDATE_BINDIRS]
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(which).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


class PostgresServer:
    """One server; `url(db)` connects as the superuser `postgres` over the socket (trust auth)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root: Path | None = None
        self._as_postgres = os.geteuid() == 0

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if self._as_postgres else list(args)

    def start(self) -> None:
        # /tmp, not pytest's tmp_path: a socket path must stay under ~100 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="pe-pg-", dir="/tmp"))
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
        data = self.root / "data"
        self._check(self._cmd(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                              "-E", "UTF8", "--no-sync"))  # fmt: skip
        options = (
            f"-c listen_addresses='' -k {self.root} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200 -c deadlock_timeout=100ms"
        )
        self._check(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.root / "server.log"),
                              "-w", "-t", "60", "-o", options, "start"))  # fmt: skip

    def _check(self, cmd: list[str]) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        if r.returncode != 0:
            log = self.root / "server.log" if self.root else None
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{tail}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql:///{dbname}?host={self.root}&user=postgres"

    def create_database(self, name: str) -> str:
        """Create database `name` and return its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.root is None:
            return
        subprocess.run(
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "stop", "-m", "immediate"),
            capture_output=True,
            cwd="/",
        )
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
