"""Distribution strategies and rank-sharded checkpoints, with real torchrun launches.

Each launch (tests/distributed_scenarios.py) runs several scenarios and asserts on every
rank; these tests check its exit status and the figures it writes, then check the
checkpoints it left from a plain single process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyengine as pe

pytestmark = pytest.mark.distributed

SCENARIOS = Path(__file__).with_name("distributed_scenarios.py")
sys.path.insert(0, str(SCENARIOS.parent))
import distributed_scenarios as scen  # noqa: E402
from torchrun_launch import torchrun as launch  # noqa: E402


def torchrun(nproc: int, scenario: str, out: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    return launch(SCENARIOS, nproc, scenario, str(out), expect_ok=expect_ok)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank launch: DDP, FSDP2 and local SGD training, sharded saves, unfreezing, a failed save."""
    out = tmp_path_factory.mktemp("dist")
    torchrun(2, "train", out)
    return out


def report(out: Path, scenario: str, rank: int = 0) -> dict:
    return json.loads((out / f"{scenario}-rank{rank}.json").read_text())


def test_ddp_equals_single_process_and_fsdp_equals_ddp(trained: Path) -> None:
    for rank in (0, 1):
        r = report(trained, "train", rank)
        assert r["ddp_vs_single"] <= 1e-6
        assert r["fsdp_vs_ddp"] <= 1e-6


def test_local_sgd_reduces_the_loss_and_averages_every_period(trained: Path) -> None:
    for rank in (0, 1):
        first, last = report(trained, "train", rank)["local_sgd_first_last"]
        assert last < 0.6 * first
        assert report(trained, "train", rank)["local_sgd_averagings"] == 4


def test_unfreezing_after_ddp_wrap_is_refused_then_rewrap_keeps_replicas_equal(trained: Path) -> None:
    message = report(trained, "train")["unfreeze"]
    assert "0.weight" in message and "rewrap" in message


def test_trainer_strategies_train_and_ddp_is_rewrapped_after_unfreezing(trained: Path) -> None:
    r = report(trained, "train")["trainer"]
    assert r["ddp_losses"][-1] < r["ddp_losses"][0]
    assert r["fsdp_losses"][-1] < r["fsdp_losses"][0] and r["local_sgd_losses"][-1] < r["local_sgd_losses"][0]


def test_maybe_save_follows_rank_0_so_ranks_never_split(trained: Path) -> None:
    assert report(trained, "train", 1)["policy_steps"] == [2, 4, 6]


def test_a_model_shaped_like_the_fsdp_shards_is_refused_not_loaded_as_shards(trained: Path) -> None:
    for rank in (0, 1):
        assert "0.weight" in report(trained, "train", rank)["shard_shaped_refused"]


def test_an_overlapped_distributed_save_holds_the_state_at_save_bit_for_bit(trained: Path) -> None:
    for rank in (0, 1):
        r = report(trained, "train", rank)["overlap"]
        for name in ("ddp", "fsdp"):
            assert r[f"{name}_weights"] == 0.0 and r[f"{name}_moments"] == 0.0, r
            assert r[f"{name}_changed_by_step"] > 0, r


def test_the_trainer_refuses_loaders_the_ranks_built_differently(trained: Path) -> None:
    for rank in (0, 1):
        r = report(trained, "train", rank)["loaders_disagree"]
        assert "built train_loader differently" in r["ddp_seed"] and "'seed': 2" in r["ddp_seed"]
        assert "train_loader's rank= on ranks 0..1 is [0, 0]" in r["ddp_rank"]
        assert "built train_loader differently" in r["tensor_seed"]


def test_each_rank_reuses_its_reserved_staging_memory_for_every_save(trained: Path) -> None:
    for rank in (0, 1):
        r = report(trained, "train", rank)["staging"]
        assert r["reserved"] > 0 and r["held"] == [r["reserved"]] * 3, r


def test_a_failed_rank_fails_the_save_on_every_rank(trained: Path) -> None:
    for rank in (0, 1):
        assert "rank 1: OSError" in report(trained, "train", rank)["failed_save"]
    assert pe.checkpoint.Checkpointer(trained / "ckpt-fail").steps() == [1]


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_a_two_rank_checkpoint_restores_into_a_plain_model(trained: Path, name: str) -> None:
    expected = torch.load(trained / f"{name}_state.pt")
    model = scen.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pe.Checkpointer(trained / f"ckpt-{name}") as ckpt:
        assert ckpt.restore({"model": model, "optimizer": opt}) == scen.STEPS
        flat = ckpt.load()
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    assert set(flat["model"]) == set(expected)
    assert len(opt.state) == 4 and all(s["exp_avg"].shape == p.shape for p, s in opt.state.items())


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_inspect_and_export_weights_read_two_rank_checkpoints(trained: Path, name: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file

    from pyengine.cli import main

    assert main(["inspect", str(trained / f"ckpt-{name}")]) == 0
    out = capsys.readouterr().out
    assert "CORRUPT" not in out and f"restore would use step {scen.STEPS}" in out
    weights = load_file(pe.checkpoint.export_weights(trained / f"ckpt-{name}", tmp_path / "w.safetensors"))
    expected = torch.load(trained / f"{name}_state.pt")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


def test_each_rank_writes_part_of_the_replicated_state(trained: Path) -> None:
    for rank in (0, 1):
        assert report(trained, "train", rank)["ddp_bytes_rank"] > 0


def test_a_plain_checkpoint_restores_into_a_ddp_model(tmp_path: Path) -> None:
    model = scen.make_model()
    with pe.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, {"model": model}).wait()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        other = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
        with pe.Checkpointer(tmp_path / "ckpt") as ckpt:
            ckpt.restore({"model": other})
    finally:
        torch.distributed.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.module.state_dict().values()))


def test_two_rank_checkpoints_restore_with_three_ranks(trained: Path) -> None:
    torchrun(3, "reshard", trained)
    for rank in range(3):
        r = report(trained, "reshard", rank)
        assert all(r[f"{a}->{b}"] == 0.0 for a in ("ddp", "fsdp") for b in ("ddp", "fsdp"))
        assert "world_size" in r["ddp_loader"]


def test_a_rank_killed_mid_save_leaves_no_commit(tmp_path: Path) -> None:
    done = torchrun(2, "kill", tmp_path, expect_ok=False)
    assert done.returncode != 0
    directory = tmp_path / "ckpt-kill"
    assert pe.checkpoint.Checkpointer(directory).steps() == [1]
    model = torch.nn.Linear(256, 1024)
    with pe.Checkpointer(directory) as ckpt:
        assert ckpt.restore({"model": model}) == 1
    assert not [p for p in directory.iterdir() if ".tmp-" in p.name]  # removed when DIR was opened


def _hogwild_train(rank: int, world_size: int, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(rank, 600, world_size):
        j = (i * 16) % len(x)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[j:j + 16]), y[j:j + 16]).backward()
        opt.step()


def test_hogwild_two_processes_reduce_the_loss_on_shared_weights() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    with torch.no_grad():
        before = float(torch.nn.functional.mse_loss(model(x), y))
    pe.distributed.Hogwild(num_processes=2).run(_hogwild_train, model, args=(x, y))
    with torch.no_grad():
        after = float(torch.nn.functional.mse_loss(model(x), y))
    assert after < 0.01 * before


def _hogwild_fail(rank: int, world_size: int, model: torch.nn.Module) -> None:
    if rank == 1:
        raise RuntimeError("boom")


def test_a_failing_hogwild_worker_is_reported() -> None:
    with pytest.raises(pe.distributed.HogwildWorkerError, match="(?s)worker 1:.*boom"):
        pe.distributed.Hogwild(num_processes=2).run(_hogwild_fail, torch.nn.Linear(2, 1))


def test_single_process_helpers_without_torchrun() -> None:
    assert pe.distributed.init() is False
    assert (pe.distributed.rank(), pe.distributed.world_size(), pe.distributed.is_main()) == (0, 1, True)
    model = torch.nn.Linear(2, 1)
    for name in ("ddp", "fsdp", "local_sgd"):
        strategy = pe.distributed.make_strategy(name)
        assert strategy.wrap(model) is model
        strategy.after_optimizer_step()
    with pytest.raises(ValueError, match="unknown strategy"):
        pe.distributed.make_strategy("parameter_server")


def test_trainer_with_a_strategy_in_one_process(tmp_path: Path) -> None:
    scen.write_data(tmp_path / "data")
    sched = pe.VirtualEpochs(num_training_examples=256, stop_point=1, batch_size=8, num_checkpoints=2)
    model = scen.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(NotImplementedError, match="Hogwild"):
        pe.Trainer(model, opt, scen.batch_loss, scen.loader(tmp_path), strategy="hogwild")
    trainer = pe.Trainer(model, opt, scen.batch_loss, scen.loader(tmp_path), checkpoint_dir=tmp_path / "ckpt",
                         progress=False, strategy="ddp")
    history = trainer.fit(sched)
    assert trainer.model is model and history[-1]["train_loss"] < history[0]["train_loss"]
