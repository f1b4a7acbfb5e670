"""Runs a script as `python SCRIPT ARGS...` would, in a child of tests/fork_server.py (forked
with torch and pyengine imported): a start costs milliseconds instead of the ~4 s an
interpreter takes to import torch on a 2-core CI host. The script runs as __main__
(runpy), from `cwd`, with one intra-op thread; its stdout comes back line by line.

    child = ForkedScript(script, args, cwd)
    child.readline()   # "" once the script has ended (or was killed) and every line was read
    child.kill()       # SIGKILL
    child.wait()       # exit code: 0, the script's sys.exit code, 1 on an exception, -9 if killed
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

import fork_server
import torch


class _LinesToConnection:
    """A write-only text stream that sends each complete line over a multiprocessing connection."""

    def __init__(self, conn: Any) -> None:
        self.conn, self.pending = conn, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.conn.send(line + "\n")
        return len(text)

    def flush(self) -> None:
        pass


def _run(conn: Any, script: str, args: list[str], cwd: str) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    torch.set_num_threads(1)  # the fork server imported torch before OMP_NUM_THREADS was set here
    os.chdir(cwd)
    sys.argv = [script, *args]
    sys.stdout = _LinesToConnection(conn)
    runpy.run_path(script, run_name="__main__")
    if sys.stdout.pending:
        conn.send(sys.stdout.pending)


class ForkedScript:
    def __init__(self, script: Path, args: list[str], cwd: Path) -> None:
        context = fork_server.context()
        self._conn, theirs = context.Pipe(duplex=False)
        self.process = context.Process(target=_run, args=(theirs, str(script), [str(a) for a in args], str(cwd)),
                                       daemon=True)
        self.process.start()
        theirs.close()

    def readline(self, timeout: float = 300.0) -> str:
        """The next line the script printed, or "" once it has ended and nothing is left."""
        try:
            if not self._conn.poll(timeout):
                raise TimeoutError(f"the script printed nothing for {timeout} s")
            return self._conn.recv()
        except (EOFError, OSError):
            return ""

    def read_all(self) -> str:
        lines = []
        while line := self.readline():
            lines.append(line)
        return "".join(lines)

    def kill(self) -> None:
        self.process.kill()

    def wait(self) -> int:
        self.process.join()
        self._conn.close()
        return self.process.exitcode
