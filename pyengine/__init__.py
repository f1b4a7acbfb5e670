"""pyengine: a PyTorch training engine with a C++ core.

The loader and the checkpointer work inside any PyTorch loop; the rest builds on them.
"""

from __future__ import annotations

from pyengine import checkpoint, data, train, transfer, tune
from pyengine.checkpoint import Checkpointer
from pyengine.errors import CheckpointError, DataError, PyengineError
from pyengine.train import EarlyStopping, Trainer, VirtualEpochs, overfit_batch

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "DataError",
    "EarlyStopping",
    "PyengineError",
    "Trainer",
    "VirtualEpochs",
    "checkpoint",
    "data",
    "overfit_batch",
    "train",
    "transfer",
    "tune",
]
