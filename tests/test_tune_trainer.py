"""Tuning a Trainer's learning rate and width (examples/tune_trainer.py) finds a better
configuration than the study's first one, and each trial checkpoints into its own directory."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import tune_trainer  # noqa: E402


def test_a_study_tunes_a_trainer(tmp_path):
    study = tune_trainer.main(["--dir", str(tmp_path), "--trials", "8"])
    done = [t for t in study.trials if t.value is not None]
    assert len(study.trials) == 8 and done
    assert study.best_value <= done[0].value
    assert study.best_value < 0.05  # the target's variance is ~0.13: a tuned MLP fits it well
    assert set(study.best_params) == {"lr", "width"}
    assert any((tmp_path).rglob("step-*")), "trials checkpoint through the Trainer"


def test_a_trial_pruned_at_the_end_of_an_epoch_keeps_that_epoch(tmp_path):
    # The Trainer ran callbacks before the epoch's checkpoint, so a TrialPruned raised in
    # on_epoch_end skipped it, and a trial promoted later trained that epoch again.
    import torch

    import pyengine as pe

    train, val = tune_trainer.make_datasets(tmp_path / "data")

    class PruneAtEpoch(pe.train.Callback):
        def on_epoch_end(self, trainer, record):
            if record["epoch"] == 2:
                raise pe.tune.TrialPruned()

    def trainer(callbacks):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        return pe.Trainer(
            model, torch.optim.Adam(model.parameters(), lr=1e-2),
            lambda m, b: torch.nn.functional.mse_loss(m(b["x"]), b["y"]),
            pe.data.Loader(train, batch_size=64, shuffle=True, seed=0),
            val_loader=pe.data.Loader(val, batch_size=512, shuffle=False),
            checkpoint_dir=tmp_path / "ckpt", keep_last=1, progress=False, callbacks=callbacks)

    schedule = pe.VirtualEpochs(len(train), stop_point=4, batch_size=64, num_checkpoints=4)
    first = trainer([PruneAtEpoch()])
    try:
        first.fit(schedule)
        raise AssertionError("the callback's TrialPruned did not end fit()")
    except pe.tune.TrialPruned:
        pass
    class Epochs(pe.train.Callback):
        trained: list[int] = []

        def on_epoch_end(self, trainer, record):
            self.trained.append(record["epoch"])

    resumed = trainer([Epochs()])
    history = resumed.fit(schedule)
    assert Epochs.trained == [3, 4], "the resumed trial trained the pruned epoch again"
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
