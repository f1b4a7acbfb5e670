"""The on-disk dataset format, shared by the writer and the reader.

A dataset is a directory::

    DIR/dataset.json          the manifest, written last: fields, dtypes, shapes, shard sizes
    DIR/<field>.<shard>.bin   one file per field and shard (5-digit shard number)

Each ``.bin`` file describes itself (checked against the real file size on open by
``csrc/core/data/shard_file.cpp``)::

    [0, 4096)                 header: magic, version, kind, count, sizes, dtype, shape, CRC32Cs
    [4096, 4096 + P)          payload: samples back to back
    variable fields only:     at align8(4096 + P), count + 1 little-endian uint64 offsets

Fixed fields hold samples of one shape and dtype; variable fields hold 1-D samples of any
length (token sequences, encoded records) and come out of the loader flattened with offsets.
"""

from __future__ import annotations

import re
import struct

import numpy as np

from pyengine import _core

MANIFEST = "dataset.json"
FORMAT_NAME = "pyengine.data"
FORMAT_VERSION = 1
HEADER_BYTES = 4096
MAGIC = b"PEDATA01"
FIXED, VARIABLE = 0, 1
MAX_DIMS = 8
HEADER_CRC_OFFSET = 508

# magic, version, kind, count, sample_bytes, payload_bytes, payload_crc32c, ndim, dtype, shape[8]
_HEADER = struct.Struct("<8sIIQQQII16s8Q")
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\.\d{5}\.bin$")
# What dtype_str writes: byte order, kind, item size, and a datetime unit. np.dtype() parses
# far more (comma lists, shapes through ast.literal_eval), none of which a manifest may hold.
_DTYPE_STR = re.compile(r"^[<|][a-zA-Z?][0-9]{1,9}(\[[0-9]{0,9}[a-zA-Z]{1,3}\])?$")


def shard_file_name(field: str, shard: int) -> str:
    return f"{field}.{shard:05d}.bin"


def is_shard_file_name(name: str) -> bool:
    """Whether `name` has the form of a file :func:`shard_file_name` names."""
    return _SHARD_FILE.match(name) is not None


def check_field_name(name: str) -> None:
    if not isinstance(name, str) or not _FIELD_NAME.match(name):
        raise ValueError(
            f"field name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
            "(it becomes part of a file name)"
        )


def pack_header(
    kind: int,
    count: int,
    sample_bytes: int,
    payload_bytes: int,
    payload_crc: int,
    dtype: np.dtype,
    shape: tuple[int, ...],
) -> bytes:
    """The 4096-byte header of one field-shard file, ending with its own CRC32C."""
    if len(shape) > MAX_DIMS:
        raise ValueError(f"samples may have at most {MAX_DIMS} dimensions, got shape {shape}")
    dims = list(shape) + [0] * (MAX_DIMS - len(shape))
    head = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        kind,
        count,
        sample_bytes,
        payload_bytes,
        payload_crc,
        len(shape),
        dtype_str(dtype).encode(),
        *dims,
    )
    body = head + bytes(HEADER_CRC_OFFSET - len(head))
    crc = _core.crc32c(np.frombuffer(body, dtype=np.uint8))
    return body + struct.pack("<I", crc) + bytes(HEADER_BYTES - HEADER_CRC_OFFSET - 4)


def dtype_str(dtype: np.dtype) -> str:
    """numpy's portable dtype string, forced little-endian (the format is little-endian)."""
    dt = np.dtype(dtype)
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise ValueError(f"dtype {dt} is not supported: use plain numeric, bool or fixed-size bytes dtypes")
    return dt.newbyteorder("<").str if dt.byteorder not in ("|", "<") else dt.str


def parse_dtype(text: object) -> np.dtype:
    """The dtype a manifest names, which must be exactly what :func:`dtype_str` writes.

    Raises:
        ValueError: anything else (never passed to np.dtype, whose parser accepts code-like syntax).
    """
    if not isinstance(text, str) or not _DTYPE_STR.match(text):
        raise ValueError(f"{text!r} is not a dtype the dataset writer writes")
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise ValueError(f"{text!r} is not a numpy dtype") from None
    if dtype_str(dtype) != text:
        raise ValueError(f"{text!r} is not a dtype the dataset writer writes")
    return dtype
