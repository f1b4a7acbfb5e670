"""The training process the demo kills: `python -m pyengine.demo.resume_worker --dir D --data P`.

Trains with pe.Trainer and resumes from D on every start; prints "resumed from step N"
when training starts, a line per virtual epoch, and "done" at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import pyengine as pe
from pyengine.demo import synthetic


class _ReportProgress(pe.train.Callback):
    def on_fit_start(self, trainer: pe.Trainer) -> None:
        print(f"resumed from step {trainer.step}", flush=True)

    def on_epoch_end(self, trainer: pe.Trainer, record: dict) -> None:
        print(f"epoch {record['epoch']} step {record['step']}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    dataset = pe.data.Dataset(args.data)
    schedule = pe.VirtualEpochs(len(dataset), stop_point=16.0, batch_size=64, num_checkpoints=args.epochs)
    torch.manual_seed(0)
    model = synthetic.mlp()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=schedule.total_steps)
    trainer = pe.Trainer(
        model,
        opt,
        synthetic.cross_entropy,
        pe.data.Loader(dataset, batch_size=64, shuffle=True, seed=0, drop_last=True),
        scheduler=sched,
        checkpoint_dir=args.dir,
        keep_last=2,
        progress=False,
        callbacks=[_ReportProgress()],
    )
    trainer.fit(schedule)
    print("done", flush=True)


if __name__ == "__main__":
    main()
