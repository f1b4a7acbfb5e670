"""The SIGKILL-and-resume runs the integration tests share (Lightning, Accelerate).

A worker script trains on `data` into `--dir`, prints "resumed from step N" once it has
restored (0 on a fresh start) and "step ..." after each step; `--pause` slows its steps so a
kill can land anywhere in one. It reads that command line with worker_arguments().
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import pyengine as pe


def write_regression_data(path: Path) -> Path:
    """128 samples of a noisy linear map, 8 features to 1 target."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 8)).astype(np.float32)
    y = (x @ rng.standard_normal((8, 1)) + 0.1 * rng.standard_normal((128, 1))).astype(np.float32)
    pe.data.write_dataset(path, {"x": x, "y": y})
    return path


def worker_arguments() -> argparse.ArgumentParser:
    """A worker's command line, as _command() gives it (`--every`: steps between checkpoints)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.0)
    return parser


def _command(worker: Path, run_dir: Path, data: Path, pause: float = 0.0) -> list[str]:
    return [sys.executable, str(worker), "--data", str(data), "--dir", str(run_dir), "--pause", str(pause)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def killed_and_uninterrupted(worker: Path, data: Path, base: Path, *, kills: int, seed: str,
                             steps_before_kill: tuple[int, int], timeout: float) -> SimpleNamespace:
    """An uninterrupted run (beside the others: each start imports the framework, which takes
    seconds), and one SIGKILLed `kills` times and restarted until it finishes.

    Returns: reference and killed run directories, and the step each start resumed from.
    """
    with open(base / "stderr.log", "w") as log:  # a file, not a pipe: warnings must never block a child
        reference = subprocess.Popen(_command(worker, base / "reference", data), env=_env(),
                                     stdout=subprocess.DEVNULL, stderr=log, cwd=base)
        killed = base / "killed"
        rng = random.Random(seed)
        resumed_from = []
        for _ in range(kills):
            child = subprocess.Popen(_command(worker, killed, data, pause=0.03), env=_env(), stdout=subprocess.PIPE,
                                     stderr=log, text=True, cwd=base)
            line = ""
            while not line.startswith("resumed from step"):
                line = child.stdout.readline()
                assert line, f"the run ended before training started; see {base / 'stderr.log'}"
            resumed_from.append(int(line.split()[-1]))
            # A random number of steps, then a random part of the next one: the kill may land in a
            # step, in a snapshot or while a save persists.
            for _ in range(rng.randint(*steps_before_kill)):
                assert child.stdout.readline().startswith("step ")
            time.sleep(rng.uniform(0.0, 0.03))
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            child.stdout.close()
            assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        final = subprocess.run(_command(worker, killed, data), env=_env(), capture_output=True, text=True,
                               timeout=timeout, cwd=base)
        assert final.returncode == 0, final.stderr[-4000:]
        resumed_from.append(int(final.stdout.split("resumed from step")[1].split()[0]))
        assert reference.wait(timeout=timeout) == 0, f"the uninterrupted run failed; see {base / 'stderr.log'}"
    return SimpleNamespace(reference=base / "reference", killed=killed, resumed_from=resumed_from)


def assert_identical(got, want, where: str = "state") -> None:
    """Equal structure, and tensors equal bit for bit with the same dtype."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            assert_identical(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_identical(g, w, f"{where}[{i}]")
    else:
        assert got == want, where
