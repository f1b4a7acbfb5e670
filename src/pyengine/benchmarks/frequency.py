"""The checkpoint-frequency trade-off study: what checkpointing every k steps costs in training
time, for torch.save, DCP async_save (as documented, and configured as its best users do: see
dcp_baselines) and pyengine (blocking and overlapped snapshot), and what OverheadBudget chooses
on its own. `tradeoff.py` turns the measurements into expected waste.

How overhead is measured (these machines are shared, so only same-run comparisons count):
cycles with a checkpoint (C: a save and the k steps after it, until the save is durable)
alternate with the same k steps without one (B), C B B C C B ..., so a neighbour's load hits
both alike within a fraction of a second. Overhead = sum(C) / sum(B) - 1 over all cycles of a
round. A C cycle ends only once its save is durable, so the persist's interference counts, and
a persist longer than k steps counts in full. The A/A control ("none": C cycles that save
nothing) shows how much of a figure is noise. Rounds run the configurations in alternating order.
After each model, the log compares the training time pe-overlap loses per save with each DCP
method's (the cost per save that Young/Daly uses).
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pyengine.benchmarks.dcp_baselines import RECIPES
from pyengine.benchmarks.savers import CONTROL, METHODS, PeBudgetSave, Saver, close_process_group, make_saver
from pyengine.benchmarks.workload import MODEL_SIZES, Workload

BUDGET = "budget"  # the interval label of the OverheadBudget run
OVERLAP = "pe-overlap"
# Target: the overlapped save loses at least this many times less training time per save than
# DCP's asynchronous staging.
OVERLAP_VS_ASYNC_STAGING = 3.0


@dataclass
class FrequencyConfig:
    """What the study measures.

    Args:
        models: model sizes, keys of MODEL_SIZES ("3M", "25M", "50M").
        methods: ways to checkpoint, from savers.METHODS.
        intervals: checkpoint every k steps, for each k.
        repeats: rounds; each measures every configuration once.
        block_seconds: measured time per configuration and round (C and B cycles together).
        budget: also run pe with OverheadBudget(budget) (None: skip).
        budget_blocks: the OverheadBudget run lasts this many block_seconds (it must save several times).
        mtbf_seconds: assumed mean time between failures, for expected waste and Young/Daly.
        restart_seconds: assumed time to restart and restore after a failure.
        torch_threads: threads the training step uses. One by default: on a GPU machine the
            host cores are free for the checkpoint's background threads, and here the second
            core plays that part; with every core busy training, each background cycle is
            taken from the step (set 2 to measure that case).
    """

    models: tuple[str, ...] = ("3M", "25M", "50M")
    methods: tuple[str, ...] = METHODS
    intervals: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    repeats: int = 2
    block_seconds: float = 3.0
    budget: float | None = 0.01
    budget_blocks: int = 3
    mtbf_seconds: float = 120.0
    restart_seconds: float = 0.0
    torch_threads: int = 1

    def __post_init__(self) -> None:
        self.models, self.methods, self.intervals = tuple(self.models), tuple(self.methods), tuple(self.intervals)
        for name, values, allowed in (("model", self.models, MODEL_SIZES), ("method", self.methods, METHODS)):
            unknown = [v for v in values if v not in allowed]
            if unknown or not values:
                raise ValueError(f"unknown or no {name}s {unknown}; choose from {sorted(allowed)}")
        if not self.intervals or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in self.intervals):
            raise ValueError(f"intervals must be integers >= 1, got {self.intervals}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {self.repeats!r}")
        if not isinstance(self.torch_threads, int) or self.torch_threads < 1:
            raise ValueError(f"torch_threads must be an integer >= 1, got {self.torch_threads!r}")
        if not isinstance(self.budget_blocks, int) or self.budget_blocks < 1:
            raise ValueError(f"budget_blocks must be an integer >= 1, got {self.budget_blocks!r}")
        if self.budget is not None and not 0 < self.budget < 1:
            raise ValueError(f"budget must be a fraction in (0, 1), e.g. 0.01, got {self.budget!r}")
        for name in ("block_seconds", "mtbf_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.restart_seconds >= 0:
            raise ValueError(f"restart_seconds must be >= 0, got {self.restart_seconds!r}")


# `pyengine bench --quick`: one round on the small model, to fit the suite in about two minutes.
QUICK = FrequencyConfig(models=("3M",), intervals=(1, 10, 50), repeats=1, block_seconds=1.0)


def run_study(config: FrequencyConfig, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measures every model in `config`, writing checkpoints under `workdir`; returns raw results."""
    results: dict[str, Any] = {"config": asdict(config), "models": {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    try:
        for name in config.models:
            results["models"][name] = measure_model(name, config, workdir / name, log)
            for line in overlap_vs_dcp(_analysed(results, name)):
                log(f"[frequency] {name}: {line}")
    finally:
        torch.set_num_threads(threads)
        close_process_group()
    return results


def measure_model(name: str, config: FrequencyConfig, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    workload = Workload.create(name)
    step_seconds = workload.warm_up(10)
    log(f"[frequency] {name}: {workload.params / 1e6:.1f}M params, {workload.state_bytes() / 1e6:.0f} MB state, "
        f"{step_seconds * 1e3:.1f} ms a step")
    savers: dict[str, Saver] = {m: make_saver(m, workload, workdir / m) for m in config.methods}
    # The A/A control ("none") needs one run a round, with cycles as long as a middle interval's.
    middle = sorted(config.intervals)[len(config.intervals) // 2]
    runs: list[tuple[str, Any]] = [(m, k) for m in config.methods for k in
                                   ((middle,) if m == CONTROL else config.intervals)]
    if config.budget is not None:
        savers[BUDGET] = PeBudgetSave(workload, workdir / BUDGET, config.budget)
        runs.append((BUDGET, BUDGET))
    rounds: dict[tuple[str, Any], list[dict[str, Any]]] = {run: [] for run in runs}
    steps = itertools.count(1)  # every checkpoint's step is larger than any before it
    try:
        for r in range(config.repeats):
            for method, every in runs if r % 2 == 0 else runs[::-1]:
                saver = savers[method]
                if every == BUDGET:
                    seconds = config.budget_blocks * config.block_seconds
                    sample = budget_cycles(workload, savers[BUDGET], seconds, steps)  # type: ignore[arg-type]
                else:
                    cycles = max(2, round(config.block_seconds / (2 * every * step_seconds)))
                    sample = paired_cycles(workload, saver, every, cycles, steps)
                rounds[(method, every)].append(sample)
                overhead = sample["seconds"] / max(sample["baseline_seconds"], 1e-12) - 1
                log(f"[frequency] {name} round {r + 1}/{config.repeats} {saver.name:<24} every {every!s:>6}: "
                    f"{sample['saves']:3d} saves, overhead {overhead * 100:+6.2f}%")
    finally:
        for saver in savers.values():
            saver.close()
    return {"params": workload.params, "bytes": workload.state_bytes(), "step_seconds": step_seconds,
            "runs": [{"method": savers[m].name, "interval": k, "rounds": rounds[(m, k)]} for m, k in runs]}


def _analysed(results: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of model `name`'s results with tradeoff.analyse's rows and per-method costs."""
    from pyengine.benchmarks.tradeoff import analyse  # tradeoff imports this module

    one = copy.deepcopy({"config": results["config"], "models": {name: results["models"][name]}})
    return analyse(one)["models"][name]


def overlap_vs_dcp(model: dict[str, Any]) -> list[str]:
    """Lines comparing the training time pe-overlap loses per save with each DCP method's, from
    an analysed model (its `methods` costs); the async-staging methods are checked against the
    target. Empty without pe-overlap or DCP methods."""
    costs = {m: o["cost_s"] for m, o in model.get("methods", {}).items()}
    if OVERLAP not in costs or not any(m in costs for m in RECIPES):
        return []
    ours = costs[OVERLAP]
    lines = []
    stalls = [r["stall_s"] for r in model.get("rows", []) if r["method"] == OVERLAP and r["interval"] != BUDGET]
    if stalls and ours <= statistics.median(stalls):  # tradeoff's floor: noise hid the slowdown
        lines.append(f"{OVERLAP}'s cost per save is its stall: the slowdown it measured was within the noise "
                     "(see the A/A row), so the ratios below may overstate its lead")
    for method in (m for m in RECIPES if m in costs):
        ratio = costs[method] / ours if ours > 0 else float("inf")
        line = (f"training time lost per save, {OVERLAP} {ours * 1e3:.1f} ms vs {method} {costs[method] * 1e3:.1f} ms"
                f" = {ratio:.2f}x less")
        if RECIPES[method].async_staging:
            verdict = "PASS" if ratio >= OVERLAP_VS_ASYNC_STAGING else "MISS"
            line += f" (target >= {OVERLAP_VS_ASYNC_STAGING:g}x: {verdict})"
        lines.append(line)
    return lines


def steps_seconds(workload: Workload, n: int) -> float:
    """Seconds for n training steps without checkpoints."""
    t0 = time.perf_counter()
    for _ in range(n):
        workload.step()
    return time.perf_counter() - t0


def paired_cycles(workload: Workload, saver: Saver, every: int, cycles: int, steps: Iterator[int]) -> dict[str, Any]:
    """`cycles` times: a save and the `every` steps after it, until the save is durable (C), and
    the same steps without a save (B), alternating C B / B C so that neither always goes first."""
    c_times, b_times, stalls = [], [], []
    for j in range(cycles):
        if j % 2:
            b_times.append(steps_seconds(workload, every))
        t0 = time.perf_counter()
        stalls.append(saver.save(next(steps)))
        for _ in range(every):
            workload.step()
            next(steps)
        saver.finish()  # durable before the cycle counts as done (no-op when it already is)
        c_times.append(time.perf_counter() - t0)
        if not j % 2:
            b_times.append(steps_seconds(workload, every))
    return _sample(c_times, b_times, cycles * every, stalls, saver.take_persists())


def budget_cycles(workload: Workload, saver: PeBudgetSave, seconds: float, steps: Iterator[int]) -> dict[str, Any]:
    """Trains with OverheadBudget deciding, for about `seconds`: each span from one save to the
    next (C) is followed by the same number of steps without a save (B), which the policy does
    not see. Steps before the first save (warm-up) belong to neither."""
    c_times, b_times, stalls = [], [], []
    n_steps, since_save, opened = 0, 0, None
    started = time.perf_counter()
    saver.feed.pause()  # the time since the last round is not a training step
    while True:
        workload.step()
        since_save += 1
        step = next(steps)
        due = saver.feed.due(step)
        overdue = time.perf_counter() - started >= 4 * seconds  # a policy that stopped saving
        if not due and not overdue:
            continue
        if opened is not None:  # close the cycle that began at the previous save
            saver.checkpointer.wait()
            saver.feed.pause()  # reports that save as finished before the next one starts
            c_times.append(time.perf_counter() - opened)
            b_times.append(steps_seconds(workload, since_save))
            n_steps += since_save
        if overdue or (opened is not None and time.perf_counter() - started >= seconds):
            break
        opened, since_save = time.perf_counter(), 0
        stalls.append(saver.save_now(step))
    saver.finish()
    sample = _sample(c_times, b_times, n_steps, stalls[:len(c_times)], saver.take_persists())
    sample["interval"] = saver.policy.interval
    return sample


def _sample(c_times: list[float], b_times: list[float], n_steps: int, stalls: list[float],
            persists: list[float]) -> dict[str, Any]:
    return {"seconds": sum(c_times), "baseline_seconds": sum(b_times), "steps": n_steps, "saves": len(c_times),
            "stalls": stalls, "persists": persists, "cycle_seconds": c_times, "baseline_cycle_seconds": b_times}
