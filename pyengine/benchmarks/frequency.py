"""The checkpoint-frequency trade-off study: what checkpointing every k steps costs in training
time, for torch.save, DCP async_save and pyengine (blocking and overlapped snapshot), and what
OverheadBudget chooses on its own. `tradeoff.py` turns the measurements into expected waste.

How overhead is measured (the figures are ratios within one run; these machines are shared):
blocks of training steps with checkpoints (C) alternate with blocks of the same model's steps
without (B): B C B C ... B. Each C is compared with the mean per-step time of the B blocks on
either side, so drift and noisy neighbours hit both alike, and every other round runs the
configurations in reverse order. A C block ends only once its last save is durable, so the
background persist's interference and the final wait are both counted.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pyengine.benchmarks.savers import CONTROL, METHODS, PeBudgetSave, Saver, close_process_group, make_saver
from pyengine.benchmarks.workload import MODEL_SIZES, Workload

BUDGET = "budget"  # the interval label of the OverheadBudget run


@dataclass
class FrequencyConfig:
    """What the study measures.

    Args:
        models: model sizes, keys of MODEL_SIZES ("3M", "25M", "50M").
        methods: ways to checkpoint, from savers.METHODS.
        intervals: checkpoint every k steps, for each k.
        repeats: rounds; each measures every configuration once.
        block_seconds: a measured block lasts about this long (and is a multiple of k steps).
        budget: also run pe with OverheadBudget(budget) (None: skip).
        budget_blocks: the OverheadBudget block is this many blocks long (it must save several times).
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


QUICK = FrequencyConfig(models=("3M",), intervals=(1, 5, 10, 50), repeats=1, block_seconds=1.5)


def run_study(config: FrequencyConfig, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measures every model in `config`, writing checkpoints under `workdir`; returns raw results."""
    results: dict[str, Any] = {"config": asdict(config), "models": {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    try:
        for name in config.models:
            results["models"][name] = measure_model(name, config, workdir / name, log)
    finally:
        torch.set_num_threads(threads)
        close_process_group()
    return results


def measure_model(name: str, config: FrequencyConfig, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    workload = Workload.create(name)
    step_seconds = workload.warm_up(10)
    block = max(1, math.ceil(config.block_seconds / step_seconds))
    log(f"[frequency] {name}: {workload.params / 1e6:.1f}M params, {workload.state_bytes() / 1e6:.0f} MB state, "
        f"{step_seconds * 1e3:.1f} ms a step, blocks of ~{block} steps")
    savers: dict[str, Saver] = {m: make_saver(m, workload, workdir / m) for m in config.methods}
    # The A/A control ("none") needs one block a round: any interval measures the same nothing.
    runs: list[tuple[str, Any]] = [(m, k) for m in config.methods for k in
                                   ((1,) if m == CONTROL else config.intervals)]
    if config.budget is not None:
        savers[BUDGET] = PeBudgetSave(workload, workdir / BUDGET, config.budget)
        runs.append((BUDGET, BUDGET))
    rounds: dict[tuple[str, Any], list[dict[str, Any]]] = {run: [] for run in runs}
    steps = itertools.count(1)  # every checkpoint's step is larger than any before it
    try:
        for r in range(config.repeats):
            before = baseline_block(workload, block)
            for method, every in runs if r % 2 == 0 else runs[::-1]:
                saver = savers[method]
                n = config.budget_blocks * block if every == BUDGET else every * math.ceil(block / every)
                seconds, stalls = checkpoint_block(workload, saver, n, every, steps)
                after = baseline_block(workload, block)
                sample = {"seconds": seconds, "steps": n, "baseline_step_seconds": (before + after) / (2 * block),
                          "saves": len(stalls), "stalls": stalls, "persists": saver.take_persists()}
                if isinstance(saver, PeBudgetSave):
                    sample["interval"] = saver.policy.interval
                rounds[(method, every)].append(sample)
                before = after
                overhead = seconds / (n * sample["baseline_step_seconds"]) - 1
                log(f"[frequency] {name} round {r + 1}/{config.repeats} {saver.name:<24} every {every!s:>6}: "
                    f"{len(stalls):3d} saves, overhead {overhead * 100:+6.2f}%")
    finally:
        for saver in savers.values():
            saver.close()
    return {"params": workload.params, "bytes": workload.state_bytes(), "step_seconds": step_seconds,
            "block_steps": block,
            "runs": [{"method": savers[m].name, "interval": k, "rounds": rounds[(m, k)]} for m, k in runs]}


def baseline_block(workload: Workload, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        workload.step()
    return time.perf_counter() - t0


def checkpoint_block(workload: Workload, saver: Saver, n: int, every: Any,
                      steps: Iterator[int]) -> tuple[float, list[float]]:
    """Trains n steps, saving after every `every`-th (or when the budget policy says); returns
    the seconds until the last save is durable and each save's stall."""
    stalls: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        workload.step()
        step = next(steps)
        if every == BUDGET:
            assert isinstance(saver, PeBudgetSave)
            stall = saver.maybe_save(step)
            if stall is not None:
                stalls.append(stall)
        elif i % every == 0:  # the last save is followed by every - 1 steps, as in a long run
            stalls.append(saver.save(step))
    saver.finish()
    return time.perf_counter() - t0, stalls
