"""The `pyengine` command: `inspect` verifies and reports; `demo` refuses a folder in use (its run
end to end and its report are tested in test_demo_sections.py)."""

from __future__ import annotations

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


def test_demo_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().out
