"""The one synchronisation point of an overlapped save (CheckFreq's pipelining).

`Checkpointer.save(..., overlap=True)` returns before parameters and optimizer state are
staged: the copy runs during the next forward and backward passes, which read but never
write them. The first optimizer step after that must not start until the copy is done, so
a global optimizer step pre-hook waits for it. Any optimizer counts, including ones that
were not part of the saved state, since any of them may write the saved parameters.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from torch.optim.optimizer import register_optimizer_step_pre_hook


class OverlapGuard:
    """Holds the snapshots still being copied and blocks optimizer steps until they finish.

    Called from the training thread only; the hook is registered while any Checkpointer
    that uses overlap is open.
    """

    def __init__(self) -> None:
        self._pending: list[Callable[[], None]] = []
        self._hook: Any = None
        self._lock = threading.Lock()

    def add(self, wait_snapshot: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(wait_snapshot)
            if self._hook is None:
                self._hook = register_optimizer_step_pre_hook(self._before_step)

    def drain(self) -> None:
        """Waits for every pending snapshot (the synchronisation point)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for wait in pending:
            wait()

    def close(self) -> None:
        self.drain()
        with self._lock:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._pending:
            self.drain()
