"""What the atheris targets (fuzz/fuzz_*.py) share.

Each target copies a committed fixture from fuzz/fixtures/ into a private tmpfs directory once,
then, per input, writes the input as the manifest beside the fixture's data files and reads the
result back through pyengine's public reader. The contract checked is the issue's: a clear
error (CheckpointError, DataError, ValueError) or exactly what the manifest claims. Any other
exception escapes to atheris, which saves the input as a crash.

    python fuzz/fuzz_checkpoint_manifest.py CORPUS_DIR [libFuzzer flags]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_ENVELOPE = b'{"manifest_crc32c":'


class ContractViolation(AssertionError):
    """The reader returned something the contract forbids (wrong data, an oversized buffer)."""


def require(ok: bool, what: str) -> None:
    if not ok:
        raise ContractViolation(what)


def private_copy(fixture: str) -> Path:
    """A copy of fuzz/fixtures/<fixture> in a new tmpfs directory, under $PE_FUZZ_TMPDIR when set.

    libFuzzer ends the process without running Python's exit handlers, so the directory is not
    removed here: .ci/fuzz points PE_FUZZ_TMPDIR at a scratch folder it removes.
    """
    base = os.environ.get("PE_FUZZ_TMPDIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    dst = Path(tempfile.mkdtemp(prefix="pe-fuzz-", dir=base)) / fixture
    shutil.copytree(FIXTURES / fixture, dst)
    return dst


def manifest_bytes(data: bytes) -> bytes:
    """The input as a manifest: used as is when it starts like an envelope, else taken as the
    JSON body and sealed with a valid checksum, so mutations reach the parser behind the CRC."""
    if data.startswith(_ENVELOPE):
        return data
    from pyengine import _core

    return b'{"manifest_crc32c":"%08x","manifest":' % _core.crc32c(memoryview(data)) + data + b"}\n"


def limit_allocations(budget_bytes: int) -> None:
    """Makes torch.empty refuse buffers larger than the data files the reader was given: a
    reader that allocates what an unchecked manifest field says, before checking it against
    the files, fails the contract instead of exhausting memory."""
    real_empty = torch.empty

    def empty(*size, **kwargs):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (list, tuple, torch.Size)) else size
        t = real_empty(0, dtype=kwargs.get("dtype"))
        numel = 1
        for d in shape:
            numel *= int(d)
        require(
            numel * t.element_size() <= budget_bytes,
            f"torch.empty({list(shape)}) asks for {numel * t.element_size()} bytes, more than the "
            f"{budget_bytes} bytes of data files: an allocation sized by an unchecked field",
        )
        return real_empty(*size, **kwargs)

    torch.empty = empty


def tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def instrument(prefixes: tuple[str, ...] = ("pyengine", "checkpoint_reading", "dataset_reading")) -> None:
    """Adds coverage instrumentation to every loaded function of these modules.

    atheris.instrument_imports() misses pyengine when it is an editable install (scikit-build-core
    loads it through its own loader), so the functions are patched after import instead; import
    every module the target reaches before calling this.
    """
    import gc

    import atheris

    for obj in gc.get_objects():
        # type(), not isinstance(): the latter asks some lazy objects for __class__, with side effects.
        if type(obj) is types.FunctionType and isinstance(obj.__module__, str) and obj.__module__.startswith(prefixes):
            atheris.instrument_func(obj)


def run(test_one_input: Callable[[bytes], None]) -> None:
    import atheris

    instrument()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
