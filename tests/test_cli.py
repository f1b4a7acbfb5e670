"""The `pyengine` command: `demo` runs end to end; `inspect` verifies and reports."""

from __future__ import annotations

import subprocess
import sys

import torch

import pyengine as pe
from pyengine.cli import main


def _two_checkpoints(root):
    with pe.Checkpointer(root) as ckpt:
        ckpt.save(100, {"w": torch.arange(1000.0)}).wait()
        ckpt.save(200, {"w": torch.arange(1000.0) * 2}).wait()


def test_inspect_lists_verified_checkpoints_and_the_restore_choice(tmp_path, capsys):
    _two_checkpoints(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "100" in out and "200" in out and out.count(" ok") == 2
    assert "restore would use step 200" in out


def test_inspect_flags_a_corrupt_checkpoint_and_names_the_fallback(tmp_path, capsys):
    _two_checkpoints(tmp_path)
    shard = next((tmp_path / "step-00000200").glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and shard.name in out
    assert "restore would use step 100" in out


def test_inspect_of_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no checkpoint directory" in capsys.readouterr().out


def test_demo_trains_crashes_and_resumes_exactly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pyengine.cli", "demo", "--dir", str(tmp_path / "ck"),
                             "--steps", "40", "--every", "10"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bit for bit: True" in result.stdout
    assert (tmp_path / "ck" / "model.safetensors").exists()
