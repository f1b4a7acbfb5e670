"""What each demo section hands to the report: a title, markdown lines and tables, and figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> list[str]:
        return ["", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header),
                *("| " + " | ".join(row) + " |" for row in self.rows), ""]

    def text(self) -> list[str]:
        """The table in aligned columns, for the terminal."""
        widths = [max(len(r[i]) for r in [self.header, *self.rows]) for i in range(len(self.header))]
        return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [self.header, *self.rows]]


@dataclass
class Section:
    title: str
    lines: list[Union[str, Table]] = field(default_factory=list)
    # (file name, function that draws on a matplotlib Axes)
    figures: list[tuple[str, Callable[[Any], None]]] = field(default_factory=list)
    seconds: float = 0.0
    ok: bool = True  # False when the section's claim did not hold (the demo then exits non-zero)

    def say(self, line: str) -> None:
        """Adds a line to the report and prints it."""
        self.lines.append(line)
        print(f"  {line}", flush=True)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        """Adds a table to the report and prints it."""
        table = Table(header, rows)
        self.lines.append(table)
        for line in table.text():
            print(f"    {line}", flush=True)
