"""pe.Trainer with model parallelism, launched by tests/test_model_parallel_trainer.py under torchrun.

    python -m torch.distributed.run --nproc-per-node 2 tests/model_parallel_trainer_scenarios.py OUT

OUT holds the datasets the test wrote (OUT/train, OUT/val). Every scenario runs on every rank
against the same Trainer run in this process without a strategy (the reference), asserts, and
writes its figures to OUT/<scenario>-rank<R>.json; a non-zero exit fails the test. One launch
runs them all: starting torch and the process group costs seconds.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pyengine as pe

TOLERANCE = 1e-5
BATCH = 16
N_TRAIN, N_VAL = 128, 40
# 4 virtual epochs of 4 steps; each ends with an evaluation (and a checkpoint, when there is a directory).
SCHEDULE = pe.VirtualEpochs(num_training_examples=N_TRAIN, stop_point=2, batch_size=BATCH, num_checkpoints=4)
GRAD_CLIP = 0.5  # the targets are large, so this clips every step: the global norm must be right


def write_data(out: Path) -> None:
    """OUT/train, OUT/val, and OUT/train-nan: train with a NaN target in the 7th step's batch
    (virtual epoch 2) of every pass."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 1)) * 3
    data = {}
    for name, n in (("train", N_TRAIN), ("val", N_VAL)):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        data[name] = {"x": x, "y": (x @ w + np.sin(2 * x[:, :1])).astype(np.float32)}
        pe.data.write_dataset(out / name, data[name])
    # The loader's order depends only on (seed, length): find the sample the 7th step starts with.
    seventh = list(loaders(out)[0])[6]["x"][0].numpy()
    (index,) = np.flatnonzero((data["train"]["x"] == seventh).all(axis=1))
    y = data["train"]["y"].copy()
    y[index] = np.nan
    pe.data.write_dataset(out / "train-nan", {"x": data["train"]["x"], "y": y})


def loaders(out: Path, train_data: str = "train", **sharding: int) -> tuple[pe.data.Loader, pe.data.Loader]:
    # 40 validation samples in batches of 24 and 16: evaluation takes batches of any size.
    train = pe.data.Loader(pe.data.Dataset(out / train_data), BATCH, shuffle=True, seed=1, drop_last=True,
                           **sharding)
    val = pe.data.Loader(pe.data.Dataset(out / "val"), 24, shuffle=False, drop_last=False)
    return train, val


def tp_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    # 0 column-wise, 2 row-wise, 3 left whole: the gradients mix DTensors and plain tensors.
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8), torch.nn.Linear(8, 1))


def pipeline_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 1))


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output, target)


def batch_mse(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return mse(model(batch["x"]), batch["y"])


class NanOnCall:
    """batch_mse, but NaN on one call (counted over training and evaluation alike)."""

    def __init__(self, call: int) -> None:
        self.call, self.calls = call, 0

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        loss = batch_mse(model, batch)
        return loss + math.nan if self.calls == self.call else loss


class Snapshots(pe.train.Callback):
    """The global weights at every epoch end (full_tensor() is a collective: every rank runs this)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, trainer: pe.Trainer, record: dict[str, Any]) -> None:
        self.states.append(full_state(trainer.model))


class Crash(Exception):
    pass


class CrashAt(pe.train.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer: pe.Trainer, record: dict[str, Any]) -> None:
        if record["epoch"] == self.epoch:
            raise Crash  # before that epoch's checkpoint: the run resumes from the one before


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() <= b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def history_diff(history: list[dict], ref: list[dict]) -> float:
    assert [h["step"] for h in history] == [h["step"] for h in ref], (history, ref)
    return max(abs(h[k] - r[k]) for h, r in zip(history, ref) for k in ("train_loss", "val_loss", "lr"))


def trainer_for(model: torch.nn.Module, loss_fn: Any, out: Path, train_data: str = "train",
                **kwargs: Any) -> pe.Trainer:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train, val = loaders(out, train_data)
    return pe.Trainer(model, opt, loss_fn, train, val, scheduler=torch.optim.lr_scheduler.StepLR(opt, 5, 0.5),
                      grad_clip=GRAD_CLIP, progress=False, **kwargs)


def scenario_tensor(out: Path) -> dict:
    """TP Trainer == single-process Trainer: grad clipping, a skipped NaN step, early stopping."""
    runs = {}
    for name, strategy in (("ref", None), ("tp", pe.distributed.TensorParallel())):
        model = strategy.wrap(tp_mlp()) if strategy is not None else tp_mlp()
        snapshots = Snapshots()
        # min_delta so large that only epoch 1 is ever best: stops after epoch 3 and restores epoch 1.
        trainer = trainer_for(model, NanOnCall(8), out, strategy=strategy, on_nonfinite="skip", callbacks=[snapshots],
                              early_stopping=pe.train.EarlyStopping(patience=1, min_delta=1e3))
        history = trainer.fit(SCHEDULE)
        runs[name] = (trainer, history, snapshots.states, full_state(trainer.model))
    (ref, ref_history, ref_snaps, ref_final), (tp, history, snaps, final) = runs["ref"], runs["tp"]
    weight = dict(tp.model.named_parameters())["0.weight"]
    assert type(weight).__name__ == "DTensor" and weight.to_local().shape == (8, 8), weight
    report = {
        "epochs": len(history),
        "skipped_steps": [ref._progress.skipped_steps, tp._progress.skipped_steps],
        "history_diff": history_diff(history, ref_history),
        "epoch_weight_diff": max(max_diff(a, b) for a, b in zip(snaps, ref_snaps)),
        "final_weight_diff": max_diff(final, ref_final),
        "restored_best": max_diff(final, snaps[0]) == 0.0 and max_diff(final, snaps[-1]) > 0.0,
        "eval_diff": abs(tp.evaluate(loaders(out)[1]) - ref.evaluate(loaders(out)[1])),
    }
    assert report["epochs"] == 3 and report["skipped_steps"] == [1, 1] and report["restored_best"], report
    assert max(report["history_diff"], report["epoch_weight_diff"], report["final_weight_diff"],
               report["eval_diff"]) <= TOLERANCE, report

    # Checkpoints (rank-sharded DTensors): a crash and resume ends like the uninterrupted run.
    # Early stopping's best weights (epoch 1's) are per-rank state: each rank saves its shards,
    # the resumed run reads them back and restores them as DTensors when it stops.
    ref = trainer_for(tp_mlp(), batch_mse, out, early_stopping=pe.train.EarlyStopping(patience=1, min_delta=1e3))
    ref_history = ref.fit(SCHEDULE)

    def make(callbacks: list) -> pe.Trainer:
        strategy = pe.distributed.TensorParallel()
        return trainer_for(strategy.wrap(tp_mlp()), batch_mse, out, strategy=strategy,
                           checkpoint_dir=out / "ckpt-tensor", callbacks=callbacks,
                           early_stopping=pe.train.EarlyStopping(patience=1, min_delta=1e3))

    trainer, history = crash_then_resume(make)
    report["resume_history_diff"] = history_diff(history, ref_history)
    report["resume_weight_diff"] = max_diff(full_state(trainer.model), full_state(ref.model))
    assert max(report["resume_history_diff"], report["resume_weight_diff"]) <= TOLERANCE, report
    return report


def crash_then_resume(make: Callable[[list], pe.Trainer],
                      resumed_callbacks: list | None = None) -> tuple[pe.Trainer, list[dict]]:
    """A run that crashes at the end of epoch 2 (before its checkpoint), then a new Trainer
    (make(resumed_callbacks)) that resumes from epoch 1's checkpoint and finishes."""
    crashing = make([CrashAt(2)])
    try:
        crashing.fit(SCHEDULE)
    except Crash:
        pass
    else:
        raise AssertionError("the run did not crash")
    assert crashing.step == 2 * SCHEDULE.steps_per_epoch
    trainer = make(resumed_callbacks or [])
    return trainer, trainer.fit(SCHEDULE, resume=True)


def pipeline_trainer(out: Path, **kwargs: Any) -> pe.Trainer:
    strategy = pe.distributed.PipelineParallel(mse, n_microbatches=4)
    return trainer_for(strategy.wrap(pipeline_mlp()), None, out, strategy=strategy, **kwargs)


def scenario_pipeline(out: Path) -> dict:
    """Pipeline Trainer == single-process Trainer, across a crash and resume from its checkpoints."""
    rank = pe.distributed.rank()
    ref_snapshots = Snapshots()
    ref = trainer_for(pipeline_mlp(), batch_mse, out, callbacks=[ref_snapshots],
                      early_stopping=pe.train.EarlyStopping(patience=10))
    ref_history = ref.fit(SCHEDULE)

    ckpt = out / "ckpt-pipeline"
    snapshots = Snapshots()

    def make(callbacks: list) -> pe.Trainer:
        return pipeline_trainer(out, checkpoint_dir=ckpt, callbacks=callbacks,
                                early_stopping=pe.train.EarlyStopping(patience=10))

    trainer, history = crash_then_resume(make, resumed_callbacks=[snapshots])
    stage_names = [n for n, _ in trainer.model.named_parameters()]
    assert 0 < len(stage_names) < len(list(ref.model.parameters())), stage_names  # it really is split
    # The last checkpoint holds the last epoch's weights (before the best were restored): the
    # test restores it into a plain model and compares with these.
    torch.save(snapshots.states[-1], out / f"pipeline-last-epoch-stage{rank}.pt")
    if rank == 0:
        torch.save(ref_snapshots.states[-1], out / "pipeline-last-epoch-ref.pt")
    report = {
        "stage_params": stage_names,
        "resumed_epochs": len(snapshots.states),
        "history": history,
        "history_diff": history_diff(history, ref_history),
        "last_epoch_weight_diff": max_diff(snapshots.states[-1], ref_snapshots.states[-1]),
        "final_weight_diff": max_diff(full_state(trainer.model), full_state(ref.model)),
        "eval_diff": abs(trainer.evaluate(loaders(out)[1]) - ref.evaluate(loaders(out)[1])),
    }
    with pe.Checkpointer(ckpt) as ckpts:
        report["checkpoints"] = ckpts.steps()
    report["worst"] = worst_across_ranks(max(report["history_diff"], report["last_epoch_weight_diff"],
                                             report["final_weight_diff"], report["eval_diff"]))
    assert report["resumed_epochs"] == 3 and report["worst"] <= TOLERANCE, report

    # A rank-sharded loader would feed the stages different batches: refused before anything runs.
    sharded, _ = loaders(out, rank=rank, world_size=pe.distributed.world_size())
    try:
        pe.Trainer(trainer.model, trainer.optimizer, None, sharded, strategy=trainer.strategy)
    except ValueError as e:
        report["sharded_loader_error"] = str(e)
    else:
        raise AssertionError("a rank-sharded loader was accepted for a pipeline")
    return report


def scenario_pipeline_nonfinite(out: Path) -> dict:
    """A NaN target makes the loss NaN on the last stage only; broadcast, every rank acts alike."""
    ref = trainer_for(pipeline_mlp(), batch_mse, out, "train-nan", on_nonfinite="skip")
    ref_history = ref.fit(SCHEDULE)
    skipping = pipeline_trainer(out, train_data="train-nan", on_nonfinite="skip")
    history = skipping.fit(SCHEDULE)
    report: dict[str, Any] = {
        "skipped_steps": [ref._progress.skipped_steps, skipping._progress.skipped_steps],
        "skip_history_diff": history_diff(history, ref_history),
        "skip_weight_diff": max_diff(full_state(skipping.model), full_state(ref.model)),
    }
    assert report["skipped_steps"] == [2, 2], report  # the NaN sample comes once a pass
    assert max(report["skip_history_diff"], report["skip_weight_diff"]) <= TOLERANCE, report

    # Rollback restores the stages from step 4's checkpoint, replays into the same NaN at step
    # 7, and having rolled back once already, raises on every rank.
    rolling = pipeline_trainer(out, train_data="train-nan", on_nonfinite="rollback", max_rollbacks=1,
                               checkpoint_dir=out / "ckpt-rollback")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rolling.fit(SCHEDULE)
        except FloatingPointError as e:
            report["rollback_error"] = str(e)
        else:
            raise AssertionError("a NaN after the last allowed rollback did not raise")
    report["rollback_warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    report["rollbacks"] = rolling._progress.rollbacks
    return report


def worst_across_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    pe.distributed.init()
    for name, scenario in (("tensor", scenario_tensor), ("pipeline", scenario_pipeline),
                           ("pipeline-nonfinite", scenario_pipeline_nonfinite)):
        report = scenario(out)
        (out / f"{name}-rank{pe.distributed.rank()}.json").write_text(json.dumps(report, indent=1))
    pe.distributed.barrier()
    pe.distributed.destroy()


if __name__ == "__main__":
    main()
