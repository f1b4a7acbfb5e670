"""Gaussian-process surrogate: Matérn-5/2 ARD kernel with an output scale, fitted by MAP in float64.

Conventions: inputs live in the unit cube and targets are standardised by the caller (zero
mean, unit variance), which is what the priors below assume. The priors follow Optuna's
GPSampler (optuna/_gp/prior.py), which solved Hartmann6 in 9/10 seeds in our reference
runs: on each inverse squared lengthscale t, log p = -(0.1/t + 0.1 t) (keeps lengthscales
between ~0.3 and ~3 cube widths unless the data insist); Gamma(2, 1) on the output scale;
Gamma(1.1, 30) on the noise variance, with a floor of 1e-6 so a deterministic objective
still gets a well-conditioned kernel matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NOISE_FLOOR = 1e-6
_JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4)


class GPFitError(RuntimeError):
    """The kernel matrix could not be factorised even with the largest jitter."""


def robust_cholesky(k: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of `k`, adding escalating jitter to the diagonal when it is not positive definite.

    Raises:
        GPFitError: if even a jitter of 1e-4 times the mean diagonal does not help (NaNs in `k`, say).
    """
    scale = k.diagonal().mean().detach().clamp_min(1e-12)
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    for j in _JITTERS:
        chol, info = torch.linalg.cholesky_ex(k + (j * scale) * eye if j else k)
        if int(info) == 0:
            return chol
    raise GPFitError("kernel matrix is not positive definite even with jitter 1e-4; the inputs may contain NaN")


def matern52(x1: torch.Tensor, x2: torch.Tensor, inv_sq_ls: torch.Tensor) -> torch.Tensor:
    """Matérn-5/2 correlation between the rows of `x1` and `x2` with ARD weights `inv_sq_ls`."""
    d2 = (((x1.unsqueeze(-2) - x2.unsqueeze(-3)) ** 2) * inv_sq_ls).sum(-1)
    # sqrt has an infinite derivative at 0; the clamp keeps gradients finite on the diagonal.
    r = torch.sqrt(5.0 * d2.clamp_min(1e-30))
    return (1.0 + r + r * r / 3.0) * torch.exp(-r)


@dataclass
class KernelParams:
    """Kernel hyperparameters in log space (the space they are optimised in)."""

    log_inv_sq_ls: torch.Tensor  # shape (d,)
    log_scale: torch.Tensor  # shape ()
    log_noise: torch.Tensor  # shape (), noise variance above NOISE_FLOOR

    @classmethod
    def default(cls, dim: int) -> KernelParams:
        z = torch.zeros((), dtype=torch.float64)
        return cls(torch.zeros(dim, dtype=torch.float64), z.clone(), torch.zeros((), dtype=torch.float64))

    def flat(self) -> torch.Tensor:
        return torch.cat([self.log_inv_sq_ls, self.log_scale.view(1), self.log_noise.view(1)])

    @classmethod
    def unflat(cls, v: torch.Tensor) -> KernelParams:
        return cls(v[:-2], v[-2], v[-1])


def _neg_log_posterior(v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = KernelParams.unflat(v)
    t, scale = p.log_inv_sq_ls.exp(), p.log_scale.exp()
    noise = NOISE_FLOOR + p.log_noise.exp()
    k = scale * matern52(x, x, t) + noise * torch.eye(len(x), dtype=x.dtype)
    chol = robust_cholesky(k)
    alpha = torch.cholesky_solve(y.unsqueeze(-1), chol).squeeze(-1)
    mll = -0.5 * (y * alpha).sum() - chol.diagonal().log().sum() - 0.5 * len(x) * math.log(2 * math.pi)
    # Gamma(a, b) log density up to a constant: (a - 1) log s - b s.
    prior = -(0.1 / t + 0.1 * t).sum() + p.log_scale - scale + 0.1 * torch.log(noise) - 30.0 * noise
    return -(mll + prior)


class GaussianProcess:
    """An exact GP posterior for fixed hyperparameters.

    Immutable after construction; `condition` returns a new posterior. Not thread-safe only in
    the sense that torch ops share the process's intra-op thread pool; no shared mutable state.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, params: KernelParams) -> None:
        self.x, self.y, self.params = x, y, params
        self._t = params.log_inv_sq_ls.exp()
        self._scale = params.log_scale.exp()
        noise = NOISE_FLOOR + params.log_noise.exp()
        k = self._scale * matern52(x, x, self._t) + noise * torch.eye(len(x), dtype=x.dtype)
        self._chol = robust_cholesky(k)
        self._alpha = torch.cholesky_solve(y.unsqueeze(-1), self._chol).squeeze(-1)

    def condition(self, x_new: torch.Tensor, y_new: torch.Tensor) -> GaussianProcess:
        """The posterior after also observing `y_new` at `x_new`, with the same hyperparameters."""
        return GaussianProcess(torch.cat([self.x, x_new]), torch.cat([self.y, y_new]), self.params)

    def posterior(self, xq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance of the latent function at the rows of `xq` (differentiable)."""
        kq = self._scale * matern52(xq, self.x, self._t)
        mean = kq @ self._alpha
        v = torch.linalg.solve_triangular(self._chol, kq.transpose(-1, -2), upper=False)
        var = (self._scale - (v * v).sum(-2)).clamp_min(1e-12)
        return mean, var


def fit_gp(x: torch.Tensor, y: torch.Tensor, warm_start: KernelParams | None = None) -> GaussianProcess:
    """Fit kernel hyperparameters by maximising the marginal likelihood plus log priors.

    Runs L-BFGS (torch.optim.LBFGS, strong Wolfe line search) from the previous fit's
    parameters when given and from the defaults, and keeps the better optimum: a warm start
    alone drifts with the data and can stay in a poor mode (seen here on Hartmann6). Falls
    back to the default parameters when every run fails, so a suggestion is always possible.
    The gradient tolerance is loose (as Optuna's gtol=1e-2): the acquisition barely changes
    past it, and the fit dominates the cost of a suggestion.

    Args:
        x: (n, d) float64 inputs in the unit cube.
        y: (n,) float64 standardised targets.
        warm_start: the hyperparameters of the previous fit, if any.

    Returns:
        The posterior under the best hyperparameters found.
    """
    x, y = x.to(torch.float64), y.to(torch.float64)  # float32 Cholesky fails on clustered points
    starts = [KernelParams.default(x.shape[-1])]
    if warm_start is not None and warm_start.log_inv_sq_ls.shape == starts[0].log_inv_sq_ls.shape:
        starts.insert(0, warm_start)
    best_v, best_loss = starts[-1].flat(), math.inf
    for start in starts:
        v = start.flat().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([v], lr=1.0, max_iter=100, tolerance_grad=1e-2, line_search_fn="strong_wolfe")

        def closure(opt: torch.optim.LBFGS = opt, v: torch.Tensor = v) -> torch.Tensor:
            opt.zero_grad()
            loss = _neg_log_posterior(v, x, y)
            loss.backward()
            return loss

        try:
            opt.step(closure)
            with torch.no_grad():
                v.clamp_(-12.0, 12.0)  # keeps exp() finite if the line search wandered far
                loss = float(_neg_log_posterior(v, x, y))
        except GPFitError:
            continue
        if math.isfinite(loss) and loss < best_loss:
            best_v, best_loss = v.detach().clone(), loss
    return GaussianProcess(x, y, KernelParams.unflat(best_v))
