"""Turns training state into JSON plus a flat list of named tensors, and back.

Nothing is pickled: non-tensor values must be JSON values (dict, list, str, int, float,
bool, None) or the few types given markers below, so loading a checkpoint can never run
code. A value of any other type is refused at save time with the path where it was found.

Markers (a one-key dict whose key is one of these) keep what plain JSON would lose:
``__tensor__`` / ``__ndarray__`` name a stored tensor, ``__tuple__`` keeps tuples (Adam's
``betas``, Python's RNG state), ``__dict__`` keeps non-string keys (optimizer state is
keyed by int), ``__float__`` keeps inf and nan, ``__numpy__`` keeps numpy scalars and
``__torch_dtype__`` keeps torch dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pyengine import _core
from pyengine.checkpoint.dtypes import code_of_torch

MARKERS = frozenset({"__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__", "__numpy__",
                     "__torch_dtype__"})


@dataclass
class NamedTensor:
    """A tensor to store. `stable` means it cannot change before the next optimizer step,
    so an overlapped save may copy it in the background (parameters, optimizer state)."""

    name: str
    tensor: torch.Tensor
    stable: bool = False


def writer_source(name: str, t: torch.Tensor) -> tuple[_core.WriteSource, bool]:
    """A host tensor as the C++ writer takes it, and whether its bytes are a private copy (made
    here for a non-contiguous, conjugate or negative view), which nothing else writes to, so an
    overlapped save may copy it later. The WriteSource keeps the bytes alive; the writer keeps
    the WriteSource until its copy is done."""
    private = not t.is_contiguous() or t.is_conj() or t.is_neg()
    if private:
        t = t.resolve_conj().resolve_neg().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy()
    return _core.WriteSource(name, code_of_torch(t.dtype, name), list(t.shape), data), private


def storage_ptr(t: torch.Tensor) -> int:
    """Where a tensor's bytes live: its local shard's for a DTensor (which has no data_ptr)."""
    if hasattr(t, "placements") and hasattr(t, "to_local"):
        t = t.to_local()  # type: ignore[attr-defined]
    return t.data_ptr()


class UnstorableValueError(TypeError):
    """A value pyengine cannot store without pickling. `path`: the keys and list indices that
    lead to it from the saved state; `what`: what it is ("a mymod.Tokenizer")."""

    def __init__(self, path: tuple[str | int, ...], what: str) -> None:
        self.path, self.what = path, what
        super().__init__(
            f"cannot checkpoint {what} at {'/'.join(map(str, path))}: only tensors, numpy arrays (of numbers) and "
            "JSON values (dict, list, tuple, str, int, float, bool, None) are stored, because pyengine never "
            "pickles. Convert it, or keep it out of the saved state.")


class StateEncoder:
    """Encodes one checkpoint's state; collects its tensors in `tensors`."""

    def __init__(self) -> None:
        self.tensors: list[NamedTensor] = []
        self._names: set[str] = set()
        self._stable_ptrs: set[int] = set()

    def encode(self, value: Any, path: tuple[str | int, ...], stable_ptrs: frozenset[int] = frozenset(),
               all_stable: bool = False) -> Any:
        if isinstance(value, torch.Tensor):
            stable = all_stable or (value.numel() > 0 and storage_ptr(value) in stable_ptrs)
            return {"__tensor__": self._add(path, value.detach(), stable)}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": self._add(path, _tensor_of_ndarray(value, path), stable=False)}
        if isinstance(value, Mapping):
            return self._encode_mapping(value, path, stable_ptrs, all_stable)
        if isinstance(value, (list, tuple)):
            # Fast path for long runs of plain ints (Python's RNG state is 625 of them).
            if all(type(v) is int for v in value):
                return {"__tuple__": list(value)} if isinstance(value, tuple) else list(value)
            items = [self.encode(v, (*path, i), stable_ptrs, all_stable) for i, v in enumerate(value)]
            return {"__tuple__": items} if isinstance(value, tuple) else items
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, np.generic):
            return {"__numpy__": [value.dtype.str, self.encode(value.item(), path)]}
        if isinstance(value, torch.dtype):
            return {"__torch_dtype__": str(value).removeprefix("torch.")}
        raise UnstorableValueError(path, f"a {type(value).__module__}.{type(value).__qualname__}")

    def _encode_mapping(self, value: Mapping, path: tuple[str | int, ...], stable_ptrs: frozenset[int],
                        all_stable: bool) -> Any:
        plain = all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in MARKERS)
        if plain:
            return {k: self.encode(v, (*path, k), stable_ptrs, all_stable) for k, v in value.items()}
        return {"__dict__": [[self.encode(k, (*path, "<key>")),
                              self.encode(v, (*path, str(k)), stable_ptrs, all_stable)] for k, v in value.items()]}

    def _add(self, path: tuple[str | int, ...], tensor: torch.Tensor, stable: bool) -> str:
        name = "/".join(map(str, path))
        if name in self._names:  # e.g. a key that itself contains "/"
            i = 1
            while f"{name}#{i}" in self._names:
                i += 1
            name = f"{name}#{i}"
        self._names.add(name)
        self.tensors.append(NamedTensor(name, tensor, stable))
        return name


def _tensor_of_ndarray(array: np.ndarray, path: tuple[str | int, ...]) -> torch.Tensor:
    if array.dtype.hasobject or array.dtype.kind in "USV":
        raise UnstorableValueError(path, f"a numpy array of dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of StateEncoder.encode: tensors come back as torch tensors, arrays as numpy."""
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (key, inner), = value.items()
        if key == "__tensor__":
            return tensors[inner]
        if key == "__ndarray__":
            return tensors[inner].numpy()
        if key == "__tuple__":
            return tuple(decode(v, tensors) for v in inner)
        if key == "__dict__":
            return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in inner}
        if key == "__float__":
            return float(inner)
        if key == "__numpy__":
            return np.dtype(inner[0]).type(decode(inner[1], tensors))
        if key == "__torch_dtype__":
            return getattr(torch, inner)
    return {k: decode(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def tensor_names(value: Any) -> list[str]:
    """Names of every stored tensor referenced under `value` (an encoded tree)."""
    out: list[str] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            if len(v) == 1 and next(iter(v)) in ("__tensor__", "__ndarray__"):
                out.append(next(iter(v.values())))
            else:
                stack.extend(v.values())
    return out
