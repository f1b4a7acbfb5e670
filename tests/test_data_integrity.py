"""What a damaged or shrinking dataset file does to a reader: a DataError (or, for a manifest
problem, ValueError), or exactly the data written; never other data, never a dead process.

The mutation test flips one byte at a time anywhere in the .bin files (header, payload, offset
table, block table, padding) and reads everything back through a Loader epoch and through
ds[i]. Before format version 2, 31 of 300 such mutations came back as silently different data.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pyengine as pe
from pyengine.data import UnverifiedDataWarning, write_dataset

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ACCEPTED = (pe.DataError, ValueError)


def _fields(n: int = 120) -> dict:
    rng = np.random.default_rng(3)
    return {
        "x": rng.standard_normal((n, 4, 4)).astype(np.float32),
        "y": np.arange(n, dtype=np.int64),
        "tok": [rng.integers(0, 1000, i % 9, dtype=np.int32) for i in range(n)],
        "raw": [bytes(rng.integers(0, 256, i % 5, dtype=np.uint8)) for i in range(n)],
    }


def _write(path: Path, **options) -> dict:
    f = _fields()
    # Small blocks: every file has several, so a mutation can spare part of a file.
    write_dataset(path, f, samples_per_shard=50, block_bytes=512, progress=False, **options)
    return f


def _expected(f: dict, i: int) -> dict:
    return {k: (np.frombuffer(v[i], np.uint8) if k == "raw" else v[i]) for k, v in f.items()}


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    want = np.asarray(want)
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def _read_by_index(path: Path, f: dict) -> tuple[int, int]:
    """(samples refused, samples that differ) over ds[i] for every i."""
    refused = differ = 0
    ds = pe.data.Dataset(path)
    for i in range(len(ds)):
        try:
            got = ds[i]
        except pe.DataError:
            refused += 1
            continue
        differ += not all(_same(got[k], v) for k, v in _expected(f, i).items())
    return refused, differ


def _read_by_loader(path: Path, f: dict) -> tuple[int, int]:
    """(1 if the epoch ended in DataError, batches that differ) over one sequential Loader epoch."""
    loader = pe.data.Loader(pe.data.Dataset(path), batch_size=16, shuffle=False, threads=1, prefetch=2)
    differ = 0
    try:
        for b, batch in enumerate(loader):
            rows = range(16 * b, min(16 * (b + 1), 120))
            ok = _same(batch["x"].numpy(), f["x"][rows.start : rows.stop]) and _same(
                batch["y"].numpy(), f["y"][rows.start : rows.stop]
            )
            ok &= _same(batch["tok"].numpy(), np.concatenate([f["tok"][i] for i in rows]))
            ok &= batch["raw"].numpy().tobytes() == b"".join(f["raw"][i] for i in rows)
            differ += not ok
    except pe.DataError:
        return 1, differ
    finally:
        loader.close()
    return 0, differ


def test_no_single_byte_mutation_of_the_files_returns_other_data(tmp_path):
    clean = tmp_path / "clean"
    f = _write(clean)
    files = sorted(p.name for p in clean.glob("*.bin"))
    sizes = np.array([os.path.getsize(clean / n) for n in files])
    rng = np.random.default_rng(15)
    outcomes = {"refused at open": 0, "refused on read": 0, "exact": 0}
    silent = []
    for m in range(300):
        at = int(rng.integers(0, sizes.sum()))
        k = int(np.searchsorted(np.cumsum(sizes), at, side="right"))
        offset = at - int(sizes[:k].sum())
        case = tmp_path / f"m{m}"
        shutil.copytree(clean, case)
        with open(case / files[k], "r+b") as fh:
            fh.seek(offset)
            byte = fh.read(1)[0]
            fh.seek(offset)
            fh.write(bytes([byte ^ int(rng.integers(1, 256))]))
        try:
            pe.data.Dataset(case)
        except ACCEPTED:
            outcomes["refused at open"] += 1
            shutil.rmtree(case)
            continue
        refused_i, differ_i = _read_by_index(case, f)
        refused_l, differ_l = _read_by_loader(case, f)
        if differ_i or differ_l:
            silent.append(f"{files[k]}@{offset}: {differ_i} samples, {differ_l} batches")
        outcomes["refused on read" if refused_i or refused_l else "exact"] += 1
        shutil.rmtree(case)
    assert not silent, f"{len(silent)}/300 mutations returned other data: {silent[:10]} ({outcomes})"
    assert outcomes["refused on read"] > 0 and outcomes["refused at open"] > 0, outcomes


def test_a_bad_block_names_the_file_and_its_dataset_samples_and_spares_the_rest(tmp_path):
    f = _write(tmp_path / "d")
    path = tmp_path / "d" / "x.00001.bin"  # samples 50-99; 64-byte samples, 8 to a 512-byte block
    with open(path, "r+b") as fh:
        fh.seek(4096 + 64 * 20 + 3)  # local sample 20: block 2 holds local samples 16-23
        fh.write(b"\x99")
    ds = pe.data.Dataset(tmp_path / "d")
    assert ds.verification == "blocks"
    with pytest.raises(pe.DataError, match=r"x\.00001\.bin has corrupt data.*samples 66 to 73") as err:
        ds[70]
    assert "Restore this file" in str(err.value)
    assert _same(ds[65]["x"], f["x"][65]) and _same(ds[74]["x"], f["x"][74])
    loader = pe.data.Loader(ds, batch_size=10, shuffle=False, threads=2)
    seen = []
    with pytest.raises(pe.DataError, match=r"samples 66 to 73"):
        for batch in loader:
            seen.append(batch["y"].numpy().copy())
    assert [int(b[0]) for b in seen] == [0, 10, 20, 30, 40, 50]  # the batches before it, in order


def test_verify_never_returns_damaged_bytes_and_open_refuses_them_at_open(tmp_path):
    f = _write(tmp_path / "d")
    with open(tmp_path / "d" / "y.00000.bin", "r+b") as fh:
        fh.seek(4096 + 8 * 7)
        fh.write(b"\x2a")
    never = pe.data.Dataset(tmp_path / "d", verify="never")
    assert never.verification == "never" and pe.data.Dataset(tmp_path / "d", verify=False).verify == "never"
    assert int(never[7]["y"]) == 42 != f["y"][7]  # the opt-out is real: no check at all
    batch = next(iter(pe.data.Loader(never, batch_size=8, shuffle=False, threads=1)))
    assert int(batch["y"][7]) == 42
    for verify in ("open", True):
        with pytest.raises(pe.DataError, match=r"y\.00000\.bin has corrupt data.*samples 0 to 49"):
            pe.data.Dataset(tmp_path / "d", verify=verify)
    with pytest.raises(ValueError, match="verify must be"):
        pe.data.Dataset(tmp_path / "d", verify="sometimes")


def _v1_expected() -> dict:
    spec = importlib.util.spec_from_file_location("make_dataset_v1", FIXTURES / "make_dataset_v1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.expected_samples()


def test_a_version_1_dataset_still_opens_and_reads_exactly_with_a_warning():
    f = _v1_expected()
    with pytest.warns(UnverifiedDataWarning, match=r"format-version-1.*verify=\"open\""):
        ds = pe.data.Dataset(FIXTURES / "dataset_v1")
    assert ds.verification == "unverified" and ds.version == 1 and ds.metadata == {}
    assert len(ds) == 10 and ds.num_shards == 2
    for i in range(10):
        got = ds[i]
        assert all(_same(got[k], v) for k, v in _expected(f, i).items()), i
    batch = next(iter(pe.data.Loader(ds, batch_size=10, shuffle=False, threads=1)))
    assert _same(batch["x"].numpy(), f["x"]) and _same(batch["tok"].numpy(), np.concatenate(f["tok"]))
    checked = pe.data.Dataset(FIXTURES / "dataset_v1", verify="open")  # no warning: checked at open
    assert checked.verification == "open"


def test_the_written_format_is_version_2_with_metadata(tmp_path):
    ds = write_dataset(tmp_path / "d", {"x": np.zeros(3)}, metadata={"classes": ["cat", "dog"], "n": 2})
    assert ds.version == 2 and ds.verification == "blocks"
    assert ds.metadata == {"classes": ["cat", "dog"], "n": 2}


# ------------------------------------------------------- files that shrink while being read

_CHILD = """
import faulthandler, os, sys
import numpy as np
{enable_before}
import pyengine as pe
{enable_after}
root = sys.argv[1]
fields = {{"x": np.zeros((20000, 256), np.uint8), "t": [b"ab" * (i % 7) for i in range(20000)]}}
ds = pe.data.write_dataset(root, fields, samples_per_shard=10000, progress=False)
victim = os.path.join(root, {victim!r})
"""

_LOADER_BODY = """
loader = pe.data.Loader(ds, batch_size=64, shuffle=True, threads=2, prefetch=4)
try:
    for b, batch in enumerate(loader):
        if b == 3:
            os.truncate(victim, 4096 + 8192)
    print("no error")
except pe.DataError as e:
    print("DataError:", e)
"""

_INDEX_BODY = """
ds[0]
os.truncate(victim, 4096 + 8192)
try:
    ds[19999]
    print("no error")
except pe.DataError as e:
    print("DataError:", e)
print("after:", ds[1]["x"].shape)  # an intact part still reads
"""


def _run_child(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "d")],
        cwd=tmp_path,  # outside the source tree, which would shadow the installed package
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("faulthandler_at", ["before import", "after import"])
@pytest.mark.parametrize("reader", ["loader", "index"])
@pytest.mark.parametrize("victim", ["x.00001.bin", "t.00001.bin"])
def test_a_file_truncated_while_read_is_a_data_error_not_a_sigbus(tmp_path, faulthandler_at, reader, victim):
    code = _CHILD.format(
        enable_before="faulthandler.enable()" if faulthandler_at == "before import" else "",
        enable_after="faulthandler.enable()" if faulthandler_at == "after import" else "",
        victim=victim,
    ) + (_LOADER_BODY if reader == "loader" else _INDEX_BODY)
    done = _run_child(tmp_path, textwrap.dedent(code))
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-3000:]}"
    assert f"DataError: dataset file {tmp_path / 'd' / victim} shrank while being read" in done.stdout, done.stdout


@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="under ASan (.ci/cpp_tests module) ASan's own SIGBUS handler is the one before ours and reports "
    "the fault, as it would without the guard; that run fails on any report",
)
def test_a_sigbus_outside_the_guard_still_reaches_faulthandler_and_kills(tmp_path):
    """The guard changes nothing for faults elsewhere: Python's own mmap past a truncated end."""
    code = textwrap.dedent(
        _CHILD.format(enable_before="", enable_after="faulthandler.enable()", victim="x.00000.bin")
        + """
import mmap
ds[0]  # the guard's handler is in place
with open(victim, "rb") as fh:
    m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
os.truncate(victim, 4096)
print(m[len(m) - 1])
"""
    )
    done = _run_child(tmp_path, code)
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stderr[-2000:])
    assert "Fatal Python error: Bus error" in done.stderr
