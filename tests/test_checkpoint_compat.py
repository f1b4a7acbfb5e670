"""Checkpoints written by pyengine 0.1.0, before the single checkpoint engine, still restore.

The fixtures under tests/fixtures/compat_0_1_0/ were written once by that release's code
(tests/fixtures/make_compat_fixtures.py): one single-process checkpoint (2 shards) and two
2-rank sharded ones (DDP: replicated tensors spread over ranks; FSDP2: row shards). They are
loaded here, in one process, and compared with the state the generator rebuilds from its seeds.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import pyengine as pe

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_compat_fixtures as gen  # noqa: E402


@pytest.fixture
def fixtures(tmp_path: Path) -> Path:
    # A copy: restore may quarantine what fails, and the committed fixtures must never change.
    shutil.copytree(FIXTURES / "compat_0_1_0", tmp_path / "compat")
    return tmp_path / "compat"


@pytest.mark.parametrize("layout", ["single", "sharded-ddp", "sharded-fsdp"])
def test_a_checkpoint_of_each_0_1_0_layout_restores_bit_exactly(fixtures: Path, layout: str) -> None:
    expected_model, expected_opt = gen.trained()
    model = gen.make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    extra: dict = {}
    with pe.Checkpointer(fixtures / layout) as ckpt:
        assert ckpt.restore({"model": model, "optimizer": opt, "extra": extra}) == gen.STEP
    for (name, want), got in zip(expected_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(want, got), name
    want_state, got_state = expected_opt.state_dict()["state"], opt.state_dict()["state"]
    assert sorted(want_state) == sorted(got_state)
    for pid, entries in want_state.items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got_state[pid][key])), (pid, key)
    # Per-rank entries: a world of one restores rank 0's part.
    want_extra = gen.per_rank_extra(0)
    assert extra["rank"] == 0 and extra["note"] == want_extra["note"]
    assert torch.equal(extra["values"], want_extra["values"])


@pytest.mark.parametrize("layout", ["single", "sharded-ddp", "sharded-fsdp"])
def test_0_1_0_checkpoints_inspect_and_export(fixtures: Path, layout: str, tmp_path: Path) -> None:
    info = pe.checkpoint.inspect_directory(fixtures / layout)
    assert [i.step for i in info] == [gen.STEP] and all(i.ok for i in info), info
    out = tmp_path / f"{layout}.safetensors"
    pe.checkpoint.export_weights(fixtures / layout, out, key="model")
    from safetensors.torch import load_file

    weights = load_file(str(out))
    expected, _ = gen.trained()
    assert {k: v for k, v in weights.items()}.keys() == expected.state_dict().keys()
    for k, v in expected.state_dict().items():
        assert torch.equal(weights[k], v), k
