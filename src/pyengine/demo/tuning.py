"""Demo section: Hyperparameter Tuning with pe.tune.

1. The grid's combinatorial explosion: GridSampler's size as parameters are added.
2. Grid vs random vs Bayesian optimisation on a real training task (tuning_task: every trial
   a pe.Trainer run of a few virtual epochs), the same budget of trials for each.
3. Pruning through trial checkpoints: the random study again, with ASHA.
4. A worker process running a study is SIGKILLed mid-trial; the study is reopened from its
   SQLite file and continues.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

import pyengine as pe
from pyengine.checkpoint.directory import committed_steps
from pyengine.demo import tuning_task as task
from pyengine.demo.section import Section

BUDGET = {False: 27, True: 8}  # trials per method (--quick: True); a cube, for the grid
KILLED_IN = {False: 5, True: 3}  # the trial during which the worker is killed
MORE_AFTER_REOPEN = 3  # new trials the reopened study runs
GRID_VALUES = 5  # per parameter, in the explosion table
# Parameters in the order the explosion table adds them; the first three are tuning_task.SPACE.
MORE_PARAMS = {"weight_decay": pe.tune.LogUniform(1e-6, 1e-2), "batch_size": pe.tune.Choice([32, 64, 128, 256]),
               "depth": pe.tune.IntUniform(1, 4), "activation": pe.tune.Choice(["relu", "gelu", "tanh"]),
               "beta2": pe.tune.Uniform(0.9, 0.999)}
COMPLETE = pe.tune.TrialState.COMPLETE
RUNNING = pe.tune.TrialState.RUNNING.value


def _bayes() -> pe.tune.BayesSampler:
    # Each trial is seeded and deterministic, so the GP's noise is fixed at its floor; a
    # smaller acquisition search than the default keeps a suggestion under ~0.2 s here.
    return pe.tune.BayesSampler(n_startup_trials=8, deterministic=True, n_raw_samples=512, n_restarts=4)


def grid_sizes() -> list[tuple[str, int]]:
    """(parameter added, the grid's size with it) as GridSampler computes them."""
    params = {**task.SPACE, **MORE_PARAMS}
    sampler = pe.tune.GridSampler(points_per_param=GRID_VALUES)
    names = list(params)
    return [(name, math.prod(len(v) for v in sampler.axes(pe.tune.Space({n: params[n] for n in names[:i + 1]}))
                             .values())) for i, name in enumerate(names)]


def _best_so_far(study: pe.tune.Study) -> list[float]:
    values = [t.value if t.state == COMPLETE else math.inf for t in study.trials]
    return np.minimum.accumulate(values).tolist()


def compare_samplers(workdir: Path, data: tuple, budget: int) -> dict[str, dict[str, Any]]:
    per_side = round(budget ** (1 / len(task.SPACE)))
    samplers = {"grid": pe.tune.GridSampler(points_per_param=per_side), "random": pe.tune.RandomSampler(),
                "bayes": _bayes()}
    results = {}
    for name, sampler in samplers.items():
        ledger = task.Ledger()
        study = pe.tune.Study(task.SPACE, sampler=sampler, storage=workdir / f"{name}.db", seed=0)
        t0 = time.perf_counter()
        study.optimize(task.make_objective(*data, ledger), n_trials=budget)
        results[name] = {"seconds": time.perf_counter() - t0, "best": study.best_value, "params": study.best_params,
                         "curve": _best_so_far(study), "trials": len(study.trials), "ledger": ledger,
                         "lrs": len({t.params["lr"] for t in study.trials})}
        study.close()
    return results


def prune(workdir: Path, data: tuple, budget: int) -> dict[str, Any]:
    """The random study again (the same configurations: its draws depend on the seed and the
    trial number only), with ASHA pausing trials at its rungs through their checkpoints."""
    ledger = task.Ledger()
    pruner = pe.tune.ASHAPruner(min_resource=1, reduction_factor=2, max_resource=task.EPOCHS)
    study = pe.tune.Study(task.SPACE, sampler=pe.tune.RandomSampler(), storage=workdir / "asha.db", seed=0,
                          pruner=pruner)
    t0 = time.perf_counter()
    study.optimize(task.make_objective(*data, ledger), n_trials=budget)
    seconds = time.perf_counter() - t0
    trials = study.trials
    result = {
        "seconds": seconds, "ledger": ledger, "trials": len(trials),
        "best": min((t.value for t in trials if t.state == COMPLETE), default=math.nan),
        "stopped": sum(t.state in (pe.tune.TrialState.PAUSED, pe.tune.TrialState.PRUNED) for t in trials),
        "complete": sum(t.state == COMPLETE for t in trials),
        "promoted": sum(len(starts) > 1 for starts in ledger.started_at.values()),
        "repeated_epochs": sum(ledger.epochs.values()) - sum(len(t.intermediate) for t in trials),
        "curves": {t.number: [t.intermediate[k] for k in sorted(t.intermediate)] for t in trials},
        "rungs": [pruner.rung_step(k) for k in range(task.EPOCHS) if pruner.rung_step(k) < task.EPOCHS],
        "eta": pruner.eta,
    }
    study.close()
    return result


def _killed_worker(storage: Path, workdir: Path, n_trials: int, progress: Any) -> None:
    """A worker process running the study; the section SIGKILLs it during a trial."""
    data = task.write_data(workdir)
    study = pe.tune.Study(task.SPACE, sampler=_bayes(), storage=storage, seed=0)
    def report(trial: pe.tune.Trial, epoch: int) -> None:
        progress.put((trial.number, epoch, str(trial.checkpoint_dir)))

    study.optimize(task.make_objective(*data, task.Ledger(), report), n_trials=n_trials)


def _kill_mid_trial(worker: Any, progress: Any, first: int) -> tuple[int, int]:
    """SIGKILLs `worker` in trial `first` or a later one, at a moment when the trial is running
    and has a committed checkpoint (the writes run in low-priority threads, which a busy machine
    may hold back); returns (the trial, the last epoch it reported)."""
    number, epoch, trial_dir = -1, 0, None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            while True:  # the newest report
                number, epoch, trial_dir = progress.get(timeout=0.01)
        except queue.Empty:
            pass
        if number >= first and 2 <= epoch < task.EPOCHS and committed_steps(Path(trial_dir)):
            os.kill(worker.pid, signal.SIGKILL)
            worker.join()  # reaped: the study sees that the trial's pid is gone
            return number, epoch
        if not worker.is_alive():
            raise RuntimeError(f"the tuning worker exited (code {worker.exitcode}) before trial {first}")
    raise RuntimeError(f"the tuning worker did not reach trial {first} in 300 s")


def kill_and_reopen(workdir: Path, data: tuple, killed_in: int) -> dict[str, Any]:
    storage = workdir / "killed.db"
    # Forked: it starts with torch imported. The study's storage is opened only inside it,
    # so no SQLite connection crosses the fork.
    ctx = multiprocessing.get_context("fork")
    progress = ctx.Queue()
    worker = ctx.Process(target=_killed_worker, args=(storage, workdir, killed_in + 10, progress),
                         name="pyengine-demo-tune-worker")
    worker.start()
    killed, epoch = _kill_mid_trial(worker, progress, killed_in)
    progress.close()

    ledger = task.Ledger()
    study = pe.tune.Study(task.SPACE, sampler=_bayes(), storage=storage, seed=0)
    found = [(t.number, t.state.value, t.value, max(t.intermediate, default=0)) for t in study.trials]
    study.optimize(task.make_objective(*data, ledger), n_trials=MORE_AFTER_REOPEN)
    after = [(t.number, t.state.value, t.value) for t in study.trials]
    finished = [f for f in found if f[1] != RUNNING]
    result = {"killed": killed, "reported_epoch": epoch, "found": found, "after": after,
              "kept": all(a[:3] == f[:3] for a, f in zip(after, found) if f[1] != RUNNING),
              "finished": [f[0] for f in finished], "finished_states": sorted({f[1] for f in finished}),
              "running": [(f[0], f[3]) for f in found if f[1] == RUNNING],
              "resumed_from": ledger.started_at.get(killed, [None])[0], "best": study.best_value,
              "retries": study.trials[killed].retries, "new": [a[0] for a in after if a[0] > killed],
              "complete": sum(a[1] == COMPLETE.value for a in after)}
    study.close()
    return result


def _numbers(numbers: list[int]) -> str:
    return f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 2 else ", ".join(map(str, numbers))


def run(workdir: Path, quick: bool) -> Section:
    section = Section("Hyperparameter tuning")
    workdir.mkdir(parents=True, exist_ok=True)
    data = task.write_data(workdir)
    budget = BUDGET[quick]

    results = compare_samplers(workdir, data, budget)
    trial_s = sum(r["ledger"].seconds for r in results.values()) / sum(r["trials"] for r in results.values())
    sizes = grid_sizes()
    section.say(
        f"the grid's combinatorial explosion: pe.tune.GridSampler's size as parameters are added, with {GRID_VALUES} "
        f"values per continuous parameter (every value of a small integer or categorical one), and how long it "
        f"would run in one process at the {trial_s:.2f} s a trial of the task below took"
    )
    section.table(["parameters", "added", "grid size", "time"],
                  [[str(i + 1), name, f"{size:,}", _duration(size * trial_s)] for i, (name, size) in enumerate(sizes)])

    grid, rand, bayes = results["grid"], results["random"], results["bayes"]
    section.say(
        f"grid vs random vs Bayesian search, {budget} trials each, on {', '.join(task.SPACE)}: each trial trains an "
        f"MLP with pe.Trainer for {task.EPOCHS} virtual epochs (a checkpoint each) and returns its validation loss"
    )
    section.table(["sampler", "best val loss", "found at trial", "its parameters", "distinct lr tried", "seconds"],
                  [[label, f"{r['best']:.4f}", str(r["curve"].index(r["best"])), _params(r["params"]),
                    str(r["lrs"]), f"{r['seconds']:.1f}"]
                   for label, r in (("grid", grid), ("random", rand), ("Bayes (GP + LogEI)", bayes))])

    pruned = prune(workdir, data, budget)
    full_epochs = budget * task.EPOCHS
    trained = sum(pruned["ledger"].epochs.values())
    section.say(
        f"pruning: the random study again (the same {budget} configurations) with ASHA (rungs at epochs "
        f"{', '.join(map(str, pruned['rungs']))}; the top 1/{pruned['eta']} goes on): {pruned['stopped']} trials "
        f"stopped at a rung, "
        f"{pruned['promoted']} paused ones promoted later and resumed from their checkpoints "
        f"({pruned['repeated_epochs']} epochs trained twice), {pruned['complete']} ran all {task.EPOCHS} epochs. "
        f"{trained} of {full_epochs} virtual epochs trained ({100 * (1 - trained / full_epochs):.0f}% of the compute "
        f"saved), {pruned['seconds']:.1f} s instead of {rand['seconds']:.1f} s; best val loss {pruned['best']:.4f} "
        f"(without pruning {rand['best']:.4f})"
    )

    killed = kill_and_reopen(workdir, data, KILLED_IN[quick])
    n, reported = killed["killed"], killed["reported_epoch"]
    resumed = killed["resumed_from"]
    uncommitted = f" (epoch {reported}'s was not committed yet when the kill came)" if (resumed or 0) < reported else ""
    section.say(
        f"a worker process running a Bayes study was SIGKILLed in trial {n}, after it reported epoch {reported}. "
        f"Reopened from its SQLite file: trials {_numbers(killed['finished'])} {'/'.join(killed['finished_states'])} "
        f"with their values kept: {killed['kept']}; "
        + ", ".join(f"trial {m} RUNNING (last report: epoch {e})" for m, e in killed["running"])
        + f" with a dead worker. optimize() re-queued it ({killed['retries']} retry) and it resumed from its newest "
        f"committed checkpoint, epoch {resumed}{uncommitted}, then ran new trials {_numbers(killed['new'])}; "
        f"{killed['complete']} of {len(killed['after'])} trials complete, best val loss {killed['best']:.4f}"
    )
    section.ok = (killed["kept"] and killed["finished"] == list(range(n)) and [m for m, _ in killed["running"]] == [n]
                  and resumed is not None and resumed > 0 and len(killed["new"]) == MORE_AFTER_REOPEN)

    def draw_explosion(ax) -> None:
        ax.semilogy(range(1, len(sizes) + 1), [s for _, s in sizes], marker="o",
                    label=f"grid, {GRID_VALUES} values each")
        ax.axhline(budget, color="k", linestyle="--", label=f"random / Bayes budget here ({budget} trials)")
        ax.set_xticks(range(1, len(sizes) + 1), [f"{i + 1}\n{n}" for i, (n, _) in enumerate(sizes)], fontsize=7)
        ax.set_xlabel("parameters tuned")
        ax.set_ylabel("trials")
        ax.legend()

    def draw_best(ax) -> None:
        for label, r in (("grid", grid), ("random", rand), ("Bayes", bayes)):
            ax.plot(range(len(r["curve"])), r["curve"], marker=".", label=label, drawstyle="steps-post")
        ax.set_xlabel("trial")
        ax.set_ylabel("best validation loss so far")
        ax.set_ylim(top=min(max(grid["curve"][0], rand["curve"][0], bayes["curve"][0]), 2.5))
        ax.legend()

    def draw_asha(ax) -> None:
        for curve in pruned["curves"].values():
            done = len(curve) == task.EPOCHS
            ax.plot(range(1, len(curve) + 1), curve, marker="o" if done else "x", alpha=0.9 if done else 0.5,
                    color="#3366aa" if done else "#cc6666")
        for rung in pruned["rungs"]:
            ax.axvline(rung, color="k", linestyle=":", linewidth=1)
        ax.set_xticks(range(1, task.EPOCHS + 1))
        ax.set_xlabel("virtual epoch (dotted: ASHA rungs)")
        ax.set_ylabel("validation loss (red: stopped)")
        ax.set_ylim(top=2.5)

    section.figures += [("tuning_grid_explosion.png", draw_explosion), ("tuning_best_per_trial.png", draw_best),
                        ("tuning_asha.png", draw_asha)]
    return section


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
