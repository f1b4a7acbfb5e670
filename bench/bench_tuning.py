"""Tuning benchmark: pyengine's samplers beside Optuna's TPE and GPSampler, synthetic and real.

    flock /tmp/pyengine-bench.lock python bench/bench_tuning.py --seeds 20 --out bench-out/tuning
    flock /tmp/pyengine-bench.lock python bench/bench_tuning.py --problems hartmann6 --seeds 20
    flock /tmp/pyengine-bench.lock python bench/bench_tuning.py --problems lcbench          # the real one

Synthetic problems (Branin, Hartmann6, Ackley5; minimised, known optimum): per method, how many
seeds got within 0.01 of the optimum after 25, 50 and 100 evaluations, the median and
quartiles of log10 regret at the end, seconds per run and the median time of one suggestion
over the last 10 trials (the gap between two objective calls, so storage bookkeeping and
any CPU contention are included), and one pyengine suggestion at 100 trials in 6-D timed
alone after the runs.

`lcbench` is YAHPO Gym's LCBench surrogate (pyengine.benchmarks.yahpo_lcbench): validation
error of an MLP after 52 epochs on 10 OpenML tasks, 50 evaluations, 10 seeds (`--lcbench-*`),
for pyengine Bayes, Optuna GP, Optuna TPE, random search, pyengine Bayes with ASHA pruning
on the epoch fidelity (reporting every epoch; budget = the same number of epochs as 50 full
runs), and (`--lcbench-methods ...,pyengine-bayes-zero`) pyengine Bayes with a zero prior
mean and no basin escape, BayesSampler(prior_mean="zero", patience=0). Its table gives the
mean normalised regret: per task, (best value found - best value seen by any method or seed)
/ (worst value seen - best value seen), averaged over tasks and seeds.

A PNG per problem (median regret against evaluations, quartile bands) goes to `--out` when
matplotlib is installed. Optuna and onnxruntime are benchmark-only dependencies
(pip install 'pyengine[bench]'); methods or problems that need a missing one are skipped.
Runs are spread over `--jobs` processes with one torch thread each.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

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
LCBENCH_METHODS = ["random", "pyengine-bayes", "pyengine-bayes-asha", "optuna-tpe", "optuna-gp"]
TOLERANCE = 0.01
ASHA = {"min_resource": 4, "reduction_factor": 3}  # rungs at epochs 4, 12, 36; 108 > 52 completes


def _optuna_sampler(method: str, seed: int) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if method == "optuna-gp":
        return optuna.samplers.GPSampler(seed=seed)
    if method == "optuna-tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _pyengine_sampler(method: str) -> Any:
    import pyengine as pe

    if method == "pyengine-bayes-zero":  # settings for searches whose optima sit at the range bounds
        return pe.tune.BayesSampler(prior_mean="zero", patience=0)
    return pe.tune.BayesSampler() if method.startswith("pyengine-bayes") else "random"


class _Clock:
    """Times the gaps between objective calls: what the sampler (and the study's bookkeeping) took."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.gaps: list[float] = []

    def start(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.gaps.append(now - self.last)

    def stop(self) -> None:
        self.last = time.perf_counter()


def run_one(method: str, problem: str, seed: int, n_evals: int) -> tuple[list[float], float, list[float]]:
    """One run on a synthetic problem: (values in evaluation order, seconds, suggestion times)."""
    import torch

    torch.set_num_threads(1)
    f, bounds, _ = PROBLEMS[problem]
    names = [f"x{i}" for i in range(len(bounds))]
    values: list[float] = []
    clock = _Clock()
    t0 = time.perf_counter()

    def evaluate(x: np.ndarray) -> float:
        clock.start()
        values.append(f(x))
        clock.stop()
        return values[-1]

    if method.startswith("optuna"):
        import optuna

        study = optuna.create_study(sampler=_optuna_sampler(method, seed))
        study.optimize(
            lambda t: evaluate(np.array([t.suggest_float(n, lo, hi) for n, (lo, hi) in zip(names, bounds)])),
            n_trials=n_evals,
        )
    else:
        import pyengine as pe

        space = {n: pe.tune.Uniform(lo, hi) for n, (lo, hi) in zip(names, bounds)}
        if method == "grid":
            k = max(2, int(math.floor(n_evals ** (1 / len(bounds)) + 1e-9)))
            sampler: Any = pe.tune.GridSampler(points_per_param=k)
        else:
            sampler = _pyengine_sampler(method)
        pstudy = pe.tune.Study(space, sampler=sampler, seed=seed)
        pstudy.optimize(lambda t: evaluate(np.array([t.params[n] for n in names])), n_trials=n_evals)
    return values, time.perf_counter() - t0, clock.gaps


_LCBENCH: dict[str, Any] = {}


def _cached_asha(**kwargs: Any) -> Any:
    """pe.tune.ASHAPruner with each trial's rung values memoised by (trial, last step reported).

    The pruner recomputes every trial's rung values for every paused trial at every claim,
    O(trials^2 x steps) per claim; with ~250 trials per run that was most of a run's time.
    Same decisions, only cached.
    """
    import pyengine as pe

    class CachedASHA(pe.tune.ASHAPruner):
        def __init__(self) -> None:
            super().__init__(**kwargs)
            self._memo: dict[tuple[int, int | None, int], dict[int, float]] = {}

        def _rung_values(self, t: Any) -> dict[int, float]:
            key = (t.number, t.last_step, len(t.intermediate))
            if key not in self._memo:
                self._memo[key] = super()._rung_values(t)
            return self._memo[key]

    return CachedASHA()


def run_lcbench(method: str, task: str, seed: int, n_evals: int) -> tuple[list[float], float]:
    """One run on an LCBench task: (best full-run error after each full-run equivalent of epochs, seconds).

    Without pruning every trial trains 52 epochs, so entry i is the best error after i + 1
    trials. With ASHA, trials report each epoch and may pause at a rung (and be promoted
    later); the run stops when it has used n_evals * 52 epochs, and entry i is the best
    error of a trial that completed all 52 epochs within the first (i + 1) * 52 epochs used.
    """
    import torch

    import pyengine as pe
    from pyengine.benchmarks import yahpo_lcbench

    torch.set_num_threads(1)
    bench = _LCBENCH.get(task) or _LCBENCH.setdefault(task, yahpo_lcbench.LCBench(task))
    budget = n_evals * yahpo_lcbench.MAX_EPOCH
    events: list[tuple[int, float]] = []  # (epochs used so far, error of a trial that just completed)
    used = 0
    t0 = time.perf_counter()
    if method.startswith("optuna"):
        import optuna

        space = yahpo_lcbench.search_space()

        def ofun(trial: optuna.Trial) -> float:
            nonlocal used
            config = {}
            for name, p in space.items():
                if isinstance(p, pe.tune.IntUniform):
                    config[name] = trial.suggest_int(name, p.low, p.high, log=p.log)
                else:
                    config[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
            used += yahpo_lcbench.MAX_EPOCH
            events.append((used, bench.error(config)))
            return events[-1][1]

        optuna.create_study(sampler=_optuna_sampler(method, seed)).optimize(ofun, n_trials=n_evals)
    else:
        done: dict[int, int] = {}  # trial number -> epochs trained (a paused trial resumes there)

        def pfun(trial: pe.tune.Trial) -> float:
            nonlocal used
            curve = bench.curve(trial.params)
            if pruner is None:
                used += yahpo_lcbench.MAX_EPOCH
                events.append((used, float(curve[-1])))
                return float(curve[-1])
            for epoch in range(done.get(trial.number, 0) + 1, yahpo_lcbench.MAX_EPOCH + 1):
                used += 1
                done[trial.number] = epoch
                trial.report(epoch, float(curve[epoch - 1]))
                if epoch < yahpo_lcbench.MAX_EPOCH and trial.should_prune():
                    raise pe.tune.TrialPruned()
            events.append((used, float(curve[-1])))
            return float(curve[-1])

        pruner = _cached_asha(max_resource=yahpo_lcbench.MAX_EPOCH, **ASHA) if method.endswith("asha") else None
        study = pe.tune.Study(yahpo_lcbench.search_space(), sampler=_pyengine_sampler(method), seed=seed, pruner=pruner)
        while used < budget:
            before = used
            study.optimize(pfun, n_trials=1)
            if used == before:
                break  # the sampler has nothing left to propose
    best, curve_out = math.inf, []
    for k in range(1, n_evals + 1):
        best = min(
            [best] + [v for u, v in events if (k - 1) * yahpo_lcbench.MAX_EPOCH < u <= k * yahpo_lcbench.MAX_EPOCH]
        )
        curve_out.append(best)
    return curve_out, time.perf_counter() - t0


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = np.percentile(xs, [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def synthetic_table(problem: str, methods: list[str], results: dict[tuple[str, str, int], Any], n_evals: int) -> str:
    fstar = PROBLEMS[problem][2]
    marks = [n for n in (25, 50, 100) if n <= n_evals] or [n_evals]
    head = "| method | seeds | " + " | ".join(f"within {TOLERANCE} @{n}" for n in marks)
    lines = [
        f"{problem} (optimum {fstar}, {n_evals} evaluations)",
        head + " | log10 regret @end: median [q25, q75] | s/run | s/suggestion, last 10 trials (median) |",
        "|---" * (len(marks) + 5) + "|",
    ]
    for m in methods:
        runs = [r for (mm, pp, _), r in sorted(results.items()) if mm == m and pp == problem]
        if not runs:
            continue
        within = [f"{sum(min(v[:n]) - fstar < TOLERANCE for v, _, _ in runs)}/{len(runs)}" for n in marks]
        q25, q50, q75 = _quartiles([math.log10(max(min(v) - fstar, 1e-12)) for v, _, _ in runs])
        late = [g for _, _, gaps in runs for g in gaps[-11:]]
        sug = f"{statistics.median(late):.3f}" if late and m != "grid" else "-"
        secs = statistics.median(s for _, s, _ in runs)
        lines.append(
            f"| {m} | {len(runs)} | "
            + " | ".join(within)
            + f" | {q50:+.2f} [{q25:+.2f}, {q75:+.2f}] | {secs:.1f} | {sug} |"
        )
    return "\n".join(lines)


def lcbench_normalised(results: dict[tuple[str, str, int], Any]) -> dict[tuple[str, str, int], np.ndarray]:
    """Per run, normalised regret after each evaluation (see the module docstring)."""
    tasks = {t for _, t, _ in results}
    out = {}
    for task in tasks:
        runs = {k: np.array(v[0]) for k, v in results.items() if k[1] == task}
        finite = np.concatenate([r[np.isfinite(r)] for r in runs.values()])
        lo, hi = float(finite.min()), float(finite.max())
        for k, r in runs.items():
            out[k] = np.where(np.isfinite(r), (r - lo) / (hi - lo) if hi > lo else 0.0 * r, 1.0)
    return out


def lcbench_table(methods: list[str], results: dict[tuple[str, str, int], Any], n_evals: int) -> str:
    norm = lcbench_normalised(results)
    tasks = sorted({t for _, t, _ in results}, key=int)
    seeds = len({s for _, _, s in results})
    marks = sorted({min(n, n_evals) for n in (10, 25, n_evals)})
    lines = [
        f"lcbench (YAHPO LCBench surrogate: validation error % after 52 epochs; {len(tasks)} tasks x up to "
        f"{seeds} seeds, {n_evals} full-run equivalents; regret normalised per task by the best and worst values "
        "seen by any method or seed)",
        "| method | runs | "
        + " | ".join(f"mean normalised regret @{n}" for n in marks)
        + " | median [q25, q75] @end | tasks where best mean | s/run |",
        "|---" * (len(marks) + 5) + "|",
    ]
    per_task = {(m, t): np.mean([norm[k][-1] for k in norm if k[0] == m and k[1] == t]) for m in methods for t in tasks}
    for m in methods:
        keys = [k for k in norm if k[0] == m]
        if not keys:
            continue
        means = [float(np.mean([norm[k][n - 1] for k in keys])) for n in marks]
        q25, q50, q75 = _quartiles([float(norm[k][-1]) for k in keys])
        wins = sum(per_task[(m, t)] <= min(per_task[(o, t)] for o in methods if (o, t) in per_task) for t in tasks)
        secs = statistics.median(results[k][1] for k in keys)
        lines.append(
            f"| {m} | {len(keys)} | "
            + " | ".join(f"{x:.4f}" for x in means)
            + f" | {q50:.4f} [{q25:.4f}, {q75:.4f}] | {wins}/{len(tasks)} | {secs:.1f} |"
        )
    return "\n".join(lines)


def plot_regret(name: str, curves: dict[str, list[np.ndarray]], ylabel: str, outdir: Path, log: bool) -> Path:
    """Median (line) and quartiles (band) of best-so-far regret against evaluations, one line per method."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in curves.items():
        a = np.array(runs)
        q25, q50, q75 = np.percentile(a, [25, 50, 75], axis=0)
        n = np.arange(1, a.shape[1] + 1)
        (line,) = ax.plot(n, q50, label=f"{method} ({len(runs)} seeds)")
        ax.fill_between(n, q25, q75, color=line.get_color(), alpha=0.15)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("evaluations (full-run equivalents)" if name == "lcbench" else "evaluations")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{name}: median best-so-far regret, quartile bands")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = outdir / f"tuning_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def suggest_latency(n_trials: int = 100, dim: int = 6, repeats: int = 5) -> float:
    """Median seconds of one BayesSampler suggestion at `n_trials` completed Hartmann6 trials, in this process."""
    import torch

    import pyengine as pe
    from pyengine.tune.samplers import History

    torch.set_num_threads(1)
    space = pe.tune.Space({f"x{i}": pe.tune.Uniform(0.0, 1.0) for i in range(dim)})
    rng = np.random.default_rng(0)
    complete = [
        (p, hartmann6(np.array(list(p.values())))) for p in (space.decode(rng.random(dim)) for _ in range(n_trials))
    ]
    sampler = pe.tune.BayesSampler()
    seen = {space.key(p) for p, _ in complete}
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        sampler.suggest(space, History(complete, [], seen, n_trials + i, 0))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first call also warms the fit's start


def _available(methods: list[str], module: str) -> list[str]:
    try:
        __import__(module)
    except ImportError:
        print(f"{module} is not installed: skipping the methods that need it (pip install 'pyengine[bench]')")
        return [m for m in methods if not m.startswith("optuna")] if module == "optuna" else []
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=",".join([*PROBLEMS, "lcbench"]))
    parser.add_argument("--methods", default=",".join(METHODS), help="for the synthetic problems")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--evals", type=int, default=100)
    parser.add_argument("--lcbench-methods", default=",".join(LCBENCH_METHODS))
    parser.add_argument("--lcbench-tasks", type=int, default=10, help="the first N LCBench tasks")
    parser.add_argument("--lcbench-seeds", type=int, default=10)
    parser.add_argument("--lcbench-evals", type=int, default=50)
    parser.add_argument(
        "--lcbench-asha-seeds", type=int, default=None, help="seeds for the ASHA run (default: --lcbench-seeds)"
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=Path("bench-out/tuning"), help="folder for the PNG plots")
    args = parser.parse_args()
    problems = args.problems.split(",")
    synthetic = [p for p in problems if p in PROBLEMS]
    methods = _available(args.methods.split(","), "optuna")
    jobs: list[tuple[Any, ...]] = [
        (run_one, m, p, 0 if m == "grid" else s, args.evals)
        for p in synthetic
        for m in methods
        for s in range(1 if m == "grid" else args.seeds)
    ]
    lc_methods: list[str] = []
    if "lcbench" in problems and _available(["onnxruntime"], "onnxruntime"):
        from pyengine.benchmarks import yahpo_lcbench

        lc_methods = _available(args.lcbench_methods.split(","), "optuna")
        tasks = yahpo_lcbench.tasks()[: args.lcbench_tasks]
        asha_seeds = args.lcbench_seeds if args.lcbench_asha_seeds is None else args.lcbench_asha_seeds
        jobs += [
            (run_lcbench, m, t, s, args.lcbench_evals)
            for t in tasks
            for m in lc_methods
            for s in range(asha_seeds if m.endswith("asha") else args.lcbench_seeds)
        ]
    print(f"{len(jobs)} runs on {args.jobs} processes", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(*job): job[1:4] for job in jobs}
        results = {}
        for done, fut in enumerate(as_completed(futures), 1):
            results[futures[fut]] = fut.result()
            if done % max(1, len(jobs) // 10) == 0:
                print(f"  {done}/{len(jobs)} runs done", flush=True)
    matplotlib_ok = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib_ok = False
        print("plots skipped: matplotlib is not installed")
    if matplotlib_ok:
        args.out.mkdir(parents=True, exist_ok=True)
    for p in synthetic:
        syn = {k: v for k, v in results.items() if k[1] == p}
        print("\n" + synthetic_table(p, methods, syn, args.evals))
        if matplotlib_ok:
            fstar = PROBLEMS[p][2]
            curves = {
                m: [
                    np.maximum(np.minimum.accumulate(v) - fstar, 1e-12)
                    for (mm, _, _), (v, _, _) in syn.items()
                    if mm == m
                ]
                for m in methods
                if m != "grid"
            }
            print(f"plot: {plot_regret(p, curves, 'regret f(best) - f*', args.out, log=True)}")
    if "pyengine-bayes" in methods and synthetic:
        print(
            f"\none pyengine Bayes suggestion at 100 completed trials, 6-D (median of 5, after the runs): "
            f"{suggest_latency():.3f} s"
        )
    lc = {k: v for k, v in results.items() if k[0] in lc_methods and k[1] not in PROBLEMS}
    if lc:
        print("\n" + lcbench_table(lc_methods, lc, args.lcbench_evals))
        if matplotlib_ok:
            norm = lcbench_normalised(lc)
            curves = {m: [np.maximum(norm[k], 1e-6) for k in norm if k[0] == m] for m in lc_methods}
            print(f"plot: {plot_regret('lcbench', curves, 'normalised regret', args.out, log=True)}")


if __name__ == "__main__":
    main()
