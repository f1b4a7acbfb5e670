"""Demo section: a training process is SIGKILLed at random moments and resumed; its final
weights are compared with those of a run that was never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import pyengine as pe
from pyengine.demo import synthetic
from pyengine.demo.section import Section

KILLS = 3  # 2 with --quick


def _command(run_dir: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "pyengine.demo.resume_worker", "--dir", str(run_dir), "--data", str(data)]


def _env() -> dict[str, str]:
    # Both runs use the same number of threads, so they do the same arithmetic.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _final(run_dir: Path) -> tuple[int, dict]:
    with pe.Checkpointer(run_dir) as ckpt:
        return ckpt.latest_step(), ckpt.load()["model"]


def _kill_and_resume(run_dir: Path, data: Path, kills: int, rng: random.Random, cwd: Path) -> list[int]:
    """SIGKILLs the training process `kills` times at random moments, then lets a last one
    finish; returns the step each run resumed from."""
    resumes = []
    for _ in range(kills):
        # Run from the work folder: a pyengine/ source folder in the caller's directory must not
        # shadow the installed package in the child.
        child = subprocess.Popen(_command(run_dir, data), env=_env(), stdout=subprocess.PIPE, text=True, cwd=cwd)
        line = child.stdout.readline()
        while line and not line.startswith("resumed from step"):
            line = child.stdout.readline()
        if not line:
            raise RuntimeError("the training process ended before it started training")
        resumes.append(int(line.split()[-1]))
        # Killed a random number of virtual epochs in, at a random moment of the next one.
        for _ in range(rng.randrange(1, 4)):
            child.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    final = subprocess.run(_command(run_dir, data), env=_env(), capture_output=True, text=True, cwd=cwd)
    if final.returncode != 0:
        raise RuntimeError(f"the resumed training process failed:\n{final.stderr}")
    resumes.append(int(final.stdout.split("resumed from step")[1].split()[0]))
    return resumes


def run(workdir: Path, quick: bool) -> Section:
    section = Section("Crash and exact resume")
    workdir = workdir.resolve()  # the training processes run with workdir as their current directory
    data = workdir / "data"
    synthetic.write(data, *synthetic.teacher_task(4096, seed=3))
    kills = 2 if quick else KILLS
    # The uninterrupted run goes beside the killed ones: most of each start is an import of
    # torch, so on a 2-core machine the section takes about the time of the kill loop alone.
    log = workdir / "uninterrupted.log"
    with open(log, "w") as errors:
        uninterrupted = subprocess.Popen(_command(workdir / "uninterrupted", data), env=_env(), cwd=workdir,
                                         stdout=subprocess.DEVNULL, stderr=errors)
        try:
            resumes = _kill_and_resume(workdir / "killed", data, kills, random.Random(0), workdir)
        except BaseException:
            uninterrupted.kill()
            raise
        finally:
            uninterrupted.wait()
    if uninterrupted.returncode != 0:
        raise RuntimeError(f"the uninterrupted training process failed:\n{log.read_text()}")
    step_a, weights_a = _final(workdir / "uninterrupted")
    step_b, weights_b = _final(workdir / "killed")
    identical = step_a == step_b and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    section.say(
        f"a training process was SIGKILLed {kills} times at random moments; the restarts resumed from steps "
        f"{resumes[1:]} of {step_b}"
    )
    section.say(f"final weights after {step_b} steps equal, bit for bit, those of a run never interrupted: {identical}")
    section.ok = identical and 0 < resumes[-1] < step_b
    return section
