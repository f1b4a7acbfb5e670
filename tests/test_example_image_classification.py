"""examples/image_classification.py runs as a user would run it: it learns, and a second run resumes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "image_classification.py")


def run(workdir, epochs):
    # From outside the repository root: the source tree there would shadow the installed package.
    done = subprocess.run(
        [sys.executable, os.path.abspath(EXAMPLE), "--dir", str(workdir), "--epochs", str(epochs)],
        cwd=str(workdir.parent), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_example_learns_and_resumes_from_its_checkpoint(tmp_path):
    workdir = tmp_path / "example"
    first = run(workdir, 6)
    accuracies = [float(a) for a in re.findall(r"val accuracy ([\d.]+)%", first)]
    assert len(accuracies) == 6
    assert accuracies[-1] > 60.0  # 2-4 classes: chance is at most 50%
    second = run(workdir, 8)
    epochs = [int(e) for e in re.findall(r"^epoch (\d+):", second, flags=re.M)]
    assert epochs == [6, 7]  # continued after the 6 finished epochs instead of starting over
