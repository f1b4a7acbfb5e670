"""Reading a committed checkpoint: its manifest, validated field by field, and its tensors,
read and checksummed by the C++ core.

Nothing from disk is trusted. The manifest carries its own CRC32C; every name, size and
offset is checked here and again by the core against the real file size before any read.
Every error is a CheckpointError that names the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyengine import _core
from pyengine.checkpoint.dtypes import CODE_TO_TORCH, ITEMSIZE
from pyengine.checkpoint.envelope import unseal
from pyengine.errors import CheckpointError

FORMAT = "pyengine.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD_FILE = re.compile(r"^shard-\d{5}-of-\d{5}\.safetensors$")


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
    shards = tuple(_shard(s, path) for s in doc["shards"])
    tensors = {name: _tensor(name, t, shards, path) for name, t in doc["tensors"].items()}
    return Manifest(directory, _nonneg(doc["step"]), float(doc["created_unix"]), shards, tensors, doc["state"])


def _nonneg(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"expected a non-negative integer, got {v!r}")
    return v


def _shard(s: dict, path: Path) -> ShardInfo:
    file = s["file"]
    if not isinstance(file, str) or not _SHARD_FILE.match(file):
        raise CheckpointError(f"{path} names a shard file {file!r} that pyengine never writes; refusing it")
    info = ShardInfo(file, _nonneg(s["bytes"]), _nonneg(s["header_bytes"]), _nonneg(s["crc32c"]))
    if not 8 <= info.header_bytes <= info.bytes:
        raise CheckpointError(f"{path}: shard {file} has a header of {info.header_bytes} bytes in a "
                              f"{info.bytes}-byte file")
    return info


def _tensor(name: str, t: dict, shards: tuple[ShardInfo, ...], path: Path) -> TensorInfo:
    if (not name or name.startswith("/") or name == ".." or name.startswith("../") or "/../" in name
            or name.endswith("/..")):
        raise CheckpointError(f"{path} holds a tensor named {name!r}, which looks like a path; refusing it")
    info = TensorInfo(name, _nonneg(t["shard"]), t["dtype"], tuple(_nonneg(d) for d in t["shape"]),
                      _nonneg(t["offset"]), _nonneg(t["nbytes"]), _nonneg(t["crc32c"]))
    if info.dtype not in CODE_TO_TORCH:
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


def read_tensors(manifest: Manifest, names: Iterable[str] | None = None,
                 threads: int = 4) -> dict[str, torch.Tensor]:
    """Reads the named tensors (all by default) into new CPU tensors, verifying checksums."""
    wanted = manifest.tensors.keys() if names is None else names
    out: dict[str, torch.Tensor] = {}
    per_shard: dict[int, list[_core.TensorRead]] = {}
    for name in wanted:
        try:
            info = manifest.tensors[name]
        except KeyError:
            raise CheckpointError(f"{manifest.directory / MANIFEST} has no tensor {name!r}") from None
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


def verify_files(manifest: Manifest) -> None:
    """Checks every shard's size and whole-file checksum without loading anything."""
    for shard in manifest.shards:
        try:
            _core.verify_file(str(manifest.directory / shard.file), shard.bytes, shard.crc32c)
        except FileNotFoundError as e:
            raise CheckpointError(f"{e.filename} is missing: the checkpoint is incomplete") from None
