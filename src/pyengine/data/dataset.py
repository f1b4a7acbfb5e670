"""Opening a dataset: manifest checks in Python, file checks and memory maps in C++."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from pyengine import _core
from pyengine.data import format as fmt
from pyengine.errors import DataError, UnverifiedDataWarning

_HINT = "Re-create it with pe.data.write_dataset (or pe.data.from_torch_dataset)."
_MAX_COUNT = 1 << 63
# verify= values, as the core's Verify enum numbers them (csrc/core/data/shard_file.h).
_VERIFY_MODES = {"never": 0, "on_read": 1, "open": 2}


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

    Every payload byte handed out (by ``ds[i]`` and by every Loader over it) is checked first:
    each 64 KiB block of a file against its CRC32C the first time any sample in it is read in
    this process (later reads cost one atomic load per block). A bad block raises
    :class:`~pyengine.DataError` naming the file and the dataset samples it holds; a file
    truncated while open raises DataError ("... shrank while being read") instead of killing
    the process with SIGBUS.

    Args:
        path: The dataset directory.
        verify: When payload checksums are checked. "on_read" (the default): each block on its
            first read. "open" (or True): every byte now, at open (reads the whole dataset
            once; for version-1 datasets, the only check there is). "never" (or False): not at
            all, the opt-out for a dataset you trust or measure raw speed on; corrupted bytes
            then arrive as data. Headers and sizes are checked in every mode.

    Raises:
        DataError: The manifest or a file is missing, truncated, corrupt or inconsistent.

    Warns:
        UnverifiedDataWarning: The files are in format version 1 (no block checksums) and
            ``verify="on_read"``: nothing checks what is read. Re-write the dataset, or open
            it with ``verify="open"``.

    Attributes:
        verification: What checks the bytes read: "blocks" (each block on first read),
            "open" (everything was checked at open), "unverified" (a version-1 dataset opened
            with "on_read": nothing), or "never" (the opt-out).
        metadata: The dict given to the writer's ``metadata=`` ({} if none).

    Thread-safe for reading; the maps stay valid while any loader over it lives.
    """

    def __init__(self, path: Union[str, os.PathLike], verify: Union[str, bool] = "on_read") -> None:
        self.path = os.fspath(path)
        self.verify = _verify_mode(verify)
        manifest = _read_manifest(self.path)
        self.version: int = manifest["version"]
        self.metadata: dict[str, Any] = manifest.get("metadata", {})
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
            self._core = _core.MmapDataset(specs, self._shard_counts, _VERIFY_MODES[self.verify], self.version)
        except FileNotFoundError as e:
            raise DataError(f"dataset file {e.filename} is missing from {self.path}. {_HINT}") from e
        self._names = list(self.fields)
        self.verification = self._verification()
        if self.verification == "unverified":
            warnings.warn(
                UnverifiedDataWarning(
                    f"{self.path} is a format-version-1 dataset, which has no block checksums: reads are not "
                    "checked, and a corrupted byte would be returned as data. Re-write it with "
                    "pe.data.write_dataset (format 2 checks each block on first read), or open it with "
                    'verify="open" to check the whole payload once now.'
                ),
                stacklevel=2,
            )

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self._shard_counts)

    @property
    def nbytes(self) -> int:
        """Payload bytes of all fields (what an epoch reads)."""
        return sum(int(self._core.payload_bytes(f, s)) for f in range(len(self._names)) for s in range(self.num_shards))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Sample `index` (negative counts from the end) as fresh arrays, checked first.

        Raises:
            IndexError: `index` is out of range.
            DataError: a block holding it fails its checksum, or a file shrank while open.
        """
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {index} out of range for a dataset of {n}")
        out = {}
        for (name, field), raw in zip(self.fields.items(), self._core.read_sample(i)):
            values = raw.view(field.dtype)
            out[name] = values.reshape(field.shape) if field.kind == "fixed" else values
        return out

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}: {v.kind} {v.dtype} {v.shape}" for k, v in self.fields.items())
        return f"Dataset({self.path!r}, {len(self)} samples, {{{fields}}})"

    def _verification(self) -> str:
        if self.verify == "never":
            return "never"
        if self.verify == "open":
            return "open"
        return "blocks" if self._core.checks_blocks else "unverified"


def _verify_mode(verify: Union[str, bool]) -> str:
    if verify is True:
        return "open"
    if verify is False:
        return "never"
    if verify not in _VERIFY_MODES:
        raise ValueError(f'verify must be "on_read", "open" (or True) or "never" (or False), got {verify!r}')
    return str(verify)


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
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in fmt.READABLE_VERSIONS:
        raise DataError(
            f"{manifest_path} has format version {version!r}; this pyengine reads versions "
            f"{', '.join(map(str, fmt.READABLE_VERSIONS))}. {_HINT}"
        )
    if not isinstance(manifest.get("metadata", {}), dict):
        raise DataError(f"{manifest_path} has metadata that is not a JSON object. {_HINT}")
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
