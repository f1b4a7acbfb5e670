"""Demo section: early stopping on a small, noisy training set that a wide model overfits."""

from __future__ import annotations

from pathlib import Path

import torch

import pyengine as pe
from pyengine.demo import synthetic
from pyengine.demo.section import Section


class _ValAccuracy(pe.train.Callback):
    def __init__(self, x, y) -> None:
        self.x, self.y = x, y
        self.curve: list[float] = []

    def on_epoch_end(self, trainer: pe.Trainer, record: dict) -> None:
        self.curve.append(synthetic.accuracy(trainer.model, self.x, self.y))


def run(workdir: Path, quick: bool) -> Section:
    section = Section("Early stopping")
    train = synthetic.write(workdir / "train", *synthetic.teacher_task(512, seed=4, label_noise=0.3))
    val_x, val_y = synthetic.teacher_task(2048, seed=5)
    val = synthetic.write(workdir / "val", val_x, val_y)
    schedule = pe.VirtualEpochs(len(train), stop_point=60.0, batch_size=64, num_checkpoints=30)
    torch.manual_seed(0)
    model = synthetic.mlp(width=512, dropout=0.0)
    accuracy = _ValAccuracy(val_x, val_y)
    stopper = pe.EarlyStopping(monitor="val_loss", patience=3)
    trainer = pe.Trainer(
        model,
        torch.optim.Adam(model.parameters(), lr=2e-3),
        synthetic.cross_entropy,
        pe.data.Loader(train, batch_size=64, shuffle=True, seed=0, drop_last=True),
        val_loader=pe.data.Loader(val, batch_size=1024, shuffle=False),
        checkpoint_dir=workdir / "checkpoints",
        early_stopping=stopper,
        callbacks=[accuracy],
        progress=False,
    )
    history = trainer.fit(schedule)
    best_epoch = schedule.epoch_of(stopper.best_step) + 1
    section.say(
        f"512 training examples with 30% wrong labels, a 512-wide MLP: validation loss was best at virtual "
        f"epoch {best_epoch} ({stopper.best_value:.3f}) and rose to {history[-1]['val_loss']:.3f}; training "
        f"stopped at epoch {len(history)} of {schedule.num_checkpoints} (patience 3)"
    )
    section.say(
        f"best weights restored: val accuracy {synthetic.accuracy(model, val_x, val_y):.3f} "
        f"(it was {accuracy.curve[-1]:.3f} when training stopped)"
    )
    section.ok = len(history) < schedule.num_checkpoints

    def draw(ax) -> None:
        epochs = [r["epoch"] for r in history]
        ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
        ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="val loss")
        ax.axvline(best_epoch, color="k", linestyle="--", label="best (restored)")
        ax.set_xlabel("virtual epoch")
        ax.set_ylabel("cross-entropy")
        ax.legend()

    section.figures.append(("early_stopping.png", draw))
    return section
