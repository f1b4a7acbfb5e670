"""Distribution strategies on torch.distributed, usable in a plain loop or via pe.Trainer.

    pe.distributed.init()                       # joins a torchrun job; a no-op under plain python
    strategy = pe.distributed.DataParallel()    # or FullyShard(), LocalSGD(period=8), TensorParallel()
    model = strategy.wrap(model)
    opt = torch.optim.Adam(model.parameters())  # after wrap(): FSDP2 replaces the parameters
    loader = pe.data.Loader(ds, 32, rank=pe.distributed.rank(), world_size=pe.distributed.world_size())
    ...  loss.backward(); opt.step(); strategy.after_optimizer_step()
    ckpt.save(step, {"model": model, "optimizer": opt})   # on every rank: a rank-sharded checkpoint

Or, with an optimizer built the usual way before wrapping (rebound to the wrapped parameters,
groups, hyperparameters and state kept):

    model, opt, strategy = pe.distributed.setup(model, opt, "fsdp")

Hogwild (lock-free asynchronous SGD on one host) runs its own worker processes:
`pe.distributed.Hogwild(num_processes=4).run(train_fn, model)`.
"""

from pyengine.distributed.data_parallel import DataParallel
from pyengine.distributed.fully_sharded import FullyShard
from pyengine.distributed.hogwild import Hogwild, HogwildWorkerError
from pyengine.distributed.local_sgd import LocalSGD
from pyengine.distributed.loop_setup import DistributedSetup, setup
from pyengine.distributed.optimizer_rebind import OptimizerRebindError, rebind_optimizer
from pyengine.distributed.pipeline_parallel import PipelineParallel
from pyengine.distributed.process_group import (
    barrier,
    checkpoint_group,
    destroy,
    init,
    is_distributed,
    is_main,
    rank,
    world_size,
)
from pyengine.distributed.strategies import STRATEGIES, make_strategy
from pyengine.distributed.tensor_parallel import TensorParallel
from pyengine.distributed.trainable_guard import TrainableSetChanged

__all__ = [
    "STRATEGIES",
    "DataParallel",
    "DistributedSetup",
    "FullyShard",
    "Hogwild",
    "HogwildWorkerError",
    "LocalSGD",
    "OptimizerRebindError",
    "PipelineParallel",
    "TensorParallel",
    "TrainableSetChanged",
    "barrier",
    "checkpoint_group",
    "destroy",
    "init",
    "is_distributed",
    "is_main",
    "make_strategy",
    "rebind_optimizer",
    "rank",
    "setup",
    "world_size",
]
