"""The training task every tuning study of the demo optimises: one trial = one pe.Trainer run.

A trial trains an MLP of the trial's width with Adam at the trial's learning rate on
synthetic.teacher_task for EPOCHS virtual epochs, checkpointing into its own directory
(trial.checkpoint_dir) and reporting each epoch's validation loss to the study. When the
study's pruner stops it, the epoch it stopped at is checkpointed first, so a trial the pruner
promotes later resumes from there instead of training again from scratch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import pyengine as pe
from pyengine.demo import synthetic

EPOCHS = 4  # virtual epochs of a complete trial
BATCH = 64
SPACE = {"lr": pe.tune.LogUniform(1e-4, 1.0), "width": pe.tune.IntUniform(4, 256, log=True),
         "dropout": pe.tune.Uniform(0.0, 0.5)}


def write_data(workdir: Path) -> tuple[pe.data.Dataset, pe.data.Dataset]:
    train = synthetic.write(workdir / "train", *synthetic.teacher_task(2048, seed=30))
    val = synthetic.write(workdir / "val", *synthetic.teacher_task(1024, seed=31))
    return train, val


@dataclass
class Ledger:
    """What the trials of this process did, for the report: epochs trained and where each run began."""

    epochs: dict[int, int] = field(default_factory=dict)  # trial number -> virtual epochs trained here
    started_at: dict[int, list[int]] = field(default_factory=dict)  # trial number -> first epoch of each run
    seconds: float = 0.0


class _ReportToStudy(pe.train.Callback):
    def __init__(self, trial: pe.tune.Trial, ledger: Ledger,
                 progress: Callable[[pe.tune.Trial, int], None] | None) -> None:
        self.trial, self.ledger, self.progress, self.pruned = trial, ledger, progress, False

    def on_fit_start(self, trainer: pe.Trainer) -> None:
        self.ledger.started_at.setdefault(self.trial.number, []).append(len(trainer.history))

    def on_epoch_end(self, trainer: pe.Trainer, record: dict) -> None:
        n = self.trial.number
        self.ledger.epochs[n] = self.ledger.epochs.get(n, 0) + 1
        self.trial.report(record["epoch"], record["val_loss"])
        if self.progress is not None:
            self.progress(self.trial, record["epoch"])
        if self.trial.should_prune():
            # Not raising here: the Trainer checkpoints this epoch after its callbacks, and a
            # promoted trial must resume from it. fit() returns at the end of this epoch.
            self.pruned = trainer.stop_training = True


def make_objective(train: pe.data.Dataset, val: pe.data.Dataset, ledger: Ledger,
                   progress: Callable[[pe.tune.Trial, int], None] | None = None) -> Callable[[pe.tune.Trial], float]:
    """objective(trial) -> the validation loss after EPOCHS virtual epochs (raises TrialPruned when pruned).

    progress(trial, epoch) is called at the end of every virtual epoch, before its checkpoint.
    """
    schedule = pe.VirtualEpochs(len(train), stop_point=EPOCHS / 2, batch_size=BATCH, num_checkpoints=EPOCHS)

    def objective(trial: pe.tune.Trial) -> float:
        t0 = time.perf_counter()
        torch.manual_seed(0)  # the same initial weights for every trial of a width
        width = trial.params["width"]
        model = synthetic.mlp(width=width, dropout=trial.params["dropout"])
        report = _ReportToStudy(trial, ledger, progress)
        trainer = pe.Trainer(
            model, torch.optim.Adam(model.parameters(), lr=trial.params["lr"]), synthetic.cross_entropy,
            pe.data.Loader(train, batch_size=BATCH, shuffle=True, seed=0, drop_last=True),
            val_loader=pe.data.Loader(val, batch_size=len(val), shuffle=False),
            checkpoint_dir=trial.checkpoint_dir, keep_last=1, progress=False, callbacks=[report],
            on_nonfinite="skip",  # a learning rate that diverges is a bad trial, not a crash
        )
        try:
            history = trainer.fit(schedule)
        finally:
            ledger.seconds += time.perf_counter() - t0
        if report.pruned:
            raise pe.tune.TrialPruned()
        return history[-1]["val_loss"]

    return objective
