"""How each kind of object in a checkpoint's state is captured and put back.

    nn.Module (also wrapped in DDP, DataParallel or torch.compile)   state_dict of the inner module
    torch.optim.Optimizer                                           state_dict
    anything else with state_dict / load_state_dict                 (schedulers, GradScaler, Loader)
    tensors, numpy arrays, JSON values                              stored as they are
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, MutableSequence
from typing import Any, Callable

import numpy as np
import torch

from pyengine.checkpoint.dtensors import module_state_like, optimizer_state_like
from pyengine.checkpoint.state_codec import StateEncoder, storage_ptr


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


def parameter_ptrs(module: torch.nn.Module) -> frozenset[int]:
    """Where the parameters' bytes live: those tensors change only in an optimizer step, so an
    overlapped save may copy them during the next forward and backward (buffers may not)."""
    return frozenset(storage_ptr(p) for p in module.parameters())


def encode_object(encoder: StateEncoder, key: str, obj: Any) -> Any:
    """Encodes one top-level entry. Parameters and optimizer state are marked stable."""
    if isinstance(obj, torch.nn.Module):
        module = unwrap_module(obj)
        return encoder.encode(module.state_dict(), (key,), stable_ptrs=parameter_ptrs(module))
    if isinstance(obj, torch.optim.Optimizer):
        return encoder.encode(obj.state_dict(), (key,), all_stable=True)
    if _has_state_dict(obj):
        return encoder.encode(obj.state_dict(), (key,))
    return encoder.encode(obj, (key,))


def check_loadable(key: str, obj: Any, value: Any) -> None:
    """Refuses, before anything is loaded, a saved value whose tensors do not have the target's
    shapes: load_state_dict would copy the matching tensors before raising (leaving the model
    half restored), and copy_() into a tensor would broadcast a wrong shape silently.

    Only what stock loading would refuse is checked: a module that loads its own way (a custom
    _load_from_state_dict, as quantization observers that resize, or load pre-hooks, or extra
    state) is left to its own load_state_dict.

    Raises:
        ValueError: naming the entry, both shapes, and that nothing was loaded.
    """
    if isinstance(obj, torch.nn.Module) and isinstance(value, Mapping):
        module = unwrap_module(obj)
        current = module.state_dict()
        checked = _stock_loaded(module)
        pairs = [(f"{key}/{name}", v, current.get(name)) for name, v in value.items() if checked(name)]
    elif isinstance(obj, (torch.Tensor, np.ndarray)):
        pairs = [(key, value, obj)]
    else:
        return
    for name, saved, target in pairs:
        if not isinstance(saved, (torch.Tensor, np.ndarray)) or not isinstance(target, (torch.Tensor, np.ndarray)):
            continue
        if isinstance(target, torch.nn.parameter.UninitializedTensorMixin):
            continue
        shape, want = tuple(saved.shape), tuple(target.shape)
        if shape != want and not (want == () and shape == (1,) and isinstance(obj, torch.nn.Module)):
            raise ValueError(f"the checkpoint's {name!r} has shape {shape} but the target's is {want}: it was "
                             "saved from a different model or array; nothing was loaded")


def _stock_loaded(module: torch.nn.Module) -> Callable[[str], bool]:
    """Whether a state_dict key is loaded by torch's own rules (a size mismatch is an error, and a
    (1,) tensor fills a 0-d parameter), with no hook or override that could reshape it."""
    if type(module).load_state_dict is not torch.nn.Module.load_state_dict:
        return lambda name: False
    stock = torch.nn.Module._load_from_state_dict
    modules = dict(module.named_modules())

    def checked(name: str) -> bool:
        prefix, _, leaf = name.rpartition(".")
        owner = modules.get(prefix)
        if leaf == "_extra_state" or owner is None or type(owner)._load_from_state_dict is not stock:
            return False
        parts = prefix.split(".") if prefix else []
        for depth in range(len(parts) + 1):  # a pre-hook on the module or an ancestor may rewrite the entry
            m = modules.get(".".join(parts[:depth]))
            if m is None or m._load_state_dict_pre_hooks:
                return False
        return True

    return checked


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
