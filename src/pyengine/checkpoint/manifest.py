"""Reading a committed checkpoint: its manifest, validated field by field, and its tensors,
read and checksummed by the C++ core.

Nothing from disk is trusted. The manifest carries its own CRC32C; every name, size and
offset is checked here and again by the core against the real file size before any read.
Every error is a CheckpointError that names the file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyengine import _core
from pyengine.checkpoint.dtypes import CODE_TO_TORCH, ITEMSIZE
from pyengine.checkpoint.envelope import unseal
from pyengine.checkpoint.state_codec import MARKERS
from pyengine.errors import CheckpointError

FORMAT = "pyengine.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD_FILE = re.compile(r"^shard-\d{5}-of-\d{5}\.safetensors$")
# Sizes and offsets are file positions (off_t); checksums are CRC32Cs. Larger values are damage,
# refused here rather than overflowing where the core takes them.
_MAX_POSITION = 1 << 63
_MAX_CRC = 1 << 32


@dataclass(frozen=True)
class ShardInfo:
    file: str
    bytes: int
    header_bytes: int
    crc32c: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: int
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc32c: int


@dataclass(frozen=True)
class Manifest:
    directory: Path
    step: int
    created_unix: float
    shards: tuple[ShardInfo, ...]
    tensors: dict[str, TensorInfo]
    state: Any

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint was never committed") from None
    doc = unseal(raw, path)
    try:
        return _parse(directory, doc)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is malformed: {e}") from None


def _parse(directory: Path, doc: dict) -> Manifest:
    path = directory / MANIFEST
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pyengine checkpoint manifest")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {doc.get('version')}; this pyengine reads version "
                              f"{VERSION}. Upgrade pyengine to read it.")
    shards = tuple(_shard(s, path) for s in _typed(doc["shards"], list, "shards"))
    tensors = {name: _tensor(name, _typed(t, dict, f"tensor {name!r}"), shards, path)
               for name, t in _typed(doc["tensors"], dict, "tensors").items()}
    check_state(doc["state"], path)
    return Manifest(directory, _nonneg(doc["step"]), _real(doc["created_unix"]), shards, tensors, doc["state"])


def _typed(v: Any, kind: type, what: str) -> Any:
    if not isinstance(v, kind):
        raise ValueError(f"{what} must be a JSON {'object' if kind is dict else 'array'}, got {type(v).__name__}")
    return v


def _nonneg(v: Any, bound: int = _MAX_POSITION) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < bound:
        raise ValueError(f"expected an integer in [0, {bound}), got {v!r}")
    return v


def _real(v: Any) -> float:
    finite = isinstance(v, float) and math.isfinite(v)
    if not (finite or (isinstance(v, int) and not isinstance(v, bool) and abs(v) < _MAX_POSITION)):
        raise ValueError(f"expected a finite number, got {str(v)[:40]}")
    return float(v)


def _shard(s: Any, path: Path) -> ShardInfo:
    file = _typed(s, dict, "a shard")["file"]
    if not isinstance(file, str) or not _SHARD_FILE.match(file):
        raise CheckpointError(f"{path} names a shard file {file!r} that pyengine never writes; refusing it")
    info = ShardInfo(file, _nonneg(s["bytes"]), _nonneg(s["header_bytes"]), _nonneg(s["crc32c"], _MAX_CRC))
    if not 8 <= info.header_bytes <= info.bytes:
        raise CheckpointError(f"{path}: shard {file} has a header of {info.header_bytes} bytes in a "
                              f"{info.bytes}-byte file")
    return info


def _tensor(name: str, t: dict, shards: tuple[ShardInfo, ...], path: Path) -> TensorInfo:
    if (not name or name.startswith("/") or name == ".." or name.startswith("../") or "/../" in name
            or name.endswith("/..")):
        raise CheckpointError(f"{path} holds a tensor named {name!r}, which looks like a path; refusing it")
    shape = tuple(_nonneg(d) for d in _typed(t["shape"], list, "shape"))
    info = TensorInfo(name, _nonneg(t["shard"]), t["dtype"], shape, _nonneg(t["offset"]), _nonneg(t["nbytes"]),
                      _nonneg(t["crc32c"], _MAX_CRC))
    if not isinstance(info.dtype, str) or info.dtype not in CODE_TO_TORCH:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {info.dtype!r}")
    if info.shard >= len(shards):
        raise CheckpointError(f"{path}: tensor {name!r} names shard {info.shard} of {len(shards)}")
    if math.prod(info.shape) * ITEMSIZE[info.dtype] != info.nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} has {info.nbytes} bytes, not what its shape and dtype need")
    shard = shards[info.shard]
    if info.offset < shard.header_bytes or info.offset + info.nbytes > shard.bytes:
        raise CheckpointError(f"{path}: tensor {name!r} claims bytes [{info.offset}, {info.offset + info.nbytes}) "
                              f"outside the data of {shard.file} ({shard.bytes} bytes)")
    return info


# Deeper than any state save() can encode (its encoder recurses per level), and shallow enough
# that decode(), which also recurses, cannot exhaust the interpreter's stack.
MAX_STATE_DEPTH = 200
_HASHABLE_MARKERS = frozenset({"__tuple__", "__float__", "__numpy__", "__torch_dtype__"})


def check_state(state: Any, path: Path) -> None:
    """Raises CheckpointError unless `state` is an encoded tree that state_codec.decode turns
    into values: every marker well-formed, every __dict__ key hashable, bounded depth. The
    manifest's checksum only says the bytes are the ones written, not that a writer wrote them."""
    stack: list[tuple[Any, int, bool]] = [(state, 0, False)]  # value, depth, must decode hashable
    while stack:
        value, depth, as_key = stack.pop()
        if depth > MAX_STATE_DEPTH:
            raise CheckpointError(f"{path}: the saved state is nested deeper than {MAX_STATE_DEPTH} levels")
        if isinstance(value, list):
            stack.extend((v, depth + 1, as_key) for v in value)
        elif isinstance(value, dict):
            marker = next(iter(value)) if len(value) == 1 and next(iter(value)) in MARKERS else None
            if as_key and marker not in _HASHABLE_MARKERS:
                raise CheckpointError(f"{path}: the saved state has a dict key that cannot be a key")
            if marker is None:
                stack.extend((v, depth + 1, False) for v in value.values())
            else:
                stack.extend((v, depth + 1, k) for v, k in _marker_children(marker, value[marker], as_key, path))


def _marker_children(marker: str, inner: Any, as_key: bool, path: Path) -> list[tuple[Any, bool]]:
    """The encoded values inside one marker (with whether each must decode hashable), once the
    marker itself is checked."""
    ok = True
    children: list[tuple[Any, bool]] = []
    if marker in ("__tensor__", "__ndarray__"):
        ok = isinstance(inner, str)
    elif marker == "__tuple__":
        ok = isinstance(inner, list)
        children = [(v, as_key) for v in inner] if ok else []
    elif marker == "__dict__":
        ok = isinstance(inner, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in inner)
        children = [c for k, v in inner for c in ((k, True), (v, False))] if ok else []
    elif marker == "__float__":
        ok = isinstance(inner, str) and _parses_as_float(inner)
    elif marker == "__numpy__":
        ok = isinstance(inner, list) and len(inner) == 2 and _numpy_scalar_decodes(*inner)
    elif marker == "__torch_dtype__":
        ok = isinstance(inner, str) and isinstance(getattr(torch, inner, None), torch.dtype)
    if not ok:
        raise CheckpointError(f"{path}: the saved state has a malformed {marker} entry: {str(inner)[:80]}")
    return children


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numpy_scalar_decodes(dtype: Any, value: Any) -> bool:
    # The encoder writes a numeric dtype and the scalar's .item() (a __float__ marker for inf/nan).
    if isinstance(value, dict) and set(value) == {"__float__"} and isinstance(value["__float__"], str):
        value = value["__float__"]
    if not isinstance(dtype, str) or isinstance(value, (dict, list)) or value is None:
        return False
    try:
        scalar_type = np.dtype(dtype)
        if scalar_type.kind not in "biufc":
            return False
        scalar_type.type(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def read_tensors(manifest: Manifest, names: Iterable[str] | None = None,
                 threads: int = 4) -> dict[str, torch.Tensor]:
    """Reads the named tensors (all by default) into new CPU tensors, verifying checksums."""
    wanted = manifest.tensors.keys() if names is None else names
    infos = []
    for name in wanted:
        try:
            infos.append(manifest.tensors[name])
        except (KeyError, TypeError):
            raise CheckpointError(f"{manifest.directory / MANIFEST} has no tensor {name!r}") from None
    # Every destination is allocated below, sized by the manifest: check the shards' real sizes
    # first, so a damaged manifest is refused before it can ask for more memory than its files hold.
    for index in sorted({info.shard for info in infos}):
        _check_shard_size(manifest, manifest.shards[index])
    out: dict[str, torch.Tensor] = {}
    per_shard: dict[int, list[_core.TensorRead]] = {}
    for info in infos:
        name = info.name
        t = torch.empty(info.shape, dtype=CODE_TO_TORCH[info.dtype])
        out[name] = t
        per_shard.setdefault(info.shard, []).append(_core.TensorRead(
            name=name, offset=info.offset, nbytes=info.nbytes, crc32c=info.crc32c,
            into=t.reshape(-1).view(torch.uint8).numpy()))
    extents: dict[int, list[_core.TensorExtent]] = {}
    if names is not None:  # a partial read checks each shard's header against the manifest's CRCs
        for info in manifest.tensors.values():
            if info.shard in per_shard:
                extents.setdefault(info.shard, []).append(
                    _core.TensorExtent(offset=info.offset, nbytes=info.nbytes, crc32c=info.crc32c))
    requests = []
    for index, reads in sorted(per_shard.items()):
        shard = manifest.shards[index]
        requests.append(_core.ShardRead(
            path=str(manifest.directory / shard.file), file_bytes=shard.bytes, header_bytes=shard.header_bytes,
            crc32c=shard.crc32c, tensors=reads, extents=extents.get(index, [])))
    try:
        _core.read_shards(requests, threads)
    except FileNotFoundError as e:
        raise CheckpointError(f"{e.filename} is missing: the checkpoint is incomplete") from None
    return out


def _check_shard_size(manifest: Manifest, shard: ShardInfo) -> None:
    path = manifest.directory / shard.file
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    if size != shard.bytes:
        raise CheckpointError(f"shard {path} is {size} bytes but the manifest says {shard.bytes}"
                              + (" (truncated)" if size < shard.bytes else ""))


def verify_files(manifest: Manifest) -> None:
    """Checks every shard's size and whole-file checksum without loading anything."""
    for shard in manifest.shards:
        try:
            _core.verify_file(str(manifest.directory / shard.file), shard.bytes, shard.crc32c)
        except FileNotFoundError as e:
            raise CheckpointError(f"{e.filename} is missing: the checkpoint is incomplete") from None
