"""Strategy names (as pe.Trainer(strategy=...) takes them) and their classes."""

from __future__ import annotations

from typing import Any

from pyengine.distributed.data_parallel import DataParallel
from pyengine.distributed.fully_sharded import FullyShard
from pyengine.distributed.hogwild import Hogwild
from pyengine.distributed.local_sgd import LocalSGD
from pyengine.distributed.pipeline_parallel import PipelineParallel
from pyengine.distributed.tensor_parallel import TensorParallel

STRATEGIES: dict[str, type[Any]] = {"ddp": DataParallel, "fsdp": FullyShard, "local_sgd": LocalSGD, "hogwild": Hogwild,
                                 "tensor": TensorParallel, "pipeline": PipelineParallel}


def make_strategy(strategy: str | Any, **options: Any) -> Any:
    """Returns a strategy object for a name in STRATEGIES (an object passes through)."""
    if not isinstance(strategy, str):
        return strategy
    try:
        cls = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}") from None
    return cls(**options)
