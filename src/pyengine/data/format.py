"""The on-disk dataset format, shared by the writer and the reader.

A dataset is a directory::

    DIR/dataset.json          the manifest, written last: fields, dtypes, shapes, shard sizes
    DIR/<field>.<shard>.bin   one file per field and shard (5-digit shard number)

Each ``.bin`` file describes itself (checked against the real file size on open by
``csrc/core/data/shard_file.cpp``)::

    [0, 4096)                 header: magic, version, kind, count, sizes, dtype, shape, block
                              size, CRC32Cs (of the payload, the block table, the offset table)
    [4096, 4096 + P)          payload: samples back to back
    variable fields only:     at align8(4096 + P), count + 1 little-endian uint64 offsets
    then, at align8:          the block table: a little-endian uint32 CRC32C per block_bytes
                              of payload (the last block may be short)

Version 2 added the block table and the offset table's CRC: the reader checks each block the
first time it is read, so a damaged byte is an error rather than data. Version 1 files (one
CRC32C over the whole payload, checked only by ``Dataset(path, verify="open")``) still open.

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
FORMAT_VERSION = 2  # what the writer writes
READABLE_VERSIONS = (1, 2)
HEADER_BYTES = 4096
MAGIC = b"PEDATA01"
FIXED, VARIABLE = 0, 1
MAX_DIMS = 8
HEADER_CRC_OFFSET = 508
# Payload bytes per checksummed block. 64 KiB is what one page fault of a memory-mapped file
# already reads around a random sample (the kernel's fault-around and mmap read-around), so
# checking a whole block on first touch adds CPU (~4 us of CRC32C) but no I/O; it keeps the
# table at 4 bytes per 64 KiB (0.006%) and a checked read at one atomic load per block. Smaller
# blocks would shrink what a random first read must hash, larger ones the table; neither
# matters at this size. The header records it, so a reader accepts any MIN..MAX power of two.
BLOCK_BYTES = 64 << 10
MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = 512, 1 << 30

# magic, version, kind, count, sample_bytes, payload_bytes, payload_crc32c, ndim, dtype, shape[8],
# then version 2's: block_bytes, block_table_crc32c, offsets_crc32c (0 for fixed fields)
_HEADER = struct.Struct("<8sIIQQQII16s8QQII")
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
    block_bytes: int,
    block_table_crc: int,
    offsets_crc: int,
) -> bytes:
    """The 4096-byte (version 2) header of one field-shard file, ending with its own CRC32C."""
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
        block_bytes,
        block_table_crc,
        offsets_crc,
    )
    body = head + bytes(HEADER_CRC_OFFSET - len(head))
    crc = _core.crc32c(np.frombuffer(body, dtype=np.uint8))
    return body + struct.pack("<I", crc) + bytes(HEADER_BYTES - HEADER_CRC_OFFSET - 4)


def check_block_bytes(block_bytes: int) -> None:
    if not (isinstance(block_bytes, int) and MIN_BLOCK_BYTES <= block_bytes <= MAX_BLOCK_BYTES) or (
        block_bytes & (block_bytes - 1)
    ):
        raise ValueError(
            f"block_bytes must be a power of two from {MIN_BLOCK_BYTES} to {MAX_BLOCK_BYTES}, got {block_bytes}"
        )


def align8_padding(nbytes: int) -> bytes:
    """Zero bytes that bring a file of `nbytes` to a multiple of 8."""
    return bytes(-nbytes % 8)


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
