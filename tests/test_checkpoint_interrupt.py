"""Ctrl-C (SIGINT) during a save, in one process: KeyboardInterrupt within a second, whatever
the save waits for (here a file system that stalls for seconds), and no torn or half-committed
step: the save in flight is finished by the exit handler, and older checkpoints stay intact.
The 2-rank case is in tests/test_checkpoint_agreement.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyengine as pe

CHILD = """
import json, os, signal, sys, threading, time
import torch
import pyengine as pe
sys.path.insert(0, {tests!r})
from faulty_storage import SlowStorage, inject

root, where = sys.argv[1], sys.argv[2]
# A terminal's Ctrl-C: Python keeps SIGINT ignored when its parent ignored it (as a shell does
# for a background job, like the CI's sanitizer run beside pytest), so make it the default.
signal.signal(signal.SIGINT, signal.default_int_handler)
ck = pe.Checkpointer(root, capture_rng=False, max_in_flight=1)
ck.save(1, {{"w": torch.arange(1 << 16, dtype=torch.float32) + 1}}).wait()
# The stall lasts until a second after the interrupt: on a loaded machine a fixed stall could
# end before the signal is sent.
interrupted = threading.Event()
inject(ck, SlowStorage(ck.directory, seconds=1.0, until=interrupted))
handle = ck.save(2, {{"w": torch.arange(1 << 16, dtype=torch.float32) + 2}})
sent = []

def interrupt():
    time.sleep(0.5)
    sent.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGINT)
    interrupted.set()

threading.Thread(target=interrupt).start()
try:
    if where == "wait":
        handle.wait()
    else:  # the next save waits for the one in flight (max_in_flight=1)
        ck.save(3, {{"w": torch.zeros(3)}})
    print(json.dumps({{"interrupted": False}}), flush=True)
except KeyboardInterrupt:
    print(json.dumps({{"interrupted": True, "latency": time.monotonic() - sent[0]}}), flush=True)
# Falling off the end: the exit handler finishes the save in flight.
"""


@pytest.mark.parametrize("where", ["wait", "save"])
def test_ctrl_c_interrupts_a_stalled_save_at_once_and_tears_nothing(tmp_path: Path, where: str) -> None:
    code = CHILD.format(tests=str(Path(__file__).parent))
    # Not from the repository root, where the source tree would shadow an installed pyengine.
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), where], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["interrupted"], report
    assert report["latency"] < 1.0, report
    ck = pe.Checkpointer(tmp_path, capture_rng=False)
    # Step 2 was in flight when Ctrl-C came; the exit handler finished it. Step 3 never started.
    assert ck.steps() == [1, 2]
    assert all(i.ok for i in pe.checkpoint.inspect_directory(tmp_path))
    assert torch.equal(ck.load(1)["w"], torch.arange(1 << 16, dtype=torch.float32) + 1)
    assert torch.equal(ck.load(2)["w"], torch.arange(1 << 16, dtype=torch.float32) + 2)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    ck.close()
