"""Bayesian optimisation: a GP surrogate and LogEI, with a Sobol initial design and constant liar."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch

from pyengine.tune import acquisition
from pyengine.tune.gp import GPFitError, KernelParams, fit_gp
from pyengine.tune.samplers.base import History, Sampler, random_unseen, trial_rng
from pyengine.tune.space import Choice, IntUniform, Space

log = logging.getLogger(__name__)


class BayesSampler(Sampler):
    """GP-based Bayesian optimisation (minimises; the study flips signs for maximisation).

    The first `n_startup_trials` trials follow a scrambled Sobol sequence indexed by trial
    number, so parallel workers spread out from the start. After that each suggestion:
    standardises the observed values, fits the GP (warm-started from the previous fit),
    conditions it on pending trials with the best observed value as their "lie" (constant
    liar: LogEI at and near a pending point drops to ~0, so another worker goes elsewhere),
    and maximises LogEI. Integer and categorical coordinates are rounded afterwards (one-hot
    blocks to their arg-max); the best candidate whose configuration no trial has yet wins.

    Thread-safety: `suggest` may run in several threads; the only shared state is the warm
    start, read and written under a lock (it is a hint, any value is correct).

    Args:
        n_startup_trials: size of the quasi-random initial design.
        n_raw_samples: Sobol points scored before the local searches.
        n_restarts: number of multi-start L-BFGS searches of the acquisition.
    """

    def __init__(self, n_startup_trials: int = 10, n_raw_samples: int = 2048, n_restarts: int = 10) -> None:
        for name, v in (
            ("n_startup_trials", n_startup_trials),
            ("n_raw_samples", n_raw_samples),
            ("n_restarts", n_restarts),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BayesSampler: {name}={v!r} must be a positive int")
        self.n_startup_trials, self.n_raw_samples, self.n_restarts = n_startup_trials, n_raw_samples, n_restarts
        self._lock = threading.Lock()
        self._warm: KernelParams | None = None

    def suggest(self, space: Space, history: History) -> dict[str, Any] | None:
        rng = trial_rng(history.seed, history.number)
        if len(history.complete) < self.n_startup_trials:
            params = self._initial_point(space, history)
        else:
            # The matrices are ~100 x 100: one thread is fastest, and several OpenMP threads on a
            # busy machine were 10x slower here (optuna #6230 saw the same). With OpenMP the
            # setting is per calling thread, so other threads' training is unaffected.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                params = self._model_point(space, history, rng)
            except (GPFitError, RuntimeError) as e:
                # A numerical failure costs one random trial, not the study.
                log.warning("trial %d: Bayesian suggestion failed (%s); using a random point", history.number, e)
                params = None
            finally:
                torch.set_num_threads(threads)
        if params is None or space.key(params) in history.seen_keys:
            params = random_unseen(space, history, rng)
        return params

    def _initial_point(self, space: Space, history: History) -> dict[str, Any]:
        sobol = torch.quasirandom.SobolEngine(space.dim, scramble=True, seed=history.seed & 0x7FFFFFFF)
        if history.number:
            sobol.fast_forward(history.number)
        return space.decode(sobol.draw(1, dtype=torch.float64)[0].numpy())

    def _model_point(self, space: Space, history: History, rng: np.random.Generator) -> dict[str, Any] | None:
        x = torch.tensor(np.stack([space.encode(p) for p, _ in history.complete]), dtype=torch.float64)
        y = torch.tensor([v for _, v in history.complete], dtype=torch.float64)
        y = (y - y.mean()) / (y.std() if len(y) > 1 and float(y.std()) > 0 else 1.0)
        with self._lock:
            warm = self._warm
        gp = fit_gp(x, y, warm)
        with self._lock:
            self._warm = gp.params
        best = float(y.min())
        if history.pending:
            xp = torch.tensor(np.stack([space.encode(p) for p in history.pending]), dtype=torch.float64)
            gp = gp.condition(xp, torch.full((len(xp),), best, dtype=torch.float64))
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        incumbents = x[torch.argsort(y)[:1]]
        acq = lambda q: acquisition.log_expected_improvement(gp, q, best)  # noqa: E731
        discrete = torch.zeros(space.dim, dtype=torch.bool)
        for name, p in space.params.items():
            if isinstance(p, (Choice, IntUniform)):
                discrete[space._slices[name]] = True
        round_fn = None
        if bool(discrete.any()):

            def round_fn(q: torch.Tensor) -> torch.Tensor:
                return torch.tensor(np.stack([space.round_encoded(r) for r in q.numpy()]), dtype=torch.float64)

        cands, _ = acquisition.maximize(
            acq,
            space.dim,
            gen,
            incumbents=incumbents,
            n_raw=self.n_raw_samples,
            n_starts=self.n_restarts,
            round_fn=round_fn,
            discrete=discrete,
        )
        # The continuous optimum of a one-hot block or an integer coordinate is not a valid
        # configuration: score the rounded candidates and, per categorical parameter, every
        # other category (as Optuna does for <= 16 choices), then take the best unseen one.
        variants = _rounded_variants(space, cands.numpy())
        with torch.no_grad():
            scores = acq(torch.tensor(variants, dtype=torch.float64))
        for i in torch.argsort(torch.nan_to_num(scores, nan=-float("inf")), descending=True).tolist():
            params = space.decode(variants[i])
            if space.key(params) not in history.seen_keys:
                return params
        return None


def _rounded_variants(space: Space, cands: np.ndarray) -> np.ndarray:
    out = []
    for c in cands:
        r = space.round_encoded(c)
        out.append(r)
        for name, p in space.params.items():
            sl = space._slices[name]
            if isinstance(p, Choice) and len(p.choices) <= 16:
                for j in range(len(p.choices)):
                    v = r.copy()
                    v[sl] = 0.0
                    v[sl.start + j] = 1.0
                    out.append(v)
            elif isinstance(p, IntUniform):
                value = space.decode(r)[name]
                for nb in (value - 1, value + 1):
                    if p.low <= nb <= p.high:
                        out.append(space.encode({**space.decode(r), name: nb}))
    return np.unique(np.stack(out), axis=0)
