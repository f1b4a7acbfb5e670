"""How the dataset target reads a dataset, and the contract it holds the result to: a clear
error (DataError, ValueError) or exactly the samples the fixture was written with, through
Dataset indexing and through one epoch of the Loader."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from harness import require

import pyengine as pe

ACCEPTED = (pe.DataError, ValueError)


def samples_of(ds: pe.data.Dataset) -> list[dict[str, np.ndarray]]:
    return [ds[i] for i in range(len(ds))]


def check_samples(ds: pe.data.Dataset, reference: list[dict[str, np.ndarray]]) -> None:
    require(len(ds) == len(reference), f"the dataset has {len(ds)} samples, the files hold {len(reference)}")
    for i, want in enumerate(reference):
        got = ds[i]
        require(set(got) == set(want), f"sample {i} has fields {sorted(got)}, the files hold {sorted(want)}")
        for name, value in got.items():
            expected = want[name]
            require(
                value.dtype == expected.dtype
                and value.shape == expected.shape
                and value.tobytes() == expected.tobytes(),
                f"sample {i} field {name!r} is not the saved one",
            )


def check_loader(ds: pe.data.Dataset, reference: list[dict[str, np.ndarray]]) -> None:
    batch_size = 4
    loader = pe.data.Loader(ds, batch_size=batch_size, shuffle=False, threads=1, prefetch=1)
    try:
        for b, batch in enumerate(loader):
            want = reference[b * batch_size : (b + 1) * batch_size]
            for name, info in ds.fields.items():
                if info.kind == "fixed":
                    expected = np.stack([w[name] for w in want])
                    got = batch[name].numpy()
                    require(
                        got.dtype == expected.dtype
                        and got.shape == expected.shape
                        and got.tobytes() == expected.tobytes(),
                        f"batch {b} field {name!r} is not the saved one",
                    )
                else:
                    flat = np.concatenate([w[name] for w in want])
                    require(batch[name].numpy().tobytes() == flat.tobytes(), f"batch {b} field {name!r} differs")
    finally:
        loader.close()


def read_dataset(path: Path, reference: list[dict[str, np.ndarray]]) -> None:
    try:
        ds = pe.data.Dataset(path)
        loaded = True
    except ACCEPTED:
        loaded = False
    if loaded:
        check_samples(ds, reference)
        with contextlib.suppress(*ACCEPTED):  # a dataset the loader refuses (a dtype torch cannot hold)
            check_loader(ds, reference)
