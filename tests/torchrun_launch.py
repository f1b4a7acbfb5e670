"""Launches a test scenario script on N gloo ranks with torchrun (shared by the distributed tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A variable inherited from an outer torchrun job would make the launched ranks join it.
_JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun(script: Path, nproc: int, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _JOB_VARIABLES}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return done
