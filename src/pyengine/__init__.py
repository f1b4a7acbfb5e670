"""pyengine: a PyTorch training engine with a C++ core.

The loader and the checkpointer work inside any PyTorch loop; the rest builds on them.
"""

from __future__ import annotations

try:
    from pyengine import _core  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on how Python was started
    import os as _os

    raise ImportError(
        f"pyengine's compiled core is missing from {_os.path.dirname(__file__)}: the package was imported "
        "from a folder that was never built (an old checkout's pyengine/ in the current directory, which "
        "Python searches first, or a copied tree). Install it (pip install . or, for development, "
        "pip install --no-build-isolation -e .) and import it from there."
    ) from e

from pyengine import checkpoint, data, distributed, train, transfer, tune
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
    "distributed",
    "overfit_batch",
    "train",
    "transfer",
    "tune",
]
