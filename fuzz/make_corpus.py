"""Regenerates the fuzzers' committed inputs from files pyengine itself writes.

    python fuzz/make_corpus.py          # rewrites fuzz/fixtures/ and fuzz/corpus/ (runs torchrun once)
    python fuzz/make_corpus.py dataset  # only the dataset fixture and the dataset targets' seeds

fuzz/fixtures/ holds what the Python targets put their mutated manifest beside: a plain
checkpoint step (pe.Checkpointer), a rank-sharded step (two gloo ranks, FullyShard, so shared
tensors are split into pieces) and a dataset (pe.data.write_dataset). fuzz/corpus/<target>/
holds each target's seed inputs, in the framing its source file describes: for the C++
targets, what the manifest says about a file followed by the file; for the Python targets,
a manifest as written and its bare JSON body (which the target seals with a valid checksum).
The dataset targets get files of the current format and, so the reader of older files stays
fuzzed, the version-1 files of tests/fixtures/dataset_v1 (named v1-*).
Everything is small and seeded; only created_unix differs between two runs.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import pyengine as pe

HERE = Path(__file__).resolve().parent
DATASET_V1 = HERE.parent / "tests" / "fixtures" / "dataset_v1"
STEP = 1
# Framing flags of the dataset targets (see fuzz_shard_file.cpp, fuzz_mmap_dataset.cpp).
VERIFY_AT_OPEN, VERSION_2 = 2, 16


def trained_model(wrap=None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    if wrap is not None:
        model = wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    return model, opt


def write_plain_checkpoint(root: Path) -> Path:
    model, opt = trained_model()
    with pe.Checkpointer(root, max_shards=2, capture_rng=False) as ckpt:
        ckpt.save(STEP, {"model": model, "optimizer": opt, "extra": {"epoch": 3, "note": "fuzz seed"}}).wait()
    return root / f"step-{STEP:08d}"


def sharded_rank_main(root: Path) -> None:
    """One rank of the two that write the sharded step (run under torch.distributed.run)."""
    pe.distributed.init()
    model, opt = trained_model(wrap=pe.distributed.FullyShard().wrap)
    with pe.Checkpointer(root, max_shards=1, capture_rng=False) as ckpt:
        ckpt.save(STEP, {"model": model, "optimizer": opt, "extra": {"rank": pe.distributed.rank()}}).wait()
    pe.distributed.barrier()
    pe.distributed.destroy()


def write_sharded_checkpoint(root: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            __file__,
            "--sharded-rank",
            str(root),
        ],
        check=True,
        cwd=tempfile.gettempdir(),
    )
    return root / f"step-{STEP:08d}"


def write_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 6
    pe.data.write_dataset(
        root,
        {
            "x": rng.standard_normal((n, 2, 2)).astype(np.float32),
            "y": np.arange(n, dtype=np.int64),
            "tok": [np.arange(i % 4, dtype=np.int32) + i for i in range(n)],
            "empty": np.zeros((n, 0), dtype=np.uint8),  # samples of no bytes: a count no file size bounds
        },
        samples_per_shard=4,
        progress=False,
    )
    return root


def shard_reader_inputs(step: Path) -> dict[str, bytes]:
    """Per shard: a full read, a partial read with the shard's extents, and one without."""
    manifest = json.loads(step.joinpath("manifest.json").read_bytes().split(b'"manifest":', 1)[1][:-2])
    out = {}
    for index, shard in enumerate(manifest["shards"]):
        tensors = [t for t in manifest["tensors"].values() if t["shard"] == index]
        data = step.joinpath(shard["file"]).read_bytes()
        for label, roles in (
            ("full", [1] * len(tensors)),
            ("partial-extents", [3] + [2] * (len(tensors) - 1)),
            ("partial", [1] + [0] * (len(tensors) - 1)),
        ):
            head = struct.pack("<BQQIB", 0, shard["bytes"], shard["header_bytes"], shard["crc32c"], len(tensors))
            body = b"".join(
                struct.pack("<QQIB", t["offset"], t["nbytes"], t["crc32c"], r) for t, r in zip(tensors, roles)
            )
            out[f"{step.parent.name}-shard{index}-{label}"] = head + body + data
    return out


def dataset_expectations(root: Path) -> list[tuple[str, int, list[int], int, str, list[int]]]:
    """(field, kind flag, shard counts, sample bytes, dtype, header shape) as dataset.json promises them."""
    with warnings.catch_warnings():  # the version-1 fixture is unverified, and says so
        warnings.simplefilter("ignore", pe.data.UnverifiedDataWarning)
        ds = pe.data.Dataset(root)
    counts = json.loads(root.joinpath("dataset.json").read_text())["shard_counts"]
    return [
        (
            name,
            int(f.kind == "variable"),
            counts,
            f.sample_bytes,
            f.dtype.str,
            list(f.shape) if f.kind == "fixed" else [],
        )
        for name, f in ds.fields.items()
    ]


def shard_file_inputs(root: Path, version_flag: int, prefix: str = "") -> dict[str, bytes]:
    out = {}
    for name, kind, counts, sample_bytes, dtype, shape in dataset_expectations(root):
        for s, count in enumerate(counts):
            data = root.joinpath(f"{name}.{s:05d}.bin").read_bytes()
            flags = kind | VERIFY_AT_OPEN | version_flag
            head = struct.pack(f"<BQQ16sB{len(shape)}Q", flags, count, sample_bytes, dtype.encode(), len(shape), *shape)
            out[f"{prefix}{name}-{s}"] = head + data
    return out


def mmap_dataset_inputs(root: Path, version_flag: int, prefix: str = "") -> dict[str, bytes]:
    out = {}
    for name, kind, counts, sample_bytes, dtype, _ in dataset_expectations(root):
        flags = kind | VERIFY_AT_OPEN | version_flag
        head = struct.pack(f"<BB{len(counts)}QQ16s", len(counts) - 1, flags, *counts, sample_bytes, dtype.encode())
        files = [root.joinpath(f"{name}.{s:05d}.bin").read_bytes() for s in range(len(counts))]
        out[prefix + name] = head + b"".join(struct.pack("<I", len(f)) + f for f in files)
    return out


def write_dataset_corpora(work: Path) -> None:
    """The dataset fixture and the seeds of the three dataset targets."""
    dataset = write_dataset(work / "dataset")
    copy_fixture(dataset, HERE / "fixtures" / "dataset")
    write_corpus(
        "fuzz_shard_file",
        {**shard_file_inputs(dataset, VERSION_2), **shard_file_inputs(DATASET_V1, 0, prefix="v1-")},
    )
    write_corpus(
        "fuzz_mmap_dataset",
        {**mmap_dataset_inputs(dataset, VERSION_2), **mmap_dataset_inputs(DATASET_V1, 0, prefix="v1-")},
    )
    write_corpus("fuzz_dataset_json", {"dataset.json": dataset.joinpath("dataset.json").read_bytes()})


def manifest_inputs(step: Path) -> dict[str, bytes]:
    raw = step.joinpath("manifest.json").read_bytes()
    return {"sealed": raw, "body": raw.split(b'"manifest":', 1)[1][:-2]}


def write_corpus(target: str, inputs: dict[str, bytes]) -> None:
    folder = HERE / "corpus" / target
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, data in inputs.items():
        folder.joinpath(name).write_bytes(data)


def copy_fixture(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".pyengine-writer.lock"))


def main(only_dataset: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_dataset_corpora(work)
        if only_dataset:
            return
        plain = write_plain_checkpoint(work / "checkpoint")
        sharded = write_sharded_checkpoint(work / "sharded")
        fixtures = HERE / "fixtures"
        copy_fixture(plain, fixtures / "checkpoint" / plain.name)
        copy_fixture(sharded, fixtures / "sharded" / sharded.name)
        part = sorted(sharded.glob("rank-*/step-*"))[0]  # pieces of split tensors (the plain shards have none)
        reads = {**shard_reader_inputs(plain), **shard_reader_inputs(part)}
        write_corpus(
            "fuzz_shard_reader",
            {k: v for k, v in reads.items() if not k.endswith("0-partial") or k.startswith("checkpoint")},
        )
        write_corpus("fuzz_checkpoint_manifest", manifest_inputs(plain))
        write_corpus("fuzz_sharded_manifest", manifest_inputs(sharded))
    total = sum(
        f.stat().st_size
        for f in HERE.rglob("*")
        if f.is_file()
        and f.parent.name != "__pycache__"
        and (HERE / "corpus" in f.parents or HERE / "fixtures" in f.parents)
    )
    print(f"fuzz/corpus and fuzz/fixtures: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--sharded-rank":
        sharded_rank_main(Path(sys.argv[2]))
    else:
        main(only_dataset=sys.argv[1:] == ["dataset"])
