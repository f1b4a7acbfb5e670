"""Checkpoint-frequency trade-off study: overhead and expected waste against the checkpoint
interval, for torch.save, DCP async_save (dcp.async_save as documented; dcp.cached,
dcp.async-thread and dcp.async-process configured as torchtitan does, see
src/pyengine/benchmarks/dcp_baselines.py) and pyengine (blocking and overlapped snapshot), with
the Young/Daly optimum and OverheadBudget's choice marked; the log compares the training time
pe-overlap loses per save with each DCP method's.

A thin wrapper: the study is pyengine.benchmarks.frequency (shipped with the package), the
same as `pyengine bench checkpoint-frequency`; every option of that command works here.
Run it alone (the figures are ratios, but two benchmarks at once halve the cores):

    flock /tmp/pyengine-bench.lock python bench/bench_frequency.py [--quick] [--models 3M 25M 50M]
        [--methods none pe pe-overlap dcp.async_save dcp.cached dcp.async-thread dcp.async-process]
        [--intervals 1 5 10] [--repeats 3] [--mtbf 120] [--out DIR]
"""

from __future__ import annotations

import sys

from pyengine.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "checkpoint-frequency", *sys.argv[1:]]))
