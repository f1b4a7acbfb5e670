"""Demo section: virtual epochs with asynchronous checkpoints, through pe.Trainer."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import pyengine as pe
from pyengine.demo import synthetic
from pyengine.demo.section import Section


def run(workdir: Path, quick: bool) -> Section:
    section = Section("Checkpoints and virtual epochs")
    n = 8192 if quick else 16384
    train = synthetic.write(workdir / "train", *synthetic.teacher_task(n, seed=1))
    val = synthetic.write(workdir / "val", *synthetic.teacher_task(2048, seed=2))
    schedule = pe.VirtualEpochs(num_training_examples=len(train), stop_point=4.0, batch_size=128, num_checkpoints=8)
    section.say(
        f"VirtualEpochs({len(train)} examples, stop_point=4.0, batch 128, 8 checkpoints): "
        f"{schedule.steps_per_epoch} steps per virtual epoch, {schedule.total_steps} steps"
    )
    torch.manual_seed(0)
    model = synthetic.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=schedule.total_steps)
    trainer = pe.Trainer(
        model,
        opt,
        synthetic.cross_entropy,
        pe.data.Loader(train, batch_size=128, shuffle=True, seed=0, drop_last=True),
        val_loader=pe.data.Loader(val, batch_size=1024, shuffle=False),
        scheduler=sched,
        checkpoint_dir=workdir / "checkpoints",
        log_dir=workdir / "logs",
        progress=False,
    )
    t0 = time.perf_counter()
    history = trainer.fit(schedule)
    seconds = time.perf_counter() - t0
    stalls = trainer.checkpoint_stalls
    step_ms = 1e3 * seconds / schedule.total_steps
    section.say(
        f"trained {trainer.step} steps in {seconds:.1f} s ({step_ms:.2f} ms a step); "
        f"val loss {history[0]['val_loss']:.3f} -> {history[-1]['val_loss']:.3f}, "
        f"val accuracy {synthetic.accuracy(model, *synthetic.teacher_task(2048, seed=2)):.3f}"
    )
    section.say(
        f"{len(stalls)} checkpoints of {_mb(workdir / 'checkpoints'):.1f} MB each; training paused "
        f"{1e3 * sum(stalls) / len(stalls):.2f} ms a save on average (the write runs in C++ threads), "
        f"{100 * sum(stalls) / seconds:.2f}% of the run"
    )

    def draw(ax) -> None:
        epochs = [r["epoch"] for r in history]
        ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
        ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="val loss")
        ax.set_xlabel(f"virtual epoch ({schedule.steps_per_epoch} steps; a checkpoint at each end)")
        ax.set_ylabel("cross-entropy")
        ax.legend()

    section.figures.append(("virtual_epochs.png", draw))
    return section


def _mb(directory: Path) -> float:
    steps = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-"))
    return sum(f.stat().st_size for f in steps[-1].iterdir()) / 1e6
