"""atheris target: a mutated manifest.json of a rank-sharded step (the top manifest), read back.

The corpus (fuzz/corpus/fuzz_sharded_manifest/) holds the top manifest two ranks wrote and
its bare JSON body; the parts stay as written; see harness.py for how an input becomes a manifest and for the contract.
"""

from __future__ import annotations

import checkpoint_reading
import harness

test_one_input = checkpoint_reading.manifest_target("sharded")

if __name__ == "__main__":
    harness.run(test_one_input)
