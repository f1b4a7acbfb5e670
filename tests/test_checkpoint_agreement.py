"""Ranks that agree: 2 gloo ranks save and restore through the single checkpoint engine.

- Damage to rank 1's part of the newest step (a per-rank entry, a piece of a shared tensor,
  the part manifest) makes every rank restore the same older step, with the same warning.
- A Trainer resumed under torchrun after such damage ends with the uninterrupted run's weights.
- The faulty-storage matrix: a failure at any storage operation, on either rank, is raised by
  wait() on every rank with nothing committed; a prune failure only warns.
- Ctrl-C on both ranks during a stalled save: KeyboardInterrupt within a second, nothing torn.
- max_in_flight=3 with overlapped saves on 2 ranks: three unfinished at once, never more.
- A rank killed during a restore makes the other fail with an error instead of waiting forever.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from torchrun_launch import torchrun  # noqa: E402

pytestmark = pytest.mark.distributed

SCENARIOS = Path(__file__).with_name("agreement_scenarios.py")


@pytest.fixture(scope="module")
def agreed(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("agree")
    torchrun(SCENARIOS, 2, "agree", str(out))
    return [json.loads((out / f"agree-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("kind", ["per_rank_entry", "shared_piece", "part_manifest"])
def test_damage_to_one_ranks_part_makes_every_rank_restore_the_same_older_step(agreed: list[dict],
                                                                               kind: str) -> None:
    assert [r[kind]["steps"] for r in agreed] == [[10, 10], [10, 10]]
    assert agreed[0][kind]["warning"] == agreed[1][kind]["warning"]
    assert "rank 1" in agreed[0][kind]["warning"]


def test_a_trainer_resumed_after_damage_ends_with_the_uninterrupted_weights(agreed: list[dict]) -> None:
    assert [r["trainer"]["diff"] for r in agreed] == [0.0, 0.0]


def test_a_storage_failure_on_one_rank_fails_the_save_on_every_rank(agreed: list[dict]) -> None:
    faults = agreed[0]["faults"]
    assert faults == agreed[1]["faults"]  # the same outcome, word for word, on both ranks
    assert faults.pop("prune@rank0+0") == "committed"
    assert len(faults) == 8 and all("injected failure" in v for v in faults.values()), faults


def test_ctrl_c_on_both_ranks_interrupts_a_stalled_save_and_tears_nothing(agreed: list[dict]) -> None:
    assert all(r["sigint"]["latency"] < 1.0 and r["sigint"]["steps"] == [1, 2] for r in agreed)


def test_three_saves_in_flight_on_two_ranks_commit_in_order(agreed: list[dict]) -> None:
    assert all(max(r["in_flight"]["unfinished"]) == 3 for r in agreed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_killed_during_restore_makes_the_other_rank_fail_not_hang(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, str(SCENARIOS), "die-in-restore", str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for r in range(2)]
    try:
        codes = [p.wait(timeout=120) for p in ranks]  # a hang fails here
    finally:
        for p in ranks:
            p.kill()
    assert codes[1] == -9 and codes[0] == 0, (codes, ranks[0].stderr.read()[-3000:])
    report = json.loads((tmp_path / "die-in-restore-rank0.json").read_text())
    assert "lost contact with the other ranks" in report["error"], report
