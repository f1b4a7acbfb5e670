"""Opening a dataset: manifest checks in Python, file checks and memory maps in C++."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from pyengine import _core
from pyengine.data import format as fmt
from pyengine.errors import DataError

_HINT = "Re-create it with pe.data.write_dataset (or pe.data.from_torch_dataset)."
_MAX_COUNT = 1 << 63


@dataclass(frozen=True)
class FieldInfo:
    """One field: ``kind`` is "fixed" (every sample has ``shape``) or "variable" (1-D, any length)."""

    kind: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def sample_bytes(self) -> int:
        """Bytes per sample (fixed) or per element (variable)."""
        if self.kind == "variable":
            return self.dtype.itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class Dataset:
    """A dataset written by :func:`write_dataset`, memory-mapped and validated on open.

    ``len(ds)``, ``ds.fields`` (name -> :class:`FieldInfo`) and ``ds[i]`` (a dict of numpy
    arrays, copied out of the map) work like a map-style dataset; pass it to
    :class:`pyengine.data.Loader` for fast batches.

    Args:
        path: The dataset directory.
        verify: Also check every payload checksum (reads the whole dataset once).

    Raises:
        DataError: The manifest or a file is missing, truncated, corrupt or inconsistent.

    Thread-safe for reading; the maps stay valid while any loader over it lives.
    """

    def __init__(self, path: Union[str, os.PathLike], verify: bool = False) -> None:
        self.path = os.fspath(path)
        manifest = _read_manifest(self.path)
        self.fields: dict[str, FieldInfo] = {}
        specs = []
        for name, info in manifest["fields"].items():
            field = FieldInfo(info["kind"], fmt.parse_dtype(info["dtype"]), tuple(info["shape"]))
            self.fields[name] = field
            paths = [
                os.path.join(self.path, fmt.shard_file_name(name, s)) for s in range(len(manifest["shard_counts"]))
            ]
            kind = fmt.FIXED if field.kind == "fixed" else fmt.VARIABLE
            header_shape = list(field.shape) if kind == fmt.FIXED else []  # as pack_header records it
            specs.append((name, kind, field.sample_bytes, field.dtype.str, paths, header_shape))
        self._shard_counts = [int(c) for c in manifest["shard_counts"]]
        self._starts = np.cumsum([0, *self._shard_counts])
        _check_every_file_listed(self.path, [s[4] for s in specs])
        try:
            self._core = _core.MmapDataset(specs, self._shard_counts, verify)
        except FileNotFoundError as e:
            raise DataError(f"dataset file {e.filename} is missing from {self.path}. {_HINT}") from e
        self._names = list(self.fields)
        self._views: dict[tuple[int, int], Any] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self._shard_counts)

    @property
    def nbytes(self) -> int:
        """Payload bytes of all fields (what an epoch reads)."""
        return sum(
            int(self._core.payload(f, s).nbytes) for f in range(len(self._names)) for s in range(self.num_shards)
        )

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {index} out of range for a dataset of {n}")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        local = i - int(self._starts[shard])
        return {name: self._sample(f, shard, local) for f, name in enumerate(self._names)}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}: {v.kind} {v.dtype} {v.shape}" for k, v in self.fields.items())
        return f"Dataset({self.path!r}, {len(self)} samples, {{{fields}}})"

    def _sample(self, f: int, shard: int, local: int) -> np.ndarray:
        field = self.fields[self._names[f]]
        views = self._views.get((f, shard))
        if views is None:
            views = self._views[(f, shard)] = (self._core.payload(f, shard), self._core.offsets(f, shard))
        payload, offsets = views
        if offsets is None:
            size = field.sample_bytes
            raw = payload[local * size : (local + 1) * size]
            return raw.view(field.dtype).reshape(field.shape).copy()
        start, end = int(offsets[local]), int(offsets[local + 1])
        return payload[start:end].view(field.dtype).copy()


def _read_manifest(path: str) -> dict[str, Any]:
    manifest_path = os.path.join(path, fmt.MANIFEST)
    if not os.path.isdir(path):
        raise DataError(f"{path} is not a directory; a pyengine dataset is a directory. {_HINT}")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"{manifest_path} is missing: {path} is not a pyengine dataset, or writing it did not finish. {_HINT}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{manifest_path} is corrupt ({e}). {_HINT}") from None
    except RecursionError:  # json's decoder recurses per level; the writer never nests this deep
        raise DataError(f"{manifest_path} is corrupt (nested too deeply). {_HINT}") from None
    try:
        _check_manifest(manifest, manifest_path)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{manifest_path} is malformed ({e!r}). {_HINT}") from None
    return manifest


def _check_manifest(manifest: Any, manifest_path: str) -> None:
    """Every value the reader uses, checked for type and range before it sizes or names anything;
    the files are then checked against it by the core. Raises DataError, or KeyError / TypeError /
    ValueError for the caller to report as malformed."""
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT_NAME:
        raise DataError(f"{manifest_path} is not a pyengine dataset manifest. {_HINT}")
    if manifest.get("version") != fmt.FORMAT_VERSION:
        raise DataError(
            f"{manifest_path} has format version {manifest.get('version')!r}; this pyengine reads "
            f"version {fmt.FORMAT_VERSION}. {_HINT}"
        )
    counts = manifest["shard_counts"]
    # Counts become uint64 in the core and int64 prefix sums here: their total must fit both.
    if (
        not isinstance(counts, list)
        or not all(_is_count(c) for c in counts)
        or not _is_count(manifest["num_samples"])
        or sum(counts) != manifest["num_samples"]
    ):
        raise DataError(f"{manifest_path} is inconsistent: shard sizes do not add up. {_HINT}")
    fields = manifest["fields"]
    if not isinstance(fields, dict) or not fields:
        raise DataError(f"{manifest_path} lists no fields. {_HINT}")
    for name, info in fields.items():
        fmt.check_field_name(name)
        if not isinstance(info, dict) or info.get("kind") not in ("fixed", "variable"):
            raise DataError(f"{manifest_path}: field {name!r} has no known kind. {_HINT}")
        itemsize = fmt.parse_dtype(info["dtype"]).itemsize
        shape = info["shape"]
        if info["kind"] == "variable":
            valid = shape == [-1]
        else:
            valid = (
                isinstance(shape, list)
                and len(shape) <= fmt.MAX_DIMS
                and all(_is_count(d) for d in shape)
                and _is_count(math.prod(shape) * itemsize)
            )
        if not valid:
            raise DataError(
                f"{manifest_path}: field {name!r} has shape {shape!r}, which is not a {info['kind']} field's. {_HINT}"
            )


def _check_every_file_listed(path: str, listed: list[list[str]]) -> None:
    """dataset.json has no checksum, but the writer puts nothing else in the directory: a data
    file it does not list means a field or shard was dropped from it, and with it samples."""
    expected = {os.path.basename(p) for paths in listed for p in paths}
    unlisted = sorted(n for n in os.listdir(path) if fmt.is_shard_file_name(n) and n not in expected)
    if unlisted:
        raise DataError(
            f"{os.path.join(path, fmt.MANIFEST)} does not list {', '.join(unlisted[:3])}"
            f"{' ...' if len(unlisted) > 3 else ''} beside it: the manifest is damaged. {_HINT}"
        )


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_COUNT
