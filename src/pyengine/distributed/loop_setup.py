"""pe.distributed.setup: one call that readies a model and its optimizer for a plain training loop.

    model = Net().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)          # built the usual way, before wrapping
    run = pe.distributed.setup(model, opt, "fsdp")                # or "ddp", "tensor", "local_sgd", an object
    model, opt, strategy = run
    loader = pe.data.Loader(ds, 32, seed=0, **run.data_shard)     # this rank's slice, or all (tensor parallel)
    for batch in loader:
        opt.zero_grad(); loss_fn(model, batch).backward(); opt.step()
        strategy.after_optimizer_step()                           # local SGD averages here
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from pyengine.distributed.hogwild import Hogwild
from pyengine.distributed.optimizer_rebind import rebind_optimizer
from pyengine.distributed.process_group import init, rank, world_size
from pyengine.distributed.strategies import make_strategy


class DistributedSetup(NamedTuple):
    """What a plain loop trains with; unpacks as `model, optimizer, strategy`.

    Attributes:
        model: what to call: the DDP wrapper, or the model itself sharded in place (FSDP2,
            tensor parallel) or kept whole (local SGD).
        optimizer: the optimizer passed in, the same object, now over `model`'s parameters.
        strategy: the strategy object; call strategy.after_optimizer_step() after every
            optimizer step (local SGD averages there), and after changing requires_grad under
            DDP, model = strategy.rewrap().
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    strategy: Any

    @property
    def data_shard(self) -> dict[str, int]:
        """pe.data.Loader's rank= and world_size= for this strategy: this rank's slice under data
        parallelism, the whole data set under model parallelism (every rank the same batches)."""
        if getattr(self.strategy, "splits_data", True):
            return {"rank": rank(), "world_size": world_size()}
        return {"rank": 0, "world_size": 1}


def setup(model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: str | Any,
          **options: Any) -> DistributedSetup:
    """Joins the torchrun job, wraps `model` with `strategy` and rebinds `optimizer` to what trains.

    The optimizer may be built before (over model.parameters(), in groups with their own lr or
    weight_decay, with state from earlier steps or a checkpoint) or after wrapping; its groups,
    hyperparameters and state carry over (see rebind_optimizer). Put the model on its device
    first; call pe.distributed.init(backend=...) first for a backend other than the default.
    Every rank calls it, at the same point (wrapping and the rebind are collectives).

    Args:
        model: the plain model, or what strategy.wrap() returned when `strategy` is an object
            already applied.
        optimizer: over the model's parameters (before or after wrapping).
        strategy: a name in pe.distributed.STRATEGIES or a strategy object (applied or not).
        **options: the strategy's arguments when it is given by name (period=8 for "local_sgd").

    Returns:
        DistributedSetup(model, optimizer, strategy).

    Raises:
        OptimizerRebindError: the optimizer cannot be moved onto the wrapped parameters (why is
            in the message).
        ValueError: an unknown strategy name, or options given with a strategy object.
        NotImplementedError: "hogwild", which runs its own processes.
    """
    if options and not isinstance(strategy, str):
        raise ValueError(f"options {sorted(options)} are for a strategy given by name; pass them to "
                         f"{type(strategy).__name__}(...) instead")
    strategy = make_strategy(strategy, **options)
    if isinstance(strategy, Hogwild):
        raise NotImplementedError("Hogwild runs its own worker processes on one host, each building its own "
                                  "optimizer: use pe.distributed.Hogwild(num_processes).run(train_fn, model)")
    init()
    if strategy.wrapped is None:
        strategy.wrap(model)
    rebind_optimizer(optimizer, strategy)
    return DistributedSetup(strategy.wrapped, optimizer, strategy)
