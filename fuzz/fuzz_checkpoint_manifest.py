"""atheris target: a mutated manifest.json of a plain (one-rank) checkpoint step, read back.

The corpus (fuzz/corpus/fuzz_checkpoint_manifest/) holds a manifest pe.Checkpointer wrote and
its bare JSON body; see harness.py for how an input becomes a manifest and for the contract.
"""

from __future__ import annotations

import checkpoint_reading
import harness

import pyengine as pe

STEP_PATH = harness.private_copy("checkpoint") / "step-00000001"
harness.limit_allocations(harness.tree_bytes(STEP_PATH))
CHECKPOINTER = pe.Checkpointer(STEP_PATH.parent)


def test_one_input(data: bytes) -> None:
    (STEP_PATH / "manifest.json").write_bytes(harness.manifest_bytes(data))
    checkpoint_reading.read_step(CHECKPOINTER, STEP_PATH)


if __name__ == "__main__":
    harness.run(test_one_input)
