"""A small Lightning run checkpointed by PyEngineCheckpointIO, for tests/test_integration_lightning.py.

It always starts with fit(ckpt_path="last"): a fresh run (no last.ckpt yet) starts from
scratch, a killed one resumes. Deterministic on the CPU: one thread, seeded, and dropout,
whose random numbers resume only through the RNG states the plugin stores. The data come
from a pe.data.Loader, resumed mid-epoch through Lightning's stateful-dataloader support.

Prints "resumed from step N" when training starts, "step N" after every training step
(before ModelCheckpoint saves at that step) and "done" once final.ckpt is durable.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from killed_worker_runs import worker_arguments
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import pyengine as pe
from pyengine.integrations.lightning import PyEngineCheckpointIO


class Regressor(L.LightningModule):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(width, 1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Progress(Callback):
    """Reports progress on stdout; the pause gives the test time to kill the run mid-training."""

    def __init__(self, pause: float) -> None:
        self.pause = pause

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(f"resumed from step {trainer.global_step}", flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        print(f"step {trainer.global_step}", flush=True)
        time.sleep(self.pause)


def main() -> None:
    parser = worker_arguments()
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()

    torch.set_num_threads(1)  # the same arithmetic in every run
    L.seed_everything(0, verbose=False)
    model = Regressor()
    loader = pe.data.Loader(args.data, batch_size=16, shuffle=True, seed=0, drop_last=True, threads=1)
    checkpoints = ModelCheckpoint(dirpath=args.dir / "checkpoints", every_n_train_steps=args.every, save_top_k=1,
                                  save_last=True)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, deterministic=True,
                        plugins=[PyEngineCheckpointIO()], callbacks=[Progress(args.pause), checkpoints],
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=loader, ckpt_path="last")
    trainer.save_checkpoint(args.dir / "final.ckpt")
    trainer.strategy.checkpoint_io.teardown()  # final.ckpt is durable once this returns
    print("done", flush=True)


if __name__ == "__main__":
    main()
