"""How the checkpoint targets read a step, and the contract they hold the result to.

Three readers see every mutated manifest: Checkpointer.load (what users call), the step reader
beneath it (whose tensors are checked against the manifest's claims) and inspect_directory
(`pyengine inspect`, which must report damage, never raise it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import harness
import torch
from harness import require

import pyengine as pe
from pyengine import _core
from pyengine.checkpoint.dtypes import CODE_TO_TORCH
from pyengine.checkpoint.inspection import inspect_directory
from pyengine.checkpoint.manifest import read_manifest
from pyengine.checkpoint.sharded import read_sharded_manifest
from pyengine.checkpoint.state_codec import tensor_names
from pyengine.checkpoint.step_reader import open_step

ACCEPTED = (pe.CheckpointError, ValueError)
STEP = 1


def manifest_target(fixture: str) -> Any:
    """The test function of a target that mutates the manifest of step 1 of a private copy of
    `fixture` (a committed checkpoint directory) and reads the step back; allocations are
    bounded by the step's size on disk."""
    step_path = harness.private_copy(fixture) / f"step-{STEP:08d}"
    harness.limit_allocations(harness.tree_bytes(step_path))
    checkpointer = pe.Checkpointer(step_path.parent)

    def test_one_input(data: bytes) -> None:
        (step_path / "manifest.json").write_bytes(harness.manifest_bytes(data))
        read_step(checkpointer, step_path)

    return test_one_input


def crc_of(t: torch.Tensor) -> int:
    return _core.crc32c(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def check_claims(step_path: Path, name: str, t: torch.Tensor) -> None:
    """The tensor read for `name` is what the manifests say: dtype, shape and every byte."""
    doc = read_sharded_manifest(step_path)
    shared = doc["tensors"].get(name) if doc else None
    if shared is None:
        part = read_manifest(step_path / doc["parts"][0]) if doc else read_manifest(step_path)
        info = part.tensors[name]
        require(
            tuple(t.shape) == info.shape and t.dtype == CODE_TO_TORCH[info.dtype] and crc_of(t) == info.crc32c,
            f"tensor {name!r} is not the saved one",
        )
        return
    require(
        list(t.shape) == shared["shape"] and t.dtype == CODE_TO_TORCH[shared["dtype"]],
        f"shared tensor {name!r} is {t.dtype} {list(t.shape)}, not what the manifest says",
    )
    for p in shared["pieces"]:
        piece = t if p["dim"] is None else t.narrow(p["dim"], p["offset"], p["length"])
        info = read_manifest(step_path / doc["parts"][p["part"]]).tensors[name]
        require(crc_of(piece) == info.crc32c, f"a piece of {name!r} is not the bytes part {p['part']} holds")


def read_step(checkpointer: pe.Checkpointer, step_path: Path) -> None:
    """Reads the step three ways; raises only what the contract accepts."""
    for info in inspect_directory(step_path.parent):  # reports damage as info.error, raises nothing
        require(isinstance(info.error, (str, type(None))), "inspect returned a malformed report")
    with contextlib.suppress(*ACCEPTED):
        checkpointer.load(STEP)
    try:
        opened = open_step(step_path, 0, 1)
        names = tensor_names([opened.objects, opened.rng])
        tensors: dict[str, Any] = opened.read(names)
    except ACCEPTED:
        return
    for name in names:
        check_claims(step_path, name, tensors[name])
