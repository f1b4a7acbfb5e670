"""pe.Trainer(strategy="tensor" / PipelineParallel) against the single-process Trainer.

One 2-rank gloo launch (tests/model_parallel_trainer_scenarios.py) trains both ways on every
rank and asserts; these tests check the figures it writes, restore its pipeline checkpoint
into a plain model here, and check the Trainer's model-parallel rules in this process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import pyengine as pe

SCENARIOS = Path(__file__).with_name("model_parallel_trainer_scenarios.py")
sys.path.insert(0, str(SCENARIOS.parent))
import model_parallel_trainer_scenarios as scen  # noqa: E402
from torchrun_launch import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mp-trainer")
    scen.write_data(out)
    torchrun(SCENARIOS, 2, str(out))
    return out


def report(out: Path, scenario: str, rank: int) -> dict:
    return json.loads((out / f"{scenario}-rank{rank}.json").read_text())


@pytest.mark.distributed
def test_tensor_parallel_trainer_equals_the_single_process_trainer(launched: Path) -> None:
    for rank in (0, 1):
        r = report(launched, "tensor", rank)
        # Grad clipping on every step, a NaN step skipped on both, early stopping after epoch 3
        # restoring epoch 1's (DTensor) weights: the same history and weights at every epoch.
        assert r["epochs"] == 3 and r["skipped_steps"] == [1, 1] and r["restored_best"]
        for key in ("history_diff", "epoch_weight_diff", "final_weight_diff", "eval_diff"):
            assert r[key] <= scen.TOLERANCE, (key, r)
        # Its rank-sharded checkpoints: a crash and resume ends like the uninterrupted run.
        assert r["resume_history_diff"] <= scen.TOLERANCE and r["resume_weight_diff"] <= scen.TOLERANCE


@pytest.mark.distributed
def test_pipeline_trainer_equals_the_single_process_trainer_across_a_resume(launched: Path) -> None:
    histories = [report(launched, "pipeline", rank)["history"] for rank in (0, 1)]
    # The loss is broadcast from the last stage: both ranks log the same losses.
    assert [[h["train_loss"], h["val_loss"]] for h in histories[0]] == [
        [h["train_loss"], h["val_loss"]] for h in histories[1]
    ]
    assert histories[0][-1]["train_loss"] < histories[0][0]["train_loss"]
    for rank in (0, 1):
        r = report(launched, "pipeline", rank)
        assert r["resumed_epochs"] == 3 and r["checkpoints"] == [8, 12, 16]
        for key in ("history_diff", "last_epoch_weight_diff", "final_weight_diff", "eval_diff"):
            assert r[key] <= scen.TOLERANCE, (key, r)
    stages = [report(launched, "pipeline", rank)["stage_params"] for rank in (0, 1)]
    assert stages == [["0.weight", "0.bias"], ["2.weight", "2.bias", "4.weight", "4.bias"]]


@pytest.mark.distributed
def test_a_nan_loss_on_the_last_stage_is_skipped_or_rolled_back_on_every_rank(launched: Path) -> None:
    for rank in (0, 1):
        r = report(launched, "pipeline-nonfinite", rank)
        assert r["skipped_steps"] == [2, 2]
        assert r["skip_history_diff"] <= scen.TOLERANCE and r["skip_weight_diff"] <= scen.TOLERANCE
        assert r["rollbacks"] == 1 and any("rolled back to step 4" in w for w in r["rollback_warnings"])
        assert "the loss is nan at step 7 (virtual epoch 2) and already rolled back 1 times" in r["rollback_error"]


@pytest.mark.distributed
def test_a_pipeline_trainer_checkpoint_restores_into_the_plain_model(launched: Path) -> None:
    model = scen.pipeline_mlp()
    with pe.Checkpointer(launched / "ckpt-pipeline") as ckpt:
        assert ckpt.restore({"model": model}) == scen.SCHEDULE.total_steps
    stages = {}
    for rank in (0, 1):
        stages.update(torch.load(launched / f"pipeline-last-epoch-stage{rank}.pt"))
    assert set(stages) == set(model.state_dict())
    assert all(torch.equal(v, stages[k]) for k, v in model.state_dict().items())
    reference = torch.load(launched / "pipeline-last-epoch-ref.pt")
    assert scen.max_diff(model.state_dict(), reference) <= scen.TOLERANCE


@pytest.mark.distributed
def test_a_rank_sharded_loader_is_refused_for_a_pipeline(launched: Path) -> None:
    for rank in (0, 1):
        message = report(launched, "pipeline", rank)["sharded_loader_error"]
        assert f"rank={rank}, world_size=2" in message and "same batches" in message


def test_a_rank_sharded_loader_is_refused_for_tensor_parallelism(tmp_path: Path) -> None:
    scen.write_data(tmp_path)
    model = scen.tp_mlp()
    _, val = scen.loaders(tmp_path)
    sharded, _ = scen.loaders(tmp_path, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"'tensor' splits the model, not the data.*train_loader is rank-sharded"):
        pe.Trainer(model, torch.optim.Adam(model.parameters()), scen.batch_mse, sharded, strategy="tensor")
    train, _ = scen.loaders(tmp_path)
    with pytest.raises(ValueError, match="val_loader is rank-sharded"):
        pe.Trainer(model, torch.optim.Adam(model.parameters()), scen.batch_mse, train, sharded, strategy="tensor")


def test_outside_a_job_a_pipeline_trainer_is_the_plain_trainer(tmp_path: Path, one_torch_thread: None) -> None:
    """In a world of one the stage is the whole model: the same numbers, bit for bit, and resume works."""
    scen.write_data(tmp_path)
    ref = scen.trainer_for(scen.pipeline_mlp(), scen.batch_mse, tmp_path)
    ref_history = ref.fit(scen.SCHEDULE)
    strategy = pe.distributed.PipelineParallel(scen.mse, n_microbatches=4)
    trainer = scen.trainer_for(strategy.wrap(scen.pipeline_mlp()), None, tmp_path, strategy=strategy,
                               checkpoint_dir=tmp_path / "ckpt")
    history = trainer.fit(scen.SCHEDULE)
    assert scen.history_diff(history, ref_history) == 0.0
    assert all(torch.equal(v, ref.model.state_dict()[k]) for k, v in trainer.model.state_dict().items())
    again = scen.pipeline_trainer(tmp_path, checkpoint_dir=tmp_path / "ckpt")
    assert again.fit(scen.SCHEDULE) == history and again.step == scen.SCHEDULE.total_steps


def test_the_pipeline_loss_comes_from_the_strategy_and_is_asked_for_clearly() -> None:
    model = scen.pipeline_mlp()
    strategy = pe.distributed.PipelineParallel(scen.mse)
    stage = strategy.wrap(model)
    opt = torch.optim.Adam(stage.parameters())
    batches = [(torch.randn(8, 8), torch.randn(8, 1))]
    with pytest.raises(ValueError, match="pass loss_fn=None"):
        pe.Trainer(stage, opt, scen.batch_mse, batches, strategy=strategy)
    with pytest.raises(ValueError, match="loss_fn is required"):
        pe.Trainer(stage, opt, None, batches)
    with pytest.raises(ValueError, match=r"PipelineParallel\(loss_fn="):
        pe.Trainer(stage, opt, None, batches, strategy="pipeline")
    with pytest.raises(ValueError, match="cannot be cut into 4 equal micro-batches"):
        strategy.step(torch.randn(6, 8), torch.randn(6, 1))


def test_default_split_batch_takes_pairs_and_x_y_dicts() -> None:
    split = pe.distributed.pipeline_parallel.default_split_batch
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert split((x, y)) == (x, y) and split([x, y]) == (x, y)
    assert split({"y": y, "x": x, "w": y}) == (x, y)
    with pytest.raises(TypeError, match=r"keys \['features', 'label'\].*split_batch="):
        split({"features": x, "label": y})
    with pytest.raises(TypeError, match="a tuple"):
        split((x, y, y))
