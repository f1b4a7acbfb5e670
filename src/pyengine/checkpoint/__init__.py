"""Checkpoints: asynchronous, sharded, atomic, verified saves of full training state.

    ckpt = pe.Checkpointer("runs/exp1", keep_last=3)
    ckpt.save(step, {"model": model, "optimizer": opt, "scheduler": sched})   # returns after the snapshot
    step = ckpt.restore({"model": model, "optimizer": opt, "scheduler": sched})

When to save: `Checkpointer(dir, policy=OverheadBudget(0.01))` and `ckpt.maybe_save(step, state)`
each step (also Every(steps=N), Every(seconds=T), YoungDaly(mtbf_seconds)).
"""

from pyengine.checkpoint.checkpointer import Checkpointer, CheckpointFallbackWarning, CheckpointPruneWarning, SaveHandle
from pyengine.checkpoint.export import export_weights
from pyengine.checkpoint.inspection import CheckpointInfo, inspect_directory
from pyengine.checkpoint.policies import (
    Every,
    OverheadBudget,
    PolicyFeed,
    SavePolicy,
    YoungDaly,
    daly_interval,
    young_interval,
)

__all__ = [
    "CheckpointFallbackWarning",
    "CheckpointPruneWarning",
    "CheckpointInfo",
    "Checkpointer",
    "Every",
    "OverheadBudget",
    "PolicyFeed",
    "SaveHandle",
    "SavePolicy",
    "YoungDaly",
    "daly_interval",
    "export_weights",
    "inspect_directory",
    "young_interval",
]
