"""A bundled noise-free problem: the closed-form solution of the 1-D heat equation.

    u_t = alpha * u_xx  on x in [0, 1], u(0, t) = u(1, t) = 0,
    u(x, 0) = sum_n a_n sin(n pi x)   =>   u(x, t) = sum_n a_n sin(n pi x) exp(-n^2 pi^2 alpha t)

Every target is exact (no noise, no measurement), and the grid enumerates the whole
input domain, which is the setting where Useful Overfitting applies: there is nothing
to generalise to, so the training error is the error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

DEFAULT_MODES = ((1, 1.0), (2, 0.5))


class HeatEquationData(NamedTuple):
    """Inputs ``[N, 2]`` (columns x, t) and targets ``[N, 1]`` on a grid (x varies fastest)."""

    inputs: torch.Tensor
    targets: torch.Tensor


def heat_solution(
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    alpha: float = 0.1,
    modes: Sequence[tuple[int, float]] = DEFAULT_MODES,
) -> torch.Tensor:
    """u(x, t) for tensors ``x`` and ``t`` of the same shape (any points, on or off a grid).

    Args:
        x: Positions in [0, 1].
        t: Times, >= 0.
        alpha: Thermal diffusivity, > 0.
        modes: ``(n, a_n)`` pairs: the initial condition's sine modes and amplitudes.

    Returns:
        u at each point, with the shape and dtype of ``x``.
    """
    _check(alpha, modes)
    u = torch.zeros_like(x)
    for n, amplitude in modes:
        u = u + amplitude * torch.sin(n * math.pi * x) * torch.exp(-((n * math.pi) ** 2) * alpha * t)
    return u


def heat_equation(
    nx: int = 64,
    nt: int = 64,
    *,
    t_max: float = 0.5,
    alpha: float = 0.1,
    modes: Sequence[tuple[int, float]] = DEFAULT_MODES,
    dtype: torch.dtype = torch.float32,
) -> HeatEquationData:
    """The solution on an ``nx`` x ``nt`` grid covering x in [0, 1] and t in [0, t_max].

    Args:
        nx: Grid points in x (endpoints included), >= 2.
        nt: Grid points in t (endpoints included), >= 2.
        t_max: Last time, > 0.
        alpha: Thermal diffusivity, > 0.
        modes: ``(n, a_n)`` pairs, n >= 1: the initial condition's sine modes.
        dtype: Floating dtype of the tensors (computed in float64, then cast).

    Returns:
        ``HeatEquationData(inputs, targets)`` with ``nx * nt`` rows.

    Raises:
        ValueError: A size, time or coefficient that makes no sense.
    """
    if nx < 2 or nt < 2:
        raise ValueError(f"nx and nt must be >= 2 (the grid includes both ends), got nx={nx}, nt={nt}")
    if not t_max > 0:
        raise ValueError(f"t_max must be > 0, got {t_max}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    xs = torch.linspace(0.0, 1.0, nx, dtype=torch.float64)
    ts = torch.linspace(0.0, t_max, nt, dtype=torch.float64)
    t, x = torch.meshgrid(ts, xs, indexing="ij")
    u = heat_solution(x, t, alpha=alpha, modes=modes)
    inputs = torch.stack([x.reshape(-1), t.reshape(-1)], dim=1)
    return HeatEquationData(inputs.to(dtype), u.reshape(-1, 1).to(dtype))


def _check(alpha: float, modes: Sequence[tuple[int, float]]) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not modes:
        raise ValueError("modes must list at least one (n, amplitude) pair")
    for mode in modes:
        if len(mode) != 2 or int(mode[0]) != mode[0] or mode[0] < 1:
            raise ValueError(f"each mode is (n, amplitude) with an integer n >= 1, got {mode!r}")
