"""What a Checkpointer holds and lets go: its directory lock (also when dropped without close()),
read-only directories, and the source buffers of a save in flight."""

from __future__ import annotations

import gc
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyengine as pe


def state(step: int) -> dict:
    return {"weights": torch.arange(1 << 16, dtype=torch.float32) + step, "meta": {"step": step}}


def layer(step: int) -> torch.nn.Linear:
    torch.manual_seed(step)
    return torch.nn.Linear(3, 2)


def test_a_checkpointer_dropped_without_close_finishes_its_save_and_frees_the_directory(tmp_path: Path) -> None:
    first = pe.Checkpointer(tmp_path, capture_rng=False)
    first.save(1, state(1))
    del first
    gc.collect()
    # flock is per open file: a second Checkpointer of this process is refused while the first holds it.
    with pe.Checkpointer(tmp_path, capture_rng=False) as second:
        assert second.steps() == [1]
        second.save(2, state(2)).wait()
        assert second.steps() == [1, 2]


_EXIT_WITH_A_SAVE_IN_FLIGHT = """
import sys
sys.path.insert(0, sys.argv[2])
import torch
import pyengine as pe
from faulty_storage import SlowStorage, inject
ckpt = pe.Checkpointer(sys.argv[1], capture_rng=False)
inject(ckpt, SlowStorage(ckpt.directory, seconds=1.0))  # still in flight when the script ends
ckpt.save(1, {"weights": torch.arange(1 << 16, dtype=torch.float32)})
print("saving")
"""


def test_a_save_in_flight_when_the_interpreter_exits_is_made_durable(tmp_path: Path) -> None:
    # The commit thread is a daemon: without the exit hook (exit_saves.py) step 1 would never commit.
    done = subprocess.run([sys.executable, "-c", _EXIT_WITH_A_SAVE_IN_FLIGHT, str(tmp_path / "ckpt"),
                           str(Path(__file__).parent)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "saving"
    with pe.Checkpointer(tmp_path / "ckpt", capture_rng=False) as ckpt:
        assert ckpt.steps() == [1]
        assert torch.equal(ckpt.load(1)["weights"], torch.arange(1 << 16, dtype=torch.float32))


def test_an_overlapped_save_keeps_its_buffers_alive_after_the_caller_drops_them(tmp_path: Path) -> None:
    # overlap=True copies parameters in the background; the caller keeps no reference to them.
    model = torch.nn.Linear(512, 512)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with pe.Checkpointer(tmp_path, capture_rng=False) as ckpt:
        handle = ckpt.save(1, {"model": model}, overlap=True)
        del model
        gc.collect()
        for _ in range(20):  # churn the allocator, so freed memory would be reused
            torch.randn(512, 512)
        handle.wait()
        loaded = ckpt.load()["model"]
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


@pytest.fixture
def read_only_checkpoints(tmp_path: Path):
    root = tmp_path / "colleague"
    with pe.Checkpointer(root, capture_rng=False) as ckpt:
        ckpt.save(5, {**state(5), "model": layer(5)}).wait()
        ckpt.save(6, {**state(6), "model": layer(6)}).wait()
    modes = {}
    for p in [root, *root.rglob("*")]:
        modes[p] = p.stat().st_mode
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield root
    for p, mode in modes.items():
        p.chmod(mode)


def run_read_only(root: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `code` where `root` cannot be written: for root (which ignores permission bits) on a
    read-only bind mount in a mount namespace of its own, so nothing outlives the child."""
    command = [sys.executable, "-c", code, str(root), *args]
    if os.geteuid() == 0:
        remount = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
        command = ["unshare", "--mount", "sh", "-c", remount, "sh", str(root), *command]
    # Not from the repository root, where the source tree would shadow an installed pyengine.
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=root.parent.parent)


READ_ONLY_CHILD = """
import sys, json, torch
import pyengine as pe
root = sys.argv[1]
try:
    open(root + "/probe", "w")
    raise SystemExit("the directory is writable: the test setup failed")
except OSError:
    pass
ck = pe.Checkpointer(root, capture_rng=False)
target = {"weights": torch.zeros(1 << 16), "meta": {}, "model": torch.nn.Linear(3, 2)}
step = ck.restore(target)
report = {"restored": step, "first": float(target["weights"][0]), "load": ck.load(5)["meta"],
          "steps": ck.steps()}
try:
    ck.save(7, {"weights": torch.zeros(3)})
except pe.CheckpointError as e:
    report["save_error"] = str(e)
infos = pe.checkpoint.inspect_directory(root)
report["inspect"] = [(i.step, i.ok) for i in infos]
if sys.argv[2] != "-":
    pe.checkpoint.export_weights(root, sys.argv[2], key="model")
ck.close()
print(json.dumps(report))
"""


def test_a_directory_this_process_cannot_write_restores_loads_and_inspects(read_only_checkpoints: Path,
                                                                             tmp_path: Path) -> None:
    import json

    root = read_only_checkpoints
    out = tmp_path / "exported"
    out.mkdir()
    done = run_read_only(root, READ_ONLY_CHILD, str(out / "w.safetensors"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["restored"] == 6 and report["first"] == 6.0
    assert report["load"] == {"step": 5} and report["steps"] == [5, 6]
    assert "can be restored, not saved to" in report["save_error"], report
    assert report["inspect"] == [[5, True], [6, True]]
    from safetensors.torch import load_file

    exported = load_file(str(out / "w.safetensors"))
    assert sorted(exported) == ["bias", "weight"] and torch.equal(exported["weight"], layer(6).weight.detach())
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-00000005",
                                                                                  "step-00000006"]


def test_a_read_only_directory_is_not_changed_by_a_restore_that_finds_damage(read_only_checkpoints: Path) -> None:
    import json

    root = read_only_checkpoints
    newest = next((root / "step-00000006").glob("shard-*.safetensors"))
    mode = newest.stat().st_mode
    newest.chmod(0o644)
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    newest.chmod(mode)
    done = run_read_only(root, READ_ONLY_CHILD, "-")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["restored"] == 5 and report["first"] == 5.0, report  # fell back
    assert (root / "step-00000006").is_dir(), "a reader without write access moved a step aside"
    assert np.isfinite(report["first"])
