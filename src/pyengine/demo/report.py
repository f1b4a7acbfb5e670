"""Writes the demo's markdown report and its PNG plots (plots need matplotlib; without it
the report says so and still lists every figure it measured)."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from pyengine.demo.section import Section, Table


def write_report(out: Path, sections: list[Section], total_seconds: float) -> Path:
    plotted = _draw_figures(out, sections)
    lines = [
        "# pyengine demo",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; {total_seconds:.0f} s in all.",
        "",
    ]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for line in section.lines:
            lines += line.markdown() if isinstance(line, Table) else [f"- {line}"]
        if not section.ok:
            lines.append("- **this section's check did not hold**")
        lines.append(f"- ({section.seconds:.1f} s)")
        lines.append("")
        for name, _ in section.figures:
            lines.append(f"![{name}]({name})" if plotted else f"- plot {name} skipped: matplotlib is not installed")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _draw_figures(out: Path, sections: list[Section]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    for section in sections:
        for name, draw in section.figures:
            fig, ax = plt.subplots(figsize=(6, 4))
            draw(ax)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            # A long axis label can still reach past the figure: the saved area grows to hold it.
            fig.savefig(out / name, dpi=100, bbox_inches="tight")
            plt.close(fig)
    return True
