"""Regression tests for the bugs fuzzing found (fuzz/, .ci/fuzz), and for those found while
writing its contracts: a damaged or hostile file gives CheckpointError / DataError, never
another exception, a crash, an allocation sized by an unchecked field, or other data.

Inputs that crashed a C++ target are committed under fuzz/regressions/<target>/ and replayed
here through the Python API, in a child process: a regression there is a segfault, which
must fail one test rather than end the run. The Python bugs are rebuilt here as the smallest
manifest edit that showed each, on the fixtures in fuzz/fixtures/.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import pyengine as pe
from pyengine import _core
from pyengine.checkpoint.envelope import seal, unseal
from pyengine.checkpoint.inspection import inspect_directory

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
STEP = 1


def _regressions(target: str) -> list[Path]:
    folder = FUZZ / "regressions" / target
    return sorted(folder.iterdir()) if folder.is_dir() else []


# ------------------------------------------------- C++ crash inputs, replayed through Python


def _with_header_crc(file: bytes) -> bytes:
    body = file[:508]
    return body + struct.pack("<I", _core.crc32c(memoryview(body))) + file[512:]


def _dataset_dir(
    root: Path, kind: int, dtype: str, shape: list[int], files: list[bytes], counts: list[int], version: int
) -> Path:
    """A dataset of one field "f" over `files`, with a dataset.json promising the rest."""
    root.mkdir()
    for s, data in enumerate(files):
        (root / f"f.{s:05d}.bin").write_bytes(data)
    fields = {"f": {"kind": "variable" if kind else "fixed", "dtype": dtype, "shape": [-1] if kind else shape}}
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "format": "pyengine.data",
                "version": version,
                "num_samples": sum(counts),
                "shard_counts": counts,
                "fields": fields,
            }
        )
    )
    return root


def _version(flags: int) -> int:
    """The format version a C++ dataset target's input says dataset.json promises (flag bit 4)."""
    return 2 if flags & 16 else 1


def _shard_file_case(raw: bytes, root: Path) -> Path:
    """A fuzz_shard_file input (framed as fuzz/fuzz_shard_file.cpp says) as a dataset."""
    flags, count, sample_bytes, dtype, rank = struct.unpack_from("<BQQ16sB", raw)
    at = struct.calcsize("<BQQ16sB")
    shape = list(struct.unpack_from(f"<{rank}Q", raw, at)) if rank <= 8 else []
    file = raw[at + 8 * rank if rank <= 8 else at :]
    if flags & 4:
        file = _with_header_crc(file)
    return _dataset_dir(root, flags & 1, dtype.rstrip(b"\0").decode(), shape, [file], [count], _version(flags))


def _mmap_dataset_case(raw: bytes, root: Path) -> tuple[Path, list[int]]:
    """A fuzz_mmap_dataset input (framed as fuzz/fuzz_mmap_dataset.cpp says) as a dataset."""
    shards, flags = 1 + raw[0] % 4, raw[1]
    counts = list(struct.unpack_from(f"<{shards}Q", raw, 2))
    at = 2 + 8 * shards
    sample_bytes, dtype = struct.unpack_from("<Q16s", raw, at)
    at += 24
    files = []
    for _ in range(shards):
        (n,) = struct.unpack_from("<I", raw, at)
        files.append(_with_header_crc(raw[at + 4 : at + 4 + n]) if flags & 8 else raw[at + 4 : at + 4 + n])
        at += 4 + n
    shape = list(struct.unpack_from("<Q", files[0], 64)[:1]) if files[0][44:48] == b"\1\0\0\0" else []
    root = _dataset_dir(root, flags & 1, dtype.rstrip(b"\0").decode(), shape, files, counts, _version(flags))
    return root, counts


def _in_child(code: str, tmp_path: Path) -> str:
    """Runs `code` in a fresh interpreter (outside the source tree) and returns what it printed."""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout.strip()


_OPEN = """
import pyengine as pe
try:
    pe.data.Dataset({path!r}, verify=True)
    print("opened")
except pe.DataError as e:
    print("DataError", e)
"""


@pytest.mark.parametrize("case", _regressions("fuzz_shard_file"), ids=lambda p: p.name)
def test_dataset_file_that_crashed_the_shard_file_target_is_a_data_error(case: Path, tmp_path: Path) -> None:
    # variable-payload-size-wraps: a payload size near 2^64 wrapped align8(4096 + P) past zero,
    # the size check passed on a 4096-byte file and the offset table was read before the
    # mapping: a segfault on open.
    root = _shard_file_case(case.read_bytes(), tmp_path / "ds")
    assert _in_child(_OPEN.format(path=str(root)), tmp_path).startswith("DataError")


@pytest.mark.parametrize("case", _regressions("fuzz_mmap_dataset"), ids=lambda p: p.name)
def test_dataset_that_crashed_the_mmap_dataset_target_is_a_data_error(case: Path, tmp_path: Path) -> None:
    # shard-counts-overflow: shards of empty samples whose counts sum past 2^64 gave a dataset
    # of (sum mod 2^64) samples. dataset.json is refused in Python; the core refuses it too.
    root, counts = _mmap_dataset_case(case.read_bytes(), tmp_path / "ds")
    assert _in_child(_OPEN.format(path=str(root)), tmp_path).startswith("DataError")
    manifest = json.loads((root / "dataset.json").read_text())
    ds = manifest["fields"]["f"]
    spec = (("f", int(ds["kind"] == "variable"), 0, ds["dtype"], [str(p) for p in sorted(root.glob("f.*.bin"))]),)
    code = f"""
from pyengine import _core
import pyengine as pe
try:
    _core.MmapDataset({list(spec)!r}, {counts!r}, verify=2, version={manifest["version"]})
    print("opened")
except pe.DataError as e:
    print("DataError", e)
"""
    assert _in_child(code, tmp_path).startswith("DataError")


# ------------------------------------------------------------- checkpoint manifests (Python)


def _step(tmp_path: Path, fixture: str) -> Path:
    shutil.copytree(FUZZ / "fixtures" / fixture, tmp_path / fixture)
    return tmp_path / fixture / f"step-{STEP:08d}"


# Stands for JSON nested deeper than json.dumps can write, spliced into the text.
DEEP = "<nested 5000 deep>"


def _reseal(step: Path, edit: Callable[[dict], Any]) -> None:
    """Edits the manifest's document and seals it again, so the edit passes the checksum."""
    path = step / "manifest.json"
    doc = unseal(path.read_bytes(), path)
    edit(doc)
    sealed = seal(doc)
    if DEEP in sealed.decode():
        body = sealed.split(b'"manifest":', 1)[1][:-2].replace(json.dumps(DEEP).encode(), b"[" * 5000 + b"]" * 5000)
        sealed = b'{"manifest_crc32c":"%08x","manifest":' % _core.crc32c(memoryview(body)) + body + b"}\n"
    path.write_bytes(sealed)


def _assert_refused(step: Path, inspect_finds: bool = True) -> None:
    with pe.Checkpointer(step.parent) as ckpt, pytest.raises(pe.CheckpointError):
        ckpt.load(STEP)
    (info,) = inspect_directory(step.parent)  # reports the damage, raises nothing
    # inspect verifies each file; that a part's tensor differs from the top manifest's entry
    # is found only when the pieces are read.
    assert bool(info.error) == inspect_finds


def _set(doc: dict, path: list, value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def _deep(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


# (what changed, the exception it raised before)
PLAIN_EDITS = {
    "crc32c-past-32-bits": (["tensors", "model/0.bias", "crc32c"], 1 << 33),  # TypeError (atheris)
    "shard-crc32c-past-32-bits": (["shards", 0, "crc32c"], 1 << 33),  # TypeError (atheris)
    "shard-bytes-past-64-bits": (["shards", 0, "bytes"], 1 << 64),  # TypeError in verify_file (atheris)
    "tensor-table-is-a-list": (["tensors"], []),  # AttributeError
    "created-unix-overflows-float": (["created_unix"], 10**400),  # OverflowError
    "state-nested-past-the-json-limit": (["state", "objects", "extra"], DEEP),  # RecursionError
    "state-nested-past-decode": (["state", "objects", "extra"], _deep(400)),  # RecursionError in decode
    "float-marker-holds-a-list": (["state", "objects", "extra"], {"__float__": [1]}),  # TypeError (atheris)
    "tensor-marker-names-a-list": (["state", "objects", "extra"], {"__tensor__": [1]}),  # TypeError
    "dict-key-is-a-dict": (["state", "objects", "extra"], {"__dict__": [[{"a": 1}, 2]]}),  # TypeError
    "numpy-marker-of-object-dtype": (["state", "objects", "extra"], {"__numpy__": ["O", 1]}),  # other data
    "torch-dtype-marker-names-a-function": (["state", "objects", "extra"], {"__torch_dtype__": "save"}),
}


@pytest.mark.parametrize("edit", sorted(PLAIN_EDITS), ids=str)
def test_malformed_checkpoint_manifest_is_a_checkpoint_error(edit: str, tmp_path: Path) -> None:
    step = _step(tmp_path, "checkpoint")
    path, value = PLAIN_EDITS[edit]
    _reseal(step, lambda doc: _set(doc, path, value))
    _assert_refused(step)


def _refuse_large_allocations(monkeypatch: pytest.MonkeyPatch, limit: int = 1 << 20) -> None:
    real = torch.empty

    def empty(*size: Any, **kwargs: Any) -> torch.Tensor:
        t = real(*size, **kwargs, device="meta")
        assert t.numel() * t.element_size() <= limit, f"allocated {list(t.shape)} from an unchecked field"
        return real(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)


def test_manifest_claiming_a_huge_shard_is_refused_before_allocating(tmp_path: Path, monkeypatch) -> None:
    # The destination tensors were allocated from the manifest's shapes before the core
    # compared the manifest's shard size with the file's: 1 TiB for a 4 KiB file.
    step = _step(tmp_path, "checkpoint")

    def claim_huge(doc: dict) -> None:
        doc["shards"][1]["bytes"] = (1 << 40) + 8192
        doc["tensors"]["model/0.bias"].update(shape=[1 << 38], nbytes=1 << 40)

    _reseal(step, claim_huge)
    _refuse_large_allocations(monkeypatch)
    _assert_refused(step)


def _shared(name: str) -> Callable[[dict], dict]:
    return lambda doc: doc["tensors"][name]


SHARDED_EDITS: dict[str, Callable[[dict], None]] = {
    # KeyError / TypeError / AttributeError from the top manifest's checks (atheris)
    "piece-without-dim": lambda d: _shared("model/0.bias")(d)["pieces"][0].pop("dim"),
    "piece-without-length": lambda d: _shared("model/0.bias")(d)["pieces"][0].pop("length"),
    "piece-offset-is-a-string": lambda d: _shared("model/0.bias")(d)["pieces"][0].update(offset="0"),
    "entry-without-shape": lambda d: _shared("model/0.bias")(d).pop("shape"),
    "entry-without-pieces": lambda d: _shared("model/0.bias")(d).pop("pieces"),
    "entry-dtype-is-a-list": lambda d: _shared("model/0.bias")(d).update(dtype=["F32"]),
    "entry-is-a-string": lambda d: d["tensors"].update({"model/0.bias": "F32"}),
    "no-tensor-table": lambda d: d.pop("tensors"),
    "no-objects": lambda d: d.pop("objects"),
    "objects-float-marker-holds-a-list": lambda d: d["objects"].update(extra={"__float__": [1]}),
    # other data: the pieces were cast to the entry's dtype (atheris, the contract's check)
    "entry-dtype-differs-from-the-parts": lambda d: _shared("model/0.bias")(d).update(dtype="F64"),
    # other data: a scalar with no pieces came back as uninitialised memory
    "scalar-without-pieces": lambda d: _shared("optimizer/state/0/step")(d).update(pieces=[]),
}


@pytest.mark.parametrize("edit", sorted(SHARDED_EDITS), ids=str)
def test_malformed_sharded_manifest_is_a_checkpoint_error(edit: str, tmp_path: Path) -> None:
    step = _step(tmp_path, "sharded")
    _reseal(step, SHARDED_EDITS[edit])
    _assert_refused(step, inspect_finds=edit != "entry-dtype-differs-from-the-parts")


def test_shared_tensor_larger_than_its_pieces_is_refused_before_allocating(tmp_path: Path, monkeypatch) -> None:
    # Only the split dimension was checked against the pieces; the others sized the whole
    # tensor, allocated before any piece's shape was compared with it.
    step = _step(tmp_path, "sharded")
    _reseal(step, lambda d: _shared("model/0.weight")(d).update(shape=[6, 1 << 40]))
    _refuse_large_allocations(monkeypatch)
    _assert_refused(step, inspect_finds=False)


# ------------------------------------------------------------------- dataset.json (Python)


def _fields(edit: Callable[[dict], Any]) -> Callable[[dict], Any]:
    return lambda m: edit(m["fields"])


DATASET_EDITS: dict[str, Callable[[dict], Any]] = {
    # all found by atheris; before, each raised what follows its name
    "field-without-shape": _fields(lambda f: f["x"].pop("shape")),  # KeyError
    "dtype-numpy-parses-as-code": _fields(lambda f: f["x"].update(dtype="(1,f4")),  # SyntaxError
    "shard-count-past-64-bits": lambda m: m.update(shard_counts=[1 << 64, 2], num_samples=(1 << 64) + 2),  # pybind
    "shape-holds-an-object": _fields(lambda f: f["x"].update(shape=[{"a": 1}])),  # TypeError
    "shape-past-64-bits": _fields(lambda f: f["x"].update(shape=[1 << 70])),  # OverflowError
    "fields-is-a-string": lambda m: m.update(fields="x"),  # AttributeError
    # other data: samples and fields silently missing (atheris, once the shape was checked)
    "shard-dropped-from-the-list": lambda m: m.update(shard_counts=[4], num_samples=4),
    "field-dropped-from-the-list": _fields(lambda f: f.pop("x")),
    # other data: samples came back in the manifest's shape, not the one written
    "scalar-field-read-as-a-vector": _fields(lambda f: f["y"].update(shape=[1])),
    "matrix-field-read-as-a-vector": _fields(lambda f: f["x"].update(shape=[4])),
}


@pytest.mark.parametrize("edit", sorted(DATASET_EDITS), ids=str)
def test_malformed_dataset_json_is_a_data_error(edit: str, tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    shutil.copytree(FUZZ / "fixtures" / "dataset", root)
    manifest = json.loads((root / "dataset.json").read_text())
    DATASET_EDITS[edit](manifest)
    (root / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(pe.DataError):
        pe.data.Dataset(root)


def test_the_fixtures_themselves_load(tmp_path: Path) -> None:
    """The edits above are refused because of the edit, not because the fixtures are stale."""
    for fixture in ("checkpoint", "sharded"):
        with pe.Checkpointer(_step(tmp_path, fixture).parent) as ckpt:
            assert set(ckpt.load(STEP)) >= {"model", "optimizer"}
    ds = pe.data.Dataset(FUZZ / "fixtures" / "dataset", verify=True)
    assert len(ds) == 6 and ds[5]["x"].shape == (2, 2) and ds[5]["y"].shape == ()
