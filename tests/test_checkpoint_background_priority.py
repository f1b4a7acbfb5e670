"""The background save threads run at the nice value Checkpointer(background_nice=) asks for,
so that on a host whose cores all train they take the gaps instead of training time."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import pyengine as pe


def _background_threads() -> dict[str, int]:
    """name -> nice of this process's pyengine checkpoint threads that exist right now."""
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
        if name.startswith("pe-ckpt-") and not name.startswith("pe-ckpt-copy"):
            # Fields after the ")" that closes the name: state is field 3, nice is field 19.
            found[name] = int(stat.rsplit(")", 1)[1].split()[16])
    return found


@pytest.mark.parametrize("nice", [0, 7])
def test_save_threads_run_at_the_requested_nice_value(tmp_path: Path, nice: int) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    state = {"big": torch.ones(48 << 20)}  # 192 MB: its write outlasts many polls
    with pe.Checkpointer(tmp_path, background_nice=nice) as ckpt:
        ckpt.save(1, state).wait()  # staging allocated; the next save is the measured one
        seen: dict[str, int] = {}
        handle = ckpt.save(2, state)
        deadline = time.monotonic() + 30
        while not handle.done() and time.monotonic() < deadline:
            seen.update(_background_threads())
        handle.wait()
    assert seen, "no background save thread was seen while the save ran"
    assert set(seen.values()) == {min(19, base + nice)}, seen
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the training thread keeps its priority


def test_a_nice_value_outside_0_to_19_is_refused(tmp_path: Path) -> None:
    for bad in (-1, 20, 2.5):
        with pytest.raises(ValueError, match="background_nice"):
            pe.Checkpointer(tmp_path, background_nice=bad)
