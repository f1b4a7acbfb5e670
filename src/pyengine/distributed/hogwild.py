"""Hogwild: lock-free asynchronous SGD on one host.

The model's parameters move to shared memory; `num_processes` worker processes
(torch.multiprocessing) each build their own optimizer over those same parameters and
update them without locks, on their own slice of the data (pass `rank`/`world_size` to a
pe.data.Loader). Updates may overwrite one another; for sparse or small updates SGD still
converges (Niu et al., 2011). Gradients and optimizer state are per process. One host only:
nothing here crosses machines, and it is independent of torch.distributed.

    def train(rank, world_size, model, data_path):
        loader = pe.data.Loader(pe.data.Dataset(data_path), 32, rank=rank, world_size=world_size)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ...
    pe.distributed.Hogwild(num_processes=4).run(train, model, args=(data_path,))
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


class HogwildWorkerError(RuntimeError):
    """A Hogwild worker raised or died; the message carries its traceback or exit code."""


class Hogwild:
    """Runs `train_fn(rank, world_size, model, *args)` in `num_processes` processes on shared weights.

    Args:
        num_processes: worker processes.
        start_method: "fork" (default where available: the model need not be picklable) or "spawn"
            (train_fn must then be importable at module level).
        threads_per_process: torch intra-op threads in each worker.
    """

    name = "hogwild"

    def __init__(self, num_processes: int = 2, start_method: str | None = None, threads_per_process: int = 1) -> None:
        if not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}")
        self.num_processes = num_processes
        methods = multiprocessing.get_all_start_methods()
        self.start_method = start_method or ("fork" if "fork" in methods else "spawn")
        self.threads_per_process = threads_per_process
        self.wrapped: torch.nn.Module | None = None

    def run(self, train_fn: Callable[..., Any], model: torch.nn.Module, args: tuple = ()) -> torch.nn.Module:
        """Trains `model` in place; returns it once every worker finished.

        Raises:
            HogwildWorkerError: a worker raised (its traceback is included) or died.
        """
        model.share_memory()
        ctx: Any = mp.get_context(self.start_method)
        errors = ctx.SimpleQueue()
        procs = [ctx.Process(target=_worker, name=f"pyengine-hogwild-{rank}",
                             args=(train_fn, rank, self.num_processes, model, args, errors,
                                   self.threads_per_process))
                 for rank in range(self.num_processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        failures += [f"worker {i} exited with code {p.exitcode}" for i, p in enumerate(procs)
                     if p.exitcode != 0 and not any(f.startswith(f"worker {i}:") for f in failures)]
        if failures:
            raise HogwildWorkerError("Hogwild training failed:\n" + "\n".join(failures))
        return model


def _worker(train_fn: Callable[..., Any], rank: int, world_size: int, model: torch.nn.Module, args: tuple,
            errors: Any, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        train_fn(rank, world_size, model, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent, then the worker exits non-zero
        errors.put(f"worker {rank}: {traceback.format_exc()}")
        raise SystemExit(1) from None
