"""Which process this is, in a form another process can check: "is that process dead?".

An object store has no flock that the kernel drops when a writer dies. A writer records its
identity (in its lease, in the names of its spool directories), and a later process on the
same machine, in the same PID namespace and the same boot, can tell for sure that the writer
is gone: its PID no longer exists, or now belongs to a process started at another time. From
any other machine nothing can be told, and `is_dead_here` answers False.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    boot_id: str
    pid_namespace: str
    pid: int
    start_ticks: int  # field 22 of /proc/PID/stat: tells a reused PID from the original

    @classmethod
    def current(cls) -> ProcessIdentity:
        return cls(socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), _pid_namespace(), os.getpid(),
                   _start_ticks(os.getpid()))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> ProcessIdentity | None:
        try:
            return cls(str(doc["host"]), str(doc["boot_id"]), str(doc["pid_namespace"]), int(doc["pid"]),
                       int(doc["start_ticks"]))
        except (KeyError, TypeError, ValueError):
            return None

    def is_dead_here(self) -> bool:
        """True only when this process can be sure: same host, boot and PID namespace, and the
        PID is gone or is a different process now."""
        here = ProcessIdentity.current()
        if (self.host, self.boot_id, self.pid_namespace) != (here.host, here.boot_id, here.pid_namespace):
            return False
        if not self.boot_id or not self.pid_namespace:
            return False  # this machine could not tell us who it is
        return _start_ticks(self.pid) != self.start_ticks


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_ticks(pid: int) -> int:
    """The process's start time in clock ticks after boot; -1 when there is no such process (or
    only its zombie, which holds nothing any more)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return -1
    # The command name (field 2) is in parentheses and may hold spaces: count from the last ')'.
    after_name = stat[stat.rfind(")") + 2:].split()
    try:
        return -1 if after_name[0] == "Z" else int(after_name[19])  # field 22 overall; field 3 is after_name[0]
    except (IndexError, ValueError):
        return -1
