"""Checkpoints: asynchronous, sharded, atomic, verified saves of full training state.

    ckpt = pe.Checkpointer("runs/exp1", keep_last=3)
    ckpt.save(step, {"model": model, "optimizer": opt, "scheduler": sched})   # returns after the snapshot
    step = ckpt.restore({"model": model, "optimizer": opt, "scheduler": sched})

When to save: `Checkpointer(dir, policy=OverheadBudget(0.01))` and `ckpt.maybe_save(step, state)`
each step (also Every(steps=N), Every(seconds=T), YoungDaly(mtbf_seconds)).

Preemption: `with PreemptionGuard(ckpt, state) as guard:` and `guard.stop_requested(step)` each
step: on SIGTERM / SIGUSR1 a final checkpoint is saved and the process exits with status 0.
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
from pyengine.checkpoint.preemption import PreemptionGuard

__all__ = [
    "CheckpointFallbackWarning",
    "CheckpointPruneWarning",
    "CheckpointInfo",
    "Checkpointer",
    "Every",
    "OverheadBudget",
    "PolicyFeed",
    "PreemptionGuard",
    "SaveHandle",
    "SavePolicy",
    "YoungDaly",
    "daly_interval",
    "export_weights",
    "inspect_directory",
    "young_interval",
]
