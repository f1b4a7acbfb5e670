"""Log expected improvement and its maximisation over the unit cube.

LogEI rather than EI: once the incumbent is good, EI underflows to exactly 0 over most of the
cube (phi(z) is 0 in float64 below z ~ -38) and its gradient vanishes well before that, so a
gradient optimiser started there never moves. Computing log h(z), h(z) = phi(z) + z Phi(z),
through erfcx keeps value and gradient finite for any z (Ament et al., NeurIPS 2023).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import torch

from pyengine.tune.gp import GaussianProcess

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_SQRT_HALF_PI = math.sqrt(math.pi / 2)


def log_h(z: torch.Tensor) -> torch.Tensor:
    """log(phi(z) + z Phi(z)), finite with a finite gradient for every finite z."""
    # Each branch gets inputs inside its own domain so that torch.where never sees NaN gradients.
    z_hi = z.clamp_min(-1.0)
    direct = torch.log(torch.exp(-0.5 * z_hi * z_hi) / math.sqrt(2 * math.pi) + z_hi * torch.special.ndtr(z_hi))
    z_mid = z.clamp(-1e6, -1.0)
    # h(z) = phi(z) * (1 + z * Phi(z)/phi(z)), and Phi(z)/phi(z) = sqrt(pi/2) * erfcx(-z/sqrt(2)).
    inner = 1.0 + z_mid * _SQRT_HALF_PI * torch.special.erfcx(-z_mid / math.sqrt(2.0))
    mid = -0.5 * z_mid * z_mid - _LOG_SQRT_2PI + torch.log(inner.clamp_min(1e-300))
    # Far tail: 1 + z Phi/phi ~ 1/z^2 cancels catastrophically, so use the asymptote.
    z_lo = z.clamp_max(-1e6)
    tail = -0.5 * z_lo * z_lo - _LOG_SQRT_2PI - 2.0 * torch.log(-z_lo)
    return torch.where(z > -1.0, direct, torch.where(z > -1e6, mid, tail))


def log_expected_improvement(gp: GaussianProcess, x: torch.Tensor, best: float) -> torch.Tensor:
    """log E[max(best - f(x), 0)] under the posterior (minimisation), one value per row of `x`."""
    mean, var = gp.posterior(x)
    sigma = var.sqrt()
    return torch.log(sigma) + log_h((best - mean) / sigma)


def log_mean_expected_improvement(
    gps: Sequence[GaussianProcess], weights: Sequence[float], x: torch.Tensor, best: float
) -> torch.Tensor:
    """log of the weighted mean of EI over several posteriors (one per hyperparameter setting).

    Integrating EI over the kernel hyperparameters (Snoek et al., NeurIPS 2012) keeps
    plausible short lengthscales alive: a single MAP fit that has decided a coordinate does
    not matter sends every suggestion back into the basin it knows.
    """
    if len(gps) == 1:
        return log_expected_improvement(gps[0], x, best)
    logs = torch.stack([log_expected_improvement(gp, x, best) for gp in gps])
    logw = torch.log(torch.tensor(weights, dtype=logs.dtype) / sum(weights)).unsqueeze(-1)
    return torch.logsumexp(logs + logw, dim=0)


def integer_moves(
    acq: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    moves: Sequence[tuple[int, Callable[[torch.Tensor], torch.Tensor]]],
    max_passes: int = 3,
) -> torch.Tensor:
    """Coordinate search over integer coordinates: move each to its best value, until no move helps.

    The continuous optimum of a relaxed integer is only a starting point: after rounding,
    many values of each coordinate (its whole grid when small) are scored for every
    candidate at once, which finds an optimum several integers away that a +-1 probe misses.

    Args:
        acq: the acquisition, (m, dim) -> (m,).
        x: (k, dim) candidates, already on the integer grid.
        moves: (coordinate, values) per integer parameter, where values maps the (k,)
            current encoded values of that coordinate to (k, g) encoded values to try.
        max_passes: sweeps over all integer coordinates.

    Returns:
        The improved candidates, same shape as `x`.
    """
    x = x.clone()
    with torch.no_grad():
        current = torch.nan_to_num(acq(x), nan=-math.inf)
        for _ in range(max_passes):
            moved = False
            for coord, values in moves:
                grid = values(x[:, coord])  # (k, g)
                trial = x.unsqueeze(1).repeat(1, grid.shape[1], 1)
                trial[:, :, coord] = grid
                vals = torch.nan_to_num(acq(trial.reshape(-1, x.shape[-1])), nan=-math.inf).view(grid.shape)
                best_val, best_idx = vals.max(dim=1)
                better = best_val > current + 1e-12
                if bool(better.any()):
                    moved = True
                    x[better, coord] = grid[better, best_idx[better]]
                    current = torch.where(better, best_val, current)
            if not moved:
                break
    return x


def _to_unbounded(x: torch.Tensor) -> torch.Tensor:
    # dx/du vanishes at the bounds, so a start exactly on a bound could never leave it; start
    # a hair inside instead.
    return torch.arccos((1.0 - 2.0 * x).clamp(-1.0 + 2e-3, 1.0 - 2e-3)) / math.pi


def _to_cube(u: torch.Tensor) -> torch.Tensor:
    # x = (1 - cos(pi u)) / 2 maps the real line onto [0, 1] smoothly, so an unconstrained
    # L-BFGS (torch has no L-BFGS-B) can still reach the bounds.
    return 0.5 - 0.5 * torch.cos(math.pi * u)


def maximize(
    acq: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    generator: torch.Generator,
    incumbents: torch.Tensor | None = None,
    n_raw: int = 2048,
    n_starts: int = 10,
    max_iter: int = 100,
    round_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    discrete: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise `acq` over [0, 1]^dim by multi-start L-BFGS from quasi-random raw samples.

    Starts: the best of `n_raw` scrambled Sobol points, roulette draws among them with weights
    proportional to EI (diversity), and the incumbents (late gains come from refining them).
    All starts are optimised jointly in one batch, which is valid because the summed objective
    separates across starts.

    Args:
        acq: maps an (m, dim) tensor to (m,) values, differentiably.
        dim: dimension of the cube.
        generator: source of randomness (seeded by the caller).
        incumbents: (k, dim) points to search around, e.g. the best observations.
        n_raw: number of Sobol raw samples.
        n_starts: number of local searches.
        max_iter: L-BFGS iterations.
        round_fn: maps raw points to valid configurations (integers, one-hot blocks); raw
            points are scored after rounding, since the GP only ever saw valid ones.
        discrete: boolean mask of coordinates the local searches keep fixed at their start.

    Returns:
        (candidates, values): the optimised points and their acquisition values, best first.
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    raw = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed).draw(n_raw, dtype=torch.float64)
    if round_fn is not None:
        raw = round_fn(raw)
    with torch.no_grad():
        vals = torch.cat([acq(chunk) for chunk in raw.split(1024)])
    vals = torch.nan_to_num(vals, nan=-math.inf)
    first = int(torch.argmax(vals))
    # Roulette over the raw points with weights proportional to EI itself (Optuna's rule); the
    # incumbents always start a search too, since late gains come from refining them.
    weights = torch.exp(vals - vals[first]).nan_to_num(0.0)
    weights[first] = 0.0
    n_extra = min(n_starts - 1 - (0 if incumbents is None else len(incumbents)), int((weights > 0).sum()))
    picks = [torch.tensor([first])]
    if n_extra > 0:
        picks.append(torch.multinomial(weights, n_extra, generator=generator))
    starts = raw[torch.cat(picks)]
    start_vals = vals[torch.cat(picks)]
    if incumbents is not None and len(incumbents):
        with torch.no_grad():
            starts = torch.cat([starts, incumbents])
            start_vals = torch.cat([start_vals, torch.nan_to_num(acq(incumbents), nan=-math.inf)])
    fixed = torch.zeros(dim, dtype=torch.bool) if discrete is None else discrete
    u = _to_unbounded(starts).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -acq(torch.where(fixed, starts, _to_cube(u))).sum()
        loss.backward()
        return loss

    if not bool(fixed.all()):
        opt.step(closure)
    with torch.no_grad():
        x = torch.where(fixed, starts, _to_cube(u))
        fx = torch.nan_to_num(acq(x), nan=-math.inf)
        # A start the line search made worse keeps its raw point.
        worse = fx < start_vals
        x[worse], fx[worse] = starts[worse], start_vals[worse]
    order = torch.argsort(fx, descending=True)
    return x[order], fx[order]
