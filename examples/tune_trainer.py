"""Tune a pe.Trainer's learning rate and width in a few lines.

    python examples/tune_trainer.py --trials 12

Each trial is a Trainer run with its own checkpoint directory (trial.checkpoint_dir); the
validation loss of every virtual epoch is reported to the study, which may prune the trial
(ASHA pauses it there; a promoted trial resumes from its checkpoint, not from scratch).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import pyengine as pe

SPACE = {"lr": pe.tune.LogUniform(1e-4, 1e-1), "width": pe.tune.IntUniform(8, 256, log=True)}


def make_datasets(root: Path) -> tuple[pe.data.Dataset, pe.data.Dataset]:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3072, 8)).astype(np.float32)
    y = (np.sin(3 * x[:, :1]) * x[:, 1:2] + 0.5 * x[:, 2:3] ** 2).astype(np.float32)
    if not (root / "train").exists():
        pe.data.write_dataset(root / "train", {"x": x[:2048], "y": y[:2048]})
        pe.data.write_dataset(root / "val", {"x": x[2048:], "y": y[2048:]})
    return pe.data.Dataset(root / "train"), pe.data.Dataset(root / "val")


class ReportToStudy(pe.train.Callback):
    """Reports each virtual epoch's validation loss; stops the trial when the pruner says so."""

    def __init__(self, trial: pe.tune.Trial) -> None:
        self.trial = trial

    def on_epoch_end(self, trainer: pe.Trainer, record: dict) -> None:
        self.trial.report(record["epoch"], record["val_loss"])
        if self.trial.should_prune():
            raise pe.tune.TrialPruned()


def make_objective(train: pe.data.Dataset, val: pe.data.Dataset, epochs: int = 6):
    def objective(trial: pe.tune.Trial) -> float:
        torch.manual_seed(trial.number)
        width = trial.params["width"]
        model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        trainer = pe.Trainer(
            model, torch.optim.Adam(model.parameters(), lr=trial.params["lr"]),
            lambda m, b: torch.nn.functional.mse_loss(m(b["x"]), b["y"]),
            pe.data.Loader(train, batch_size=64, shuffle=True, seed=trial.number),
            val_loader=pe.data.Loader(val, batch_size=512, shuffle=False),
            checkpoint_dir=trial.checkpoint_dir, keep_last=1, progress=False, callbacks=[ReportToStudy(trial)])
        history = trainer.fit(pe.VirtualEpochs(len(train), stop_point=epochs, batch_size=64, num_checkpoints=epochs))
        return history[-1]["val_loss"]

    return objective


def main(argv: list[str] | None = None) -> pe.tune.Study:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where data, study and checkpoints go")
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="pe-tune-"))
    root.mkdir(parents=True, exist_ok=True)
    train, val = make_datasets(root)
    study = pe.tune.Study(SPACE, direction="minimize", sampler="bayes", storage=str(root / "study.db"), seed=0)
    study.optimize(make_objective(train, val), n_trials=args.trials)
    print(f"best validation MSE {study.best_value:.5f} with {study.best_params}")
    return study


if __name__ == "__main__":
    main()
