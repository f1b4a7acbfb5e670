"""PNG plots of the frequency study (matplotlib is optional: without it, plots are skipped with a
message). One panel per model: overhead against interval, and expected waste against interval
with the Young/Daly optimum and OverheadBudget's choice marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyengine.benchmarks.frequency import BUDGET
from pyengine.benchmarks.savers import CONTROL
from pyengine.benchmarks.tradeoff import expected_waste


def matplotlib_missing() -> str | None:
    """None when matplotlib can be imported, else the message to print instead of plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'pyengine[plot]' or pip install matplotlib)"
    return None


def plot_frequency(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Writes frequency_overhead.png and frequency_waste.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    models = results["models"]
    paths = []
    for kind, draw in (("overhead", _overhead_panel), ("waste", _waste_panel)):
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
        for ax, (name, model) in zip(axes[0], models.items()):
            draw(ax, name, model, results["config"])
        fig.tight_layout()
        path = outdir / f"frequency_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _by_method(model: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in model["rows"]:
        if r["interval"] != BUDGET and r["method"] != CONTROL:
            groups.setdefault(r["method"], []).append(r)
    return groups


def _budget_rows(model: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in model["rows"] if r["interval"] == BUDGET and r["chosen_interval"]]


def _overhead_panel(ax: Any, name: str, model: dict[str, Any], cfg: dict[str, Any]) -> None:
    for method, rows in _by_method(model).items():
        ks = [r["interval"] for r in rows]
        med = [r["overhead"] * 100 for r in rows]
        err = [[m - r["overhead_min"] * 100 for m, r in zip(med, rows)],
               [r["overhead_max"] * 100 - m for m, r in zip(med, rows)]]
        ax.errorbar(ks, med, yerr=err, marker="o", capsize=3, label=method)
    for r in _budget_rows(model):
        ax.plot([r["chosen_interval"]], [r["overhead"] * 100], "k*", markersize=14, label=r["method"])
    for r in model["rows"]:
        if r["method"] == CONTROL:
            ax.axhspan(r["overhead_min"] * 100, r["overhead_max"] * 100, color="grey", alpha=0.2,
                       label="A/A control: measurement noise")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)  # tens of percent and fractions of one on one axis
    ax.set_xlabel("checkpoint every k steps")
    ax.set_ylabel("overhead, % of training time")
    ax.set_title(f"{name}: measured overhead (all rounds; bars: round min..max)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _waste_panel(ax: Any, name: str, model: dict[str, Any], cfg: dict[str, Any]) -> None:
    step = model["baseline_step_seconds"]
    for method, rows in _by_method(model).items():
        ks = [r["interval"] for r in rows]
        line = ax.plot(ks, [r["expected_waste"] * 100 for r in rows], marker="o", label=f"{method} (measured)")
        o = model["methods"][method]
        grid = [min(ks) * (max(ks) / min(ks)) ** (i / 60) for i in range(61)]
        curve = [expected_waste(o["cost_s"], k * step, o["persist_s"], cfg["mtbf_seconds"], cfg["restart_seconds"])
                 for k in grid] if o["cost_s"] > 0 else None
        if curve:
            ax.plot(grid, [w * 100 for w in curve], linestyle="--", color=line[0].get_color(), alpha=0.6)
        ax.plot([o["daly_steps"]], [o["daly_expected_waste"] * 100], marker="v", markersize=10,
                color=line[0].get_color(), linestyle="none")
    for r in _budget_rows(model):
        ax.plot([r["chosen_interval"]], [r["expected_waste"] * 100], "k*", markersize=14, label=r["method"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint every k steps")
    ax.set_ylabel("expected waste, % of training time")
    ax.set_title(f"{name}: MTBF {cfg['mtbf_seconds']:g} s; dashed: model, v: Young/Daly optimum")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
