"""Plots of a study (matplotlib is an optional dependency: pip install 'pyengine[plot]')."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyengine.tune.trial import TrialState


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "pe.tune.plots needs matplotlib: pip install 'pyengine[plot]' (or pip install matplotlib)"
        ) from e
    return plt


def _complete(study: Any) -> list:
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        raise ValueError("nothing to plot: the study has no completed trial yet")
    return done


def plot_history(study: Any, path: str | Path) -> Path:
    """Save each completed trial's value and the best-so-far against trial number as a PNG.

    Returns:
        The path written.
    """
    plt = _pyplot()
    done = _complete(study)
    best, curve = None, []
    for t in done:
        better = best is None or (t.value < best if study.direction == "minimize" else t.value > best)
        best = t.value if better else best
        curve.append(best)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t.number for t in done], [t.value for t in done], s=12, alpha=0.5, label="trial value")
    ax.step([t.number for t in done], curve, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel("objective")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_params(study: Any, path: str | Path) -> Path:
    """Save one panel per parameter: the parameter's value against the objective, as a PNG.

    Returns:
        The path written.
    """
    plt = _pyplot()
    done = _complete(study)
    names = list(study.space.params)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        p = study.space.params[name]
        xs = [t.params[name] for t in done]
        if hasattr(p, "choices"):
            xs = [list(p.choices).index(x) for x in xs]
            ax.set_xticks(range(len(p.choices)), [str(c) for c in p.choices])
        elif getattr(p, "log", False):
            ax.set_xscale("log")
        ax.scatter(xs, [t.value for t in done], s=12, alpha=0.6)
        ax.set_xlabel(name)
    axes[0][0].set_ylabel("objective")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
