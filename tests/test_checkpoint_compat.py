"""Checkpoints written by pyengine 0.1.0, before the single checkpoint engine, still restore.

The fixtures under tests/fixtures/compat_0_1_0/ were written once by that release's code
(tests/fixtures/make_compat_fixtures.py): one single-process checkpoint (2 shards) and two
2-rank sharded ones (DDP: replicated tensors spread over ranks; FSDP2: row shards). They are
loaded here, in one process, and compared with the state the generator rebuilds from its seeds.

The rebuilt state is three Adam steps of float32 arithmetic, and another CPU's kernels round
those differently: on an AMD EPYC (MKL, AVX2) the weights the generator rebuilds differ from
the ones 0.1.0 wrote by up to 3e-8 (a few float32 ulps). So values are compared to within float32
rounding of those steps. A layout read wrongly (shards swapped, rows out of order, a tensor
read at a narrower dtype) is off by far more than that and still fails. What does not depend on the
CPU's arithmetic (dtypes, shapes, step counters, per-rank entries) is compared exactly.
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


def assert_same_state(want: torch.Tensor, got: torch.Tensor, where: object) -> None:
    """Equal up to the float rounding of rebuilding `want` on this CPU (see the module docstring)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8, msg=lambda m: f"{where}: {m}")


@pytest.fixture
def fixtures(tmp_path: Path) -> Path:
    # A copy: restore may quarantine what fails, and the committed fixtures must never change.
    shutil.copytree(FIXTURES / "compat_0_1_0", tmp_path / "compat")
    return tmp_path / "compat"


@pytest.mark.parametrize("layout", ["single", "sharded-ddp", "sharded-fsdp"])
def test_a_checkpoint_of_each_0_1_0_layout_restores_its_state(fixtures: Path, layout: str) -> None:
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
        assert_same_state(want, got, name)
    want_state, got_state = expected_opt.state_dict()["state"], opt.state_dict()["state"]
    assert sorted(want_state) == sorted(got_state)
    for pid, entries in want_state.items():
        # Adam's step counter is a count, not the result of arithmetic: it must match exactly.
        assert torch.equal(torch.as_tensor(entries["step"]), torch.as_tensor(got_state[pid]["step"])), (pid, "step")
        for key, value in entries.items():
            assert_same_state(torch.as_tensor(value), torch.as_tensor(got_state[pid][key]), (pid, key))
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
    assert weights.keys() == expected.state_dict().keys()
    for k, v in expected.state_dict().items():
        assert_same_state(v, weights[k], k)
