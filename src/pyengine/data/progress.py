"""A dependency-free progress line on stderr for long dataset writes."""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """Prints ``desc: n/total samples (rate/s)`` on one stderr line, at most 5 times a second.

    Args:
        desc: What is being done.
        total: Expected number of samples, or None when unknown.
        enabled: None shows it only when stderr is a terminal.
    """

    def __init__(self, desc: str, total: Optional[int], enabled: Optional[bool]) -> None:
        self.desc = desc
        self.total = total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.count = 0
        self._start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.count += n
        now = time.perf_counter()
        if self.enabled and now - self._last >= 0.2:
            self._last = now
            self._print(now)

    def close(self) -> None:
        if self.enabled:
            self._print(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _print(self, now: float) -> None:
        rate = self.count / max(now - self._start, 1e-9)
        of_total = f"/{self.total}" if self.total is not None else ""
        sys.stderr.write(f"\r{self.desc}: {self.count}{of_total} samples ({rate:,.0f}/s)")
        sys.stderr.flush()
