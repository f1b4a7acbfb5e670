"""pyengine's Bayesian optimiser as an Optuna sampler.

    import optuna
    from pyengine.integrations.optuna import PyEngineSampler

    study = optuna.create_study(sampler=PyEngineSampler(seed=0), storage="sqlite:///study.db")
    study.optimize(objective, n_trials=50)

Optuna keeps its storages, pruners and dashboard; each trial's parameters come from
`pyengine.tune.BayesSampler`, shown the study the way pyengine's own `Study` shows it:
completed trials (values negated when maximising), running and queued trials as pending
points (constant liar), the keys of every configuration tried, the trial's number and the
seed. Its randomness is a function of (seed, trial number) only, so processes that share an
Optuna storage and pass the same seed draw different streams and follow one Sobol design.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:
    import optuna
    from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.search_space import intersection_search_space
    from optuna.study import Study, StudyDirection
    from optuna.trial import FrozenTrial, TrialState
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('pyengine.integrations.optuna needs Optuna: pip install "pyengine[optuna]" (optuna>=4.0)') from e

from pyengine.tune.samplers.base import History, trial_rng
from pyengine.tune.samplers.bayes import BayesSampler
from pyengine.tune.space import Choice, IntUniform, LogUniform, Param, Space, Uniform

__all__ = ["PyEngineSampler"]

_PENDING = (TrialState.RUNNING, TrialState.WAITING)


@dataclass(frozen=True)
class _Mapped:
    """One Optuna distribution as a pyengine parameter, with the value maps both ways."""

    param: Param
    to_pyengine: Callable[[Any], Any]
    to_optuna: Callable[[Any], Any]


def _same(v: Any) -> Any:
    return v


def _on_grid(low: float, high: float, step: float, n: int, cast: Callable[[float], Any]) -> _Mapped:
    """A stepped range as the integers 0..n (pyengine has no stepped floats), value low + k * step.

    Clipped to `high`: low + n * step can land an ulp above it, and Optuna silently replaces a
    proposed value outside its distribution with an independent sample.
    """
    return _Mapped(
        IntUniform(0, n),
        lambda v: min(max(round((v - low) / step), 0), n),
        lambda k: cast(min(low + k * step, high)),
    )


def _map_distribution(name: str, dist: BaseDistribution) -> _Mapped:
    """The pyengine parameter for Optuna's `dist` (not single-valued: Optuna fills those itself).

    Raises:
        ValueError: `dist` is of a kind pyengine's space cannot hold; the message says what to do.
    """
    if isinstance(dist, FloatDistribution):
        if dist.step is not None:
            return _on_grid(dist.low, dist.high, dist.step, round((dist.high - dist.low) / dist.step), float)
        return _Mapped(LogUniform(dist.low, dist.high) if dist.log else Uniform(dist.low, dist.high), float, float)
    if isinstance(dist, IntDistribution):
        if dist.step != 1:
            return _on_grid(dist.low, dist.high, dist.step, (dist.high - dist.low) // dist.step, int)
        return _Mapped(IntUniform(dist.low, dist.high, log=dist.log), int, int)
    if isinstance(dist, CategoricalDistribution):
        try:
            return _Mapped(Choice(list(dist.choices)), _same, _same)
        except ValueError as e:
            raise ValueError(
                f"PyEngineSampler: parameter {name!r} cannot be searched: {e}. Give suggest_categorical "
                "distinct plain values (str, int, float, bool or None), for example the names or indices "
                "of the options, and look the real value up in the objective"
            ) from None
    raise ValueError(
        f"PyEngineSampler: parameter {name!r} has a {type(dist).__name__}; PyEngineSampler supports the "
        "distributions of suggest_float, suggest_int and suggest_categorical (FloatDistribution, "
        "IntDistribution, CategoricalDistribution): suggest it with one of those, or use another sampler"
    )


class _JointSpace:
    """Optuna's intersection search space as a pyengine `Space`, and trials' params in it."""

    def __init__(self, distributions: dict[str, BaseDistribution]) -> None:
        self.distributions = distributions
        self.mapped = {name: _map_distribution(name, d) for name, d in distributions.items()}
        self.space = Space({name: m.param for name, m in self.mapped.items()})

    def config(self, trial: FrozenTrial) -> dict[str, Any] | None:
        """`trial`'s configuration in pyengine's values; None unless it has every parameter of the
        space, from the same distribution, a valid value each (an enqueued trial's fixed params
        count: it is a point the study is about to evaluate)."""
        fixed = trial.system_attrs.get("fixed_params", {})
        out = {}
        for name, m in self.mapped.items():
            if name in trial.distributions:
                if trial.distributions[name] != self.distributions[name]:
                    return None
                value = trial.params[name]
            elif name in fixed:
                value = fixed[name]
            else:
                return None
            try:
                out[name] = m.to_pyengine(value)
            except (TypeError, ValueError):
                return None
        try:
            self.space.encode(out)
        except (TypeError, ValueError):
            return None
        return out

    def to_optuna(self, params: dict[str, Any]) -> dict[str, Any]:
        return {name: self.mapped[name].to_optuna(v) for name, v in params.items()}


class PyEngineSampler(optuna.samplers.BaseSampler):
    """An Optuna sampler that proposes with pyengine's Bayesian optimiser (`pe.tune.BayesSampler`).

    The parameters every finished trial shares (Optuna's intersection search space) are
    proposed jointly by the GP; others (conditional ones, or all of them in the first trial,
    before any trial has defined the space) are drawn uniformly at random from a stream seeded
    by (seed, trial number, parameter name). So a study's first trial is random, and from the
    second on the trials are those pyengine's own `Study` with the same seed would propose
    after that first one (Sobol points from index 1, then the GP's).

    Several threads (`n_jobs`) or processes on one RDB storage may share a study: a trial's
    randomness depends only on the seed and its number, which Optuna makes unique, and each
    proposal sees the others' running trials as pending. Unlike pyengine's `Study`, Optuna
    has no claim step, so two workers that propose at the same instant do not see each other
    (in a small discrete space they can propose the same configuration).

    Args:
        seed: seeds every decision, per trial. Processes sharing a study should pass the same
            seed (the default does), so they follow one initial design.
        **bayes_options: passed to `pe.tune.BayesSampler` (`n_startup_trials`, `deterministic`,
            `n_raw_samples`, `n_restarts`, `n_hyper_samples`, `patience`, `stall_tolerance`).

    Raises:
        ValueError: on a bad seed or option; during a trial, for a multi-objective study or a
            distribution pyengine cannot search (the message says what to do).
    """

    def __init__(self, seed: int = 0, **bayes_options: Any) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"PyEngineSampler: seed={seed!r} must be an int")
        self.seed = seed
        self.bayes = BayesSampler(**bayes_options)

    def reseed_rng(self) -> None:
        """Nothing to reseed: every draw comes from (seed, trial number), never from shared state."""

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        _require_single_objective(study)
        shared = intersection_search_space(study.get_trials(deepcopy=False))
        return {name: d for name, d in shared.items() if not d.single()}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        joint = _JointSpace(search_space)
        params = self.bayes.suggest(joint.space, self._history(study, trial, joint))
        # None: every configuration of a finite space was tried; Optuna then samples independently.
        return {} if params is None else joint.to_optuna(params)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        _require_single_objective(study)
        mapped = _map_distribution(param_name, param_distribution)
        space = Space({param_name: mapped.param})
        # Salted by the name so that each parameter has its own stream; never 0, BayesSampler's salt.
        rng = trial_rng(self.seed, trial.number, salt=1 + zlib.crc32(param_name.encode()))
        return mapped.to_optuna(space.decode(rng.random(space.dim))[param_name])

    def _history(self, study: Study, trial: FrozenTrial, joint: _JointSpace) -> History:
        """What BayesSampler is shown for `trial`: the same view as pyengine's `Study._history`."""
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        complete, pending, seen = [], [], set()
        for t in study.get_trials(deepcopy=False):
            config = None if t.number == trial.number else joint.config(t)
            if config is None:
                continue
            seen.add(joint.space.key(config))
            if t.state == TrialState.COMPLETE and t.value is not None and not math.isnan(t.value):
                complete.append((config, sign * t.value))
            elif t.state in _PENDING:
                pending.append(config)
        return History(complete=complete, pending=pending, seen_keys=seen, number=trial.number, seed=self.seed)


def _require_single_objective(study: Study) -> None:
    if len(study.directions) > 1:
        raise ValueError(
            f"PyEngineSampler optimises one objective, and this study has {len(study.directions)} "
            "(directions=[...]): combine them into one value (a weighted sum, or one objective with the "
            "others as constraints), or use a multi-objective sampler such as optuna.samplers.NSGAIISampler"
        )
