"""Tuning benchmark: pyengine's grid / random / Bayesian samplers beside Optuna's TPE and GPSampler.

    flock /tmp/pyengine-bench.lock python bench/bench_tuning.py                     # everything, 10 seeds
    flock /tmp/pyengine-bench.lock python bench/bench_tuning.py --problems hartmann6 --seeds 10

Prints, per problem and method: median log10 regret of the best value after 25, 50 and 100
evaluations, how many seeds got within 0.01 of the optimum by 50 and by 100, seconds per run,
and for pyengine's sampler the median time of a suggestion at trials 90-100 (through the
Study API, SQLite bookkeeping included). Optuna is a benchmark-only dependency
(pip install 'pyengine[bench]'); its methods are skipped when it is missing. Runs are spread
over `--jobs` processes with one torch thread each.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import numpy as np

_A = np.array(
    [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
)
_P = 1e-4 * np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ]
)
_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def branin(x: np.ndarray) -> float:
    x1, x2 = x
    return float(
        (x2 - 5.1 / (4 * math.pi**2) * x1**2 + 5 / math.pi * x1 - 6) ** 2
        + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1)
        + 10
    )


def hartmann6(x: np.ndarray) -> float:
    return -float(_ALPHA @ np.exp(-(_A * (np.asarray(x) - _P) ** 2).sum(1)))


def ackley(x: np.ndarray) -> float:
    x = np.asarray(x)
    d = len(x)
    return float(
        -20 * math.exp(-0.2 * math.sqrt((x**2).sum() / d)) - math.exp(np.cos(2 * math.pi * x).sum() / d) + 20 + math.e
    )


# name -> (function, bounds, optimum)
PROBLEMS: dict[str, tuple[Callable[[np.ndarray], float], list[tuple[float, float]], float]] = {
    "branin": (branin, [(-5.0, 10.0), (0.0, 15.0)], 0.397887),
    "hartmann6": (hartmann6, [(0.0, 1.0)] * 6, -3.32237),
    "ackley5": (ackley, [(-32.768, 32.768)] * 5, 0.0),
}
METHODS = ["grid", "random", "pyengine-bayes", "optuna-tpe", "optuna-gp"]


def run_one(method: str, problem: str, seed: int, n_evals: int) -> tuple[list[float], float, float | None]:
    """One optimisation run. Returns (values in evaluation order, seconds, suggest time at 90-100)."""
    import torch

    torch.set_num_threads(1)
    f, bounds, _ = PROBLEMS[problem]
    names = [f"x{i}" for i in range(len(bounds))]
    values: list[float] = []
    marks: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    if method.startswith("optuna"):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = (
            optuna.samplers.GPSampler(seed=seed) if method == "optuna-gp" else optuna.samplers.TPESampler(seed=seed)
        )
        study = optuna.create_study(sampler=sampler)

        def ofun(trial: optuna.Trial) -> float:
            v = f(np.array([trial.suggest_float(n, lo, hi) for n, (lo, hi) in zip(names, bounds)]))
            values.append(v)
            return v

        study.optimize(ofun, n_trials=n_evals)
        return values, time.perf_counter() - t0, None
    import pyengine as pe

    space = {n: pe.tune.Uniform(lo, hi) for n, (lo, hi) in zip(names, bounds)}
    if method == "grid":
        k = max(2, int(math.floor(n_evals ** (1 / len(bounds)) + 1e-9)))
        sampler: object = pe.tune.GridSampler(points_per_param=k)
    else:
        sampler = {"random": "random", "pyengine-bayes": "bayes"}[method]
    study = pe.tune.Study(space, sampler=sampler, seed=seed)

    def pfun(trial: pe.tune.Trial) -> float:
        start = time.perf_counter()
        v = f(np.array([trial.params[n] for n in names]))
        values.append(v)
        marks.append((start, time.perf_counter()))
        return v

    study.optimize(pfun, n_trials=n_evals)
    gaps = [marks[i][0] - marks[i - 1][1] for i in range(max(1, len(marks) - 10), len(marks))]
    return values, time.perf_counter() - t0, statistics.median(gaps) if gaps else None


def summarize(problem: str, method: str, runs: list[tuple[list[float], float, float | None]]) -> str:
    fstar = PROBLEMS[problem][2]

    def med_log_regret(n: int) -> str:
        regrets = [min(v[:n]) - fstar for v, _, _ in runs if len(v) >= 1]
        return f"{statistics.median(math.log10(max(r, 1e-12)) for r in regrets):+.2f}"

    solved = [sum(min(v[:n]) - fstar < 0.01 for v, _, _ in runs) for n in (50, 100)]
    secs = statistics.median(s for _, s, _ in runs)
    sug = [t for _, _, t in runs if t is not None]
    sug_s = f"{statistics.median(sug):.3f}" if sug and method == "pyengine-bayes" else "-"
    return (
        f"| {problem} | {method} | {len(runs)} | {med_log_regret(25)} | {med_log_regret(50)} | "
        f"{med_log_regret(100)} | {solved[0]}/{len(runs)} | {solved[1]}/{len(runs)} | {secs:.1f} | {sug_s} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--evals", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    problems, methods = args.problems.split(","), args.methods.split(",")
    try:
        import optuna  # noqa: F401
    except ImportError:
        print("optuna is not installed: skipping its methods (pip install 'pyengine[bench]')")
        methods = [m for m in methods if not m.startswith("optuna")]
    jobs = [
        (m, p, 0 if m == "grid" else s)
        for p in problems
        for m in methods
        for s in range(1 if m == "grid" else args.seeds)
    ]
    print(f"{len(jobs)} runs of {args.evals} evaluations on {args.jobs} processes", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(run_one, *job, args.evals) for job in jobs}
        results = {job: fut.result() for job, fut in futures.items()}
    print(
        "\n| problem | method | seeds | med log10 regret @25 | @50 | @100 | regret<0.01 @50 | @100 | s/run "
        "| s/suggestion @90-100 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in problems:
        for m in methods:
            runs = [r for (mm, pp, _), r in results.items() if mm == m and pp == p]
            print(summarize(p, m, runs))


if __name__ == "__main__":
    main()
