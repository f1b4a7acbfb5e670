"""Search-space parameters and the mapping between parameter values and the unit cube.

Every sampler works in one encoded space: each numeric parameter becomes one coordinate in
[0, 1] (log parameters are mapped in log space first, integers are widened by half a step on
each side so every integer owns an equal share of the interval), and each categorical
parameter becomes a one-hot block. Decoding rounds integers and takes the arg-max of a
one-hot block, so any point of the cube decodes to a valid configuration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np


def _check_bounds(kind: str, low: float, high: float, log: bool) -> None:
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{kind}: {name}={v!r} must be a finite number")
    if not low < high:
        raise ValueError(f"{kind}: low={low!r} must be smaller than high={high!r}; swap them or widen the range")
    if log and low <= 0:
        raise ValueError(f"{kind}: a log scale needs low > 0 (got low={low!r}); use Uniform for ranges that touch 0")


@dataclass(frozen=True)
class Uniform:
    """A float drawn uniformly from [low, high]."""

    low: float
    high: float

    def __post_init__(self) -> None:
        _check_bounds("Uniform", self.low, self.high, log=False)

    log = False


@dataclass(frozen=True)
class LogUniform:
    """A positive float whose logarithm is uniform on [log(low), log(high)]."""

    low: float
    high: float

    def __post_init__(self) -> None:
        _check_bounds("LogUniform", self.low, self.high, log=True)

    log = True


@dataclass(frozen=True)
class IntUniform:
    """An integer in [low, high] (both included), optionally on a log scale."""

    low: int
    high: int
    log: bool = False

    def __post_init__(self) -> None:
        for name, v in (("low", self.low), ("high", self.high)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"IntUniform: {name}={v!r} must be an int; use Uniform for floats")
        _check_bounds("IntUniform", int(self.low), int(self.high), self.log)


@dataclass(frozen=True)
class Choice:
    """One of a fixed list of values (strings, numbers, booleans or None), unordered."""

    choices: Sequence[Any]

    def __post_init__(self) -> None:
        if isinstance(self.choices, (str, bytes)) or not isinstance(self.choices, Sequence):
            raise ValueError(f"Choice: expected a list of values, got {self.choices!r}")
        if len(self.choices) == 0:
            raise ValueError("Choice: the list of choices is empty; give at least one value")
        for c in self.choices:
            if c is not None and not isinstance(c, (str, int, float, bool)):
                raise ValueError(f"Choice: {c!r} is not a str, int, float, bool or None (values are stored as JSON)")
        keys = [json.dumps(c) for c in self.choices]
        if len(set(keys)) != len(keys):
            raise ValueError(f"Choice: the choices {list(self.choices)!r} contain duplicates")
        object.__setattr__(self, "choices", tuple(self.choices))


Param = Union[Uniform, LogUniform, IntUniform, Choice]


class Space:
    """An ordered, validated mapping of parameter names to parameters, with its unit-cube encoding.

    Immutable after construction; safe to share between threads.
    """

    def __init__(self, params: Mapping[str, Param]) -> None:
        if isinstance(params, Space):
            params = params.params
        if not isinstance(params, Mapping) or len(params) == 0:
            raise ValueError("search space: expected a non-empty dict such as {'lr': pe.tune.LogUniform(1e-4, 1e-1)}")
        self.params: dict[str, Param] = {}
        self._slices: dict[str, slice] = {}
        offset = 0
        for name, p in params.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"search space: parameter names must be non-empty strings, got {name!r}")
            if not isinstance(p, (Uniform, LogUniform, IntUniform, Choice)):
                raise ValueError(
                    f"search space: {name!r} is {p!r}; use pe.tune.Uniform, LogUniform, IntUniform or Choice"
                )
            width = len(p.choices) if isinstance(p, Choice) else 1
            self.params[name] = p
            self._slices[name] = slice(offset, offset + width)
            offset += width
        self.dim = offset

    def __len__(self) -> int:
        return len(self.params)

    def to_json(self) -> str:
        """A canonical description, stored with a study to detect a changed space on reopen."""
        out = {}
        for name, p in self.params.items():
            if isinstance(p, Choice):
                out[name] = ["Choice", list(p.choices)]
            else:
                out[name] = [type(p).__name__, p.low, p.high, bool(p.log)]
        return json.dumps(out, sort_keys=True)

    def validate(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Check a user-supplied configuration (e.g. an enqueued one) and return it in canonical form."""
        if set(values) != set(self.params):
            raise ValueError(f"params {sorted(values)} do not match the search space {sorted(self.params)}")
        return self.decode(self.encode(values))

    def encode(self, values: Mapping[str, Any]) -> np.ndarray:
        """Map a configuration to a point of the unit cube (length `dim`)."""
        x = np.zeros(self.dim)
        for name, p in self.params.items():
            v, s = values[name], self._slices[name]
            if isinstance(p, Choice):
                keys = [json.dumps(c) for c in p.choices]
                if json.dumps(v) not in keys:
                    raise ValueError(f"{name}={v!r} is not one of {list(p.choices)!r}")
                x[s.start + keys.index(json.dumps(v))] = 1.0
                continue
            lo, hi = self._numeric_range(p)
            if not (p.low <= v <= p.high):
                raise ValueError(f"{name}={v!r} is outside [{p.low}, {p.high}]")
            x[s.start] = ((math.log(v) if p.log else v) - lo) / (hi - lo)
        return x

    def decode(self, x: np.ndarray) -> dict[str, Any]:
        """Map a point of the unit cube (clipped to it) to a valid configuration."""
        x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
        out: dict[str, Any] = {}
        for name, p in self.params.items():
            s = self._slices[name]
            if isinstance(p, Choice):
                out[name] = p.choices[int(np.argmax(x[s]))]
                continue
            lo, hi = self._numeric_range(p)
            v = lo + float(x[s.start]) * (hi - lo)
            v = math.exp(v) if p.log else v
            if isinstance(p, IntUniform):
                out[name] = int(min(max(round(v), p.low), p.high))
            else:
                out[name] = float(min(max(v, p.low), p.high))
        return out

    def round_encoded(self, x: np.ndarray) -> np.ndarray:
        """Snap an encoded point to the encoding of the configuration it decodes to."""
        return self.encode(self.decode(x))

    def key(self, values: Mapping[str, Any]) -> str:
        """A canonical string identifying a configuration; equal configurations have equal keys."""
        canon = {}
        for name, p in self.params.items():
            v = values[name]
            canon[name] = float(f"{v:.12g}") if isinstance(p, (Uniform, LogUniform)) else v
        return json.dumps(canon, sort_keys=True)

    @staticmethod
    def _numeric_range(p: Param) -> tuple[float, float]:
        lo, hi = float(p.low), float(p.high)
        if isinstance(p, IntUniform):
            # Half a step of margin each side so that rounding gives each integer an equal share.
            if p.log:
                return math.log(lo - 0.5), math.log(hi + 0.5)  # lo >= 1 here, so lo - 0.5 > 0
            return lo - 0.5, hi + 0.5
        return (math.log(lo), math.log(hi)) if p.log else (lo, hi)
