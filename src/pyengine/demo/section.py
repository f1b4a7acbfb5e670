"""What each demo section hands to the report: a title, markdown lines, and figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    # (file name, function that draws on a matplotlib Axes)
    figures: list[tuple[str, Callable[[Any], None]]] = field(default_factory=list)
    seconds: float = 0.0
    ok: bool = True  # False when the section's claim did not hold (the demo then exits non-zero)

    def say(self, line: str) -> None:
        """Adds a line to the report and prints it."""
        self.lines.append(line)
        print(f"  {line}", flush=True)
