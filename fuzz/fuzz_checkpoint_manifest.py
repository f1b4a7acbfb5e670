"""atheris target: a mutated manifest.json of a plain (one-rank) checkpoint step, read back.

The corpus (fuzz/corpus/fuzz_checkpoint_manifest/) holds a manifest pe.Checkpointer wrote and
its bare JSON body; see harness.py for how an input becomes a manifest and for the contract.
"""

from __future__ import annotations

import checkpoint_reading
import harness

test_one_input = checkpoint_reading.manifest_target("checkpoint")

if __name__ == "__main__":
    harness.run(test_one_input)
