"""The self-checking envelope around every manifest pyengine writes (a part's and a sharded
step's): `{"manifest_crc32c":"<8 hex>","manifest":<JSON>}` and a newline, the CRC32C taken
over the JSON bytes, so one flipped byte anywhere in the document is found before it is parsed.
The C++ writer emits the same envelope (csrc/core/checkpoint/async_writer.cpp, build_manifest).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pyengine import _core
from pyengine.errors import CheckpointError

_PREFIX = re.compile(rb'^\{"manifest_crc32c":"([0-9a-f]{8})","manifest":')
_SUFFIX = b"}\n"


def seal(doc: Any) -> bytes:
    """The envelope's bytes for a JSON-serialisable document (no NaN or inf)."""
    body = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    return b'{"manifest_crc32c":"%08x","manifest":' % _core.crc32c(memoryview(body)) + body + _SUFFIX


def is_sealed(raw: bytes) -> bool:
    """Whether `raw` starts like an envelope (it may still fail its checksum)."""
    return _PREFIX.match(raw) is not None


def unseal(raw: bytes, path: Path) -> dict:
    """The document inside an envelope read from `path`, checksum verified.

    Raises:
        CheckpointError: garbage, truncated, a checksum mismatch, or not a JSON object.
    """
    match = _PREFIX.match(raw)
    if match is None or not raw.endswith(_SUFFIX):
        raise CheckpointError(f"{path} is not a pyengine manifest (garbage or truncated)")
    body = raw[match.end():-len(_SUFFIX)]
    if _core.crc32c(memoryview(body)) != int(match.group(1), 16):
        raise CheckpointError(f"{path} fails its checksum: the manifest is corrupt")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:  # json's decoder recurses per level; no writer of ours nests this deep
        raise CheckpointError(f"{path} is nested too deeply to be a pyengine manifest") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} holds no manifest object")
    return doc
