"""Local scratch space for an object-store checkpoint: the C++ writer writes a part here before
it is uploaded, and a step is downloaded here before the verified reader opens it.

Nothing here needs to survive a crash (the object store is the durable place), so memory is
preferred: /dev/shm, when it leaves at least half of its free space and of the machine's
available memory after the part; else the system temp directory (disk). A given `spool_dir`
is the only place used. Each process writes only into its own directory there,
`pyengine-spool-<pid namespace>-<pid>-<random>`, removed when its storage is dropped or at
exit; a process killed before that leaves it behind, and the next spool on the same machine
removes the directories of processes that are dead (process_identity.py).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path

from pyengine.checkpoint.process_identity import ProcessIdentity

MEMORY_DIR = Path("/dev/shm")
_PREFIX = "pyengine-spool-"
_HEADROOM = 64 << 20  # headers and alignment padding of the shard files, and then some


class LocalSpool:
    """Private scratch directories of one storage; thread-safe (the training thread reads, the
    commit thread writes)."""

    def __init__(self, spool_dir: str | None) -> None:
        self._fixed = spool_dir is not None
        self._bases = [Path(spool_dir)] if spool_dir is not None else [MEMORY_DIR, Path(tempfile.gettempdir())]
        self._created: list[Path] = []
        self._private: dict[Path, Path] = {}
        self._me = ProcessIdentity.current()
        weakref.finalize(self, _remove_all, self._created)

    def new_directory(self, name: str, nbytes: int) -> Path:
        """Creates and returns an empty directory `name` on the first base with room for
        `nbytes`. Raises OSError(ENOSPC), naming the place and the option to set, when none has."""
        for base in self._bases:
            if self._has_room(base, nbytes):
                path = self._private_dir(base) / name
                shutil.rmtree(path, ignore_errors=True)  # a leftover of an earlier try of the same name
                path.mkdir(parents=True)
                return path
        where = ", ".join(f"{b} ({_free_bytes(b) >> 20} MiB free)" for b in self._bases)
        raise OSError(errno.ENOSPC, f"no local spool directory has room for {nbytes >> 20} MiB: {where}. Pass "
                                    "storage_options={'spool_dir': '/a/larger/local/disk'}")

    def _has_room(self, base: Path, nbytes: int) -> bool:
        if not os.access(base, os.W_OK | os.X_OK):
            return False
        need = nbytes + nbytes // 20 + _HEADROOM
        if self._fixed or base != MEMORY_DIR:
            return _free_bytes(base) >= need
        return need <= min(_free_bytes(base), _available_memory()) // 2

    def _private_dir(self, base: Path) -> Path:
        if base not in self._private:
            _remove_dead_spools(base, self._me)
            me = self._me
            path = base / f"{_PREFIX}{_namespace_number(me.pid_namespace)}-{me.pid}-{uuid.uuid4().hex[:8]}"
            path.mkdir(mode=0o700)
            self._created.append(path)
            self._private[base] = path
        return self._private[base]


def remove_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _remove_all(paths: list[Path]) -> None:
    for p in paths:
        remove_quietly(p)


def _remove_dead_spools(base: Path, me: ProcessIdentity) -> None:
    pattern = re.compile(rf"^{_PREFIX}{_namespace_number(me.pid_namespace)}-(\d+)-[0-9a-f]+$")
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m is None or int(m.group(1)) == me.pid:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(base / name, ignore_errors=True)  # its process is gone: nobody else writes there
        except PermissionError:
            pass  # alive, another user's


def _namespace_number(pid_namespace: str) -> str:
    digits = re.sub(r"\D", "", pid_namespace)
    return digits or "0"


def _free_bytes(base: Path) -> int:
    try:
        return shutil.disk_usage(base).free
    except OSError:
        return 0


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
