"""How each kind of object in a checkpoint's state is captured and put back.

    nn.Module (also wrapped in DDP, DataParallel or torch.compile)   state_dict of the inner module
    torch.optim.Optimizer                                           state_dict
    anything else with state_dict / load_state_dict                 (schedulers, GradScaler, Loader)
    tensors, numpy arrays, JSON values                              stored as they are
"""

from __future__ import annotations

from collections.abc import MutableMapping, MutableSequence
from typing import Any

import numpy as np
import torch

from pyengine.checkpoint.dtensors import module_state_like, optimizer_state_like
from pyengine.checkpoint.state_codec import StateEncoder


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose keys are saved: DDP's `module.` prefix is not part of the model,
    so a checkpoint restores into a plain model and back."""
    while True:
        if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):  # torch.compile
            module = module._orig_mod
        else:
            return module


def encode_object(encoder: StateEncoder, key: str, obj: Any) -> Any:
    """Encodes one top-level entry. Parameters and optimizer state are marked stable."""
    if isinstance(obj, torch.nn.Module):
        module = unwrap_module(obj)
        params = frozenset(p.data_ptr() for p in module.parameters())
        return encoder.encode(module.state_dict(), (key,), stable_ptrs=params)
    if isinstance(obj, torch.optim.Optimizer):
        return encoder.encode(obj.state_dict(), (key,), all_stable=True)
    if _has_state_dict(obj):
        return encoder.encode(obj.state_dict(), (key,))
    return encoder.encode(obj, (key,))


def load_object(key: str, obj: Any, value: Any) -> None:
    """Puts a decoded value back into `obj`, in place."""
    if isinstance(obj, torch.nn.Module):
        module = unwrap_module(obj)
        module.load_state_dict(module_state_like(module, value))
    elif isinstance(obj, torch.optim.Optimizer):
        obj.load_state_dict(optimizer_state_like(obj, value))
    elif _has_state_dict(obj):
        obj.load_state_dict(value)
    elif isinstance(obj, torch.Tensor):
        with torch.no_grad():
            obj.copy_(value)
    elif isinstance(obj, np.ndarray):
        np.copyto(obj, value)
    elif isinstance(obj, MutableMapping):
        obj.clear()
        obj.update(value)
    elif isinstance(obj, MutableSequence):
        obj[:] = value
    else:
        raise TypeError(f"cannot restore '{key}' in place into a {type(obj).__qualname__}; "
                        "use Checkpointer.load() to read plain values")


def _has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
