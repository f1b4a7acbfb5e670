"""The source layout: a checkout's root cannot shadow the installed package, and the version is written once."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pyengine

ROOT = Path(__file__).resolve().parents[1]


def test_import_from_the_repository_root_gets_the_built_package():
    # With a flat layout, Python put the checkout's pyengine/ (no compiled core) first on sys.path
    # for `python -c` and failed; under src/ the root holds no importable pyengine.
    out = subprocess.run(
        [sys.executable, "-c", "import pyengine, pyengine._core; print(pyengine.__file__)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert not (ROOT / "pyengine").exists()
    assert Path(out.stdout.strip()).resolve() == Path(pyengine.__file__).resolve()


def test_the_version_is_defined_once_and_the_metadata_reads_it():
    assert importlib.metadata.version("pyengine") == pyengine.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert not re.search(r"^version\s*=", pyproject, re.M), "pyproject.toml must not repeat the version"
