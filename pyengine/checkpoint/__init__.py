"""Checkpoints: asynchronous, sharded, atomic, verified saves of full training state.

    ckpt = pe.Checkpointer("runs/exp1", keep_last=3)
    ckpt.save(step, {"model": model, "optimizer": opt, "scheduler": sched})   # returns after the snapshot
    step = ckpt.restore({"model": model, "optimizer": opt, "scheduler": sched})
"""

from pyengine.checkpoint.checkpointer import Checkpointer, CheckpointFallbackWarning, SaveHandle
from pyengine.checkpoint.export import export_weights
from pyengine.checkpoint.inspection import CheckpointInfo, inspect_directory

__all__ = [
    "CheckpointFallbackWarning",
    "CheckpointInfo",
    "Checkpointer",
    "SaveHandle",
    "export_weights",
    "inspect_directory",
]
