"""The Trainer: exact resume, early stopping that restores the best weights, non-finite
loss handling, warm start, metrics log."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

import pyengine as pe


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((640, 8)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((8, 3)), axis=1).astype(np.int64)
    path = tmp_path_factory.mktemp("data") / "ds"
    pe.data.write_dataset(path, {"x": x, "y": y})
    return pe.data.Dataset(path)


def _model():
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Dropout(0.2), torch.nn.Linear(32, 3))


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])


class _Crash(Exception):
    pass


class _CrashAt(pe.train.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, record):
        if record["epoch"] == self.epoch:
            raise _Crash


def _trainer(dataset, tmp_path, **kwargs):
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9)
    loader = pe.data.Loader(dataset, batch_size=32, shuffle=True, seed=3, drop_last=True)
    val = pe.data.Loader(dataset, batch_size=128, shuffle=False)
    kwargs.setdefault("checkpoint_dir", tmp_path / "ckpt")
    return pe.Trainer(model, opt, _loss, loader, val_loader=val, scheduler=sched, progress=False, **kwargs)


SCHEDULE = pe.VirtualEpochs(num_training_examples=640, stop_point=3.0, batch_size=32, num_checkpoints=6)


def test_resumed_fit_equals_uninterrupted_fit_bit_for_bit(dataset, tmp_path):
    reference = _trainer(dataset, tmp_path / "ref")
    ref_history = reference.fit(SCHEDULE)

    crashing = _trainer(dataset, tmp_path / "run", callbacks=[_CrashAt(epoch=4)])
    with pytest.raises(_Crash):
        crashing.fit(SCHEDULE)
    torch.manual_seed(999)  # a new process would start from other RNG states
    resumed = _trainer(dataset, tmp_path / "run")
    history = resumed.fit(SCHEDULE, resume=True)

    assert resumed.step == reference.step == SCHEDULE.total_steps
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in ref_history]
    assert [r["val_loss"] for r in history] == [r["val_loss"] for r in ref_history]


def test_resume_false_starts_over(dataset, tmp_path):
    first = _trainer(dataset, tmp_path)
    first.fit(pe.VirtualEpochs.of_steps(5, 2))
    again = _trainer(dataset, tmp_path / "other")
    again.fit(pe.VirtualEpochs.of_steps(5, 2), resume=False)
    assert again.step == 10 and len(again.history) == 2


class _RecordWeights(pe.train.Callback):
    def __init__(self):
        self.weights = {}

    def on_epoch_end(self, trainer, record):
        self.weights[record["epoch"]] = {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_early_stopping_stops_and_restores_the_best_weights(dataset, tmp_path):
    # Train loss falls, so with mode="max" the first epoch stays the best and training stops
    # after `patience` epochs without improvement.
    recorder = _RecordWeights()
    trainer = _trainer(dataset, tmp_path, callbacks=[recorder],
                       early_stopping=pe.EarlyStopping(monitor="train_loss", mode="max", patience=2))
    history = trainer.fit(SCHEDULE)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert trainer.early_stopping.best_step == SCHEDULE.steps_per_epoch
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, recorder.weights[1][k])
    assert not torch.equal(recorder.weights[4]["0.weight"], recorder.weights[1]["0.weight"])


def test_early_stopping_state_survives_a_resume(dataset, tmp_path):
    es = pe.EarlyStopping(monitor="train_loss", mode="max", patience=2)
    crashing = _trainer(dataset, tmp_path, early_stopping=es, callbacks=[_CrashAt(epoch=2)])
    with pytest.raises(_Crash):
        crashing.fit(SCHEDULE)
    best = {k: v.clone() for k, v in es.best_weights.items()}
    resumed = _trainer(dataset, tmp_path, early_stopping=pe.EarlyStopping(monitor="train_loss", mode="max",
                                                                          patience=2))
    history = resumed.fit(SCHEDULE)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]  # stopped at the same point as without the crash
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, best[k])


def _nan_on_calls(calls):
    count = {"n": 0}

    def loss_fn(model, batch):
        if not model.training:  # evaluation calls do not count
            return _loss(model, batch)
        count["n"] += 1
        loss = _loss(model, batch)
        return loss * float("nan") if count["n"] in calls else loss

    return loss_fn


def test_nonfinite_loss_raises_with_the_step_and_advice(dataset, tmp_path):
    trainer = _trainer(dataset, tmp_path)
    trainer.loss_fn = trainer.runner.loss_fn = _nan_on_calls({13})
    with pytest.raises(FloatingPointError, match=r"step 13 \(virtual epoch 2\).*learning rate"):
        trainer.fit(SCHEDULE)


def test_nonfinite_loss_can_skip_the_update(dataset, tmp_path):
    trainer = _trainer(dataset, tmp_path, on_nonfinite="skip")
    trainer.loss_fn = trainer.runner.loss_fn = _nan_on_calls({3, 4})
    trainer.fit(SCHEDULE)
    assert trainer.step == SCHEDULE.total_steps
    assert trainer._progress.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_loss_rolls_back_to_the_last_checkpoint_with_a_lower_lr(dataset, tmp_path):
    trainer = _trainer(dataset, tmp_path, on_nonfinite="rollback", nonfinite_lr_factor=0.5)
    base_lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.loss_fn = trainer.runner.loss_fn = _nan_on_calls({25})  # in virtual epoch 3
    with pytest.warns(RuntimeWarning, match="rolled back to step 20"):
        history = trainer.fit(SCHEDULE)
    assert trainer.step == SCHEDULE.total_steps
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]  # epoch 3 was redone, not duplicated
    assert trainer._progress.rollbacks == 1
    assert trainer.scheduler.base_lrs[0] == pytest.approx(base_lr * 0.5)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_rollback_gives_up_after_max_rollbacks(dataset, tmp_path):
    trainer = _trainer(dataset, tmp_path, on_nonfinite="rollback", max_rollbacks=2)
    trainer.loss_fn = trainer.runner.loss_fn = _nan_on_calls(set(range(12, 10_000)))
    with pytest.raises(FloatingPointError, match="already rolled back 2 times"), pytest.warns(RuntimeWarning):
        trainer.fit(SCHEDULE)


def test_warm_start_loads_weights_and_resets_the_optimizer(dataset, tmp_path):
    source = _trainer(dataset, tmp_path / "source")
    source.fit(pe.VirtualEpochs.of_steps(10, 1))
    target = _trainer(dataset, tmp_path / "target")
    assert target.warm_start(tmp_path / "source" / "ckpt") == 10
    for a, b in zip(source.model.state_dict().values(), target.model.state_dict().values()):
        assert torch.equal(a, b)
    assert len(target.optimizer.state) == 0
    target.fit(pe.VirtualEpochs.of_steps(5, 1))
    assert target.step == 5  # training state starts fresh


def test_metrics_csv_matches_the_history_after_a_resume(dataset, tmp_path):
    crashing = _trainer(dataset, tmp_path, log_dir=tmp_path / "logs", callbacks=[_CrashAt(epoch=3)])
    with pytest.raises(_Crash):
        crashing.fit(SCHEDULE)
    resumed = _trainer(dataset, tmp_path, log_dir=tmp_path / "logs")
    history = resumed.fit(SCHEDULE)
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # The crash came after epoch 3 was logged but before its checkpoint: it was logged twice, kept once.
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([r["train_loss"] for r in history])


def test_a_plain_iterable_trains_and_warns_that_resume_is_not_exact(tmp_path):
    torch.manual_seed(0)
    batches = [{"x": torch.randn(16, 8), "y": torch.randint(0, 3, (16,))} for _ in range(4)]
    model = _model()
    trainer = pe.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), _loss, batches,
                         checkpoint_dir=tmp_path, progress=False)
    trainer.fit(pe.VirtualEpochs.of_steps(6, 1))  # re-iterates the list past its end
    assert trainer.step == 6 and math.isfinite(trainer.history[0]["train_loss"])
    with pytest.warns(UserWarning, match="not exact"):
        pe.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), _loss, batches, checkpoint_dir=tmp_path,
                   progress=False).fit(pe.VirtualEpochs.of_steps(6, 2))


def test_bad_arguments_are_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match="rollback"):
        _trainer(dataset, tmp_path, checkpoint_dir=None, on_nonfinite="rollback")
    with pytest.raises(ValueError, match="on_nonfinite"):
        _trainer(dataset, tmp_path, on_nonfinite="ignore")
    with pytest.raises(TypeError, match="VirtualEpochs"):
        _trainer(dataset, tmp_path).fit(100)
    trainer = _trainer(dataset, tmp_path)
    trainer.loss_fn = trainer.runner.loss_fn = lambda m, b: torch.nn.functional.cross_entropy(
        m(b["x"]), b["y"], reduction="none")
    with pytest.raises(ValueError, match="scalar"):
        trainer.fit(SCHEDULE)


def _unfreezing_trainer(dataset, tmp_path, callbacks=()):
    torch.manual_seed(0)
    model = _model()
    head = model[4]
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    unfreezer = pe.transfer.GradualUnfreezer(opt, [model[0:2]], at_epochs=[2], lr=1e-3)
    loader = pe.data.Loader(dataset, batch_size=32, shuffle=True, seed=3, drop_last=True)
    return pe.Trainer(model, opt, _loss, loader, checkpoint_dir=tmp_path / "ckpt", unfreezer=unfreezer,
                      callbacks=callbacks, progress=False)


def test_gradual_unfreezing_happens_on_time_and_survives_a_resume(dataset, tmp_path):
    reference = _unfreezing_trainer(dataset, tmp_path / "ref")
    first_layer = reference.model[0].weight.detach().clone()
    recorder = _RecordWeights()
    reference.callbacks.append(recorder)
    reference.fit(SCHEDULE)
    # Frozen for virtual epochs 1-2 (0-based 0 and 1), trained from the third on.
    assert torch.equal(recorder.weights[2]["0.weight"], first_layer)
    assert not torch.equal(recorder.weights[3]["0.weight"], first_layer)
    assert [g.get("name") for g in reference.optimizer.param_groups] == [None, "unfrozen/0"]

    crashing = _unfreezing_trainer(dataset, tmp_path / "run", callbacks=[_CrashAt(epoch=4)])
    with pytest.raises(_Crash):
        crashing.fit(SCHEDULE)
    resumed = _unfreezing_trainer(dataset, tmp_path / "run")  # a fresh optimizer with one param group
    resumed.fit(SCHEDULE)
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
