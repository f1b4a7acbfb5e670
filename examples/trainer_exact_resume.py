"""The task of plain_loop_exact_resume.py, with pe.Trainer and virtual epochs.

    python examples/trainer_exact_resume.py --dir runs/trainer      # kill it any time; run it again
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import pyengine as pe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_loop_exact_resume import make_dataset, make_model  # noqa: E402


def cross_entropy(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])


class ReportProgress(pe.train.Callback):
    def on_fit_start(self, trainer: pe.Trainer) -> None:
        print(f"resumed from step {trainer.step}", flush=True)

    def on_epoch_end(self, trainer: pe.Trainer, record: dict) -> None:
        print(f"step {record['step']} loss {record['train_loss']:.4f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("runs/trainer"))
    parser.add_argument("--data", type=Path, default=None, help="dataset path (default: DIR/data)")
    parser.add_argument("--epochs", type=int, default=32, help="virtual epochs (one checkpoint each)")
    parser.add_argument("--stop-point", type=float, default=6.25, help="passes over the data")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)

    dataset = make_dataset(args.data or args.dir / "data")
    train = pe.data.Loader(dataset, batch_size=64, shuffle=True, seed=0, drop_last=True)
    schedule = pe.VirtualEpochs(len(dataset), stop_point=args.stop_point, batch_size=64,
                                num_checkpoints=args.epochs)
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=schedule.total_steps)
    trainer = pe.Trainer(model, opt, cross_entropy, train, scheduler=sched, checkpoint_dir=args.dir / "checkpoints",
                         log_dir=args.dir / "logs", progress=False, keep_last=2,
                         callbacks=[ReportProgress()])
    print(f"{schedule.total_steps} steps in {schedule.num_checkpoints} virtual epochs of "
          f"{schedule.steps_per_epoch}", flush=True)
    history = trainer.fit(schedule, resume=True)
    print(f"done: step {trainer.step}, train loss {history[-1]['train_loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
