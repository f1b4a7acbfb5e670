"""The process tests/test_checkpoint_crash.py SIGKILLs: it restores what it can from a local
directory and saves forever.

    save_loop(conn, directory)   (a child of tests/fork_server.py, so that each of the 24
        processes the test starts is forked with torch already imported) runs
        fork_server.save_forever on a Checkpointer over `directory`.

make_state(step) is a pure function of the step, so the parent can check any checkpoint it finds.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from fork_server import save_forever  # tests/ is on sys.path, in pytest and in its forked children

import pyengine as pe

KEEP_LAST = 2


def make_state(step: int) -> dict:
    """About 7 MB over three shards. The float values stay exact (below 2**23)."""
    return {
        "weights": torch.arange(1 << 20, dtype=torch.float32) * 0.5 + step,
        "moments": torch.arange(1 << 18, dtype=torch.float64) - 3 * step,
        "ids": np.arange(1 << 17, dtype=np.int64) * (step + 7),
        "meta": {"step": step, "tag": f"step-{step}", "history": list(range(step % 50))},
    }


def empty_state() -> dict:
    return {
        "weights": torch.zeros(1 << 20, dtype=torch.float32),
        "moments": torch.zeros(1 << 18, dtype=torch.float64),
        "ids": np.zeros(1 << 17, dtype=np.int64),
        "meta": {},
    }


def save_loop(conn: Any, directory: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    save_forever(conn, pe.Checkpointer(directory, keep_last=KEEP_LAST, max_shards=3), empty_state, make_state)
