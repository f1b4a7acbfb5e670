"""The training runs the preemption tests signal: a plain loop under pe.checkpoint.PreemptionGuard
and a pe.Trainer with on_preemption="save" (also under DDP), on a small regression task whose
state is everything the next step depends on (weights, AdamW moments, a step schedule, the
loader's position, dropout's RNG).

Each run reports what it does through `say(line)`: "resumed N" once it has restored (0 on a fresh
start) and the guard is active, "step N" after each step and its stop_requested() (the Trainer:
"step" as each begins),
"stopped N" when a signal ended it with checkpoint N durable, "done" when it trained to the end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from faulty_storage import inject

import pyengine as pe
from pyengine.checkpoint.storage import FileSystemStorage

Say = Callable[[str], None]

SAMPLES, FEATURES = 512, 16
STEPS_PER_EPOCH = 16  # 512 samples in batches of 32 (in a 2-rank world: 2 x 16 per step)
SAVE_EVERY = 8  # the plain loop's own checkpoints


def write_data(path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((SAMPLES, FEATURES)).astype(np.float32)
    y = (np.tanh(x @ rng.standard_normal((FEATURES, 1))) + 0.1 * rng.standard_normal((SAMPLES, 1))).astype(np.float32)
    pe.data.write_dataset(path, {"x": x, "y": y})
    return path


def make_training(data: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, object, pe.data.Loader]:
    """Model (~70k parameters, so that a save takes a few milliseconds), AdamW, schedule, loader."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 256), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
    world = pe.distributed.world_size()
    loader = pe.data.Loader(pe.data.Dataset(data), 32 // world, shuffle=True, seed=1, drop_last=True,
                            rank=pe.distributed.rank(), world_size=world)
    return model, opt, sched, loader


def mse(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def plain_run(run_dir: Path, data: Path, total: int, say: Say, *, pause: float = 0.0, grace: float = 30.0,
              stall_saves_after: int | None = None, stall_seconds: float = 0.8) -> None:
    """A plain loop: a checkpoint every SAVE_EVERY steps and at the end; `pause` seconds of idle
    "compute" in each step, so that a signal can land anywhere in one."""
    model, opt, sched, loader = make_training(data)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader}
    with pe.Checkpointer(run_dir, keep_last=3) as ckpt:
        if stall_saves_after is not None:
            stall_saves(ckpt, after_step=stall_saves_after, seconds=stall_seconds, say=say)
        step = ckpt.restore(state) or 0
        with pe.checkpoint.PreemptionGuard(ckpt, state, grace_seconds=grace) as guard:
            say(f"resumed {step}")
            batches = iter(loader)
            try:
                while step < total:
                    try:
                        batch = next(batches)
                    except StopIteration:  # the loader moves on to its next epoch by itself
                        batches = iter(loader)
                        continue
                    time.sleep(pause)
                    loss = mse(model, batch)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    if step % SAVE_EVERY == 0 or step == total:
                        ckpt.save(step, state)
                    guard.stop_requested(step)
                    say(f"step {step}")  # after the call: a signal sent on reading this lands in the next step
            except SystemExit:
                say(f"stopped {guard.stop_step}")
                raise
    say("done")


class _ReportProgress(pe.train.Callback):
    def __init__(self, say: Say) -> None:
        self.say = say

    def on_fit_start(self, trainer: pe.Trainer) -> None:
        self.say(f"resumed {trainer.step}")


def trainer_run(run_dir: Path, data: Path, epochs: int, say: Say, *, pause: float = 0.0,
                strategy: str | None = None, grace: float = 30.0) -> pe.Trainer:
    """pe.Trainer(on_preemption="save"): a checkpoint (overlapped) and an evaluation every virtual epoch."""
    model, opt, sched, loader = make_training(data)
    val = pe.data.Loader(pe.data.Dataset(data), 64, shuffle=False, drop_last=False)

    def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        if model.training:  # not during evaluation
            say("step")
            time.sleep(pause)
        return mse(model, batch)

    class _ReportSteps(_ReportProgress):
        def on_epoch_end(self, trainer: pe.Trainer, record: dict) -> None:
            self.say(f"epoch {record['epoch']}")

    trainer = pe.Trainer(model, opt, loss_fn, loader, val_loader=val, scheduler=sched, checkpoint_dir=run_dir,
                         callbacks=[_ReportSteps(say)], progress=False, keep_last=2, strategy=strategy,
                         on_preemption="save", preemption_grace_seconds=grace)
    schedule = pe.VirtualEpochs.of_steps(STEPS_PER_EPOCH, epochs)
    try:
        trainer.fit(schedule)
    except SystemExit:
        say(f"stopped {trainer.step}")
        raise
    say("done")
    return trainer


class _StallingStorage(FileSystemStorage):
    """The real storage, except that a part of a step after `after_step` is reported durable only
    after `seconds` (an NFS server that stops answering): the final checkpoint stalls."""

    def __init__(self, root: Path, after_step: int, seconds: float, say: Say) -> None:
        super().__init__(root)
        self.after_step, self.seconds, self.say = after_step, seconds, say

    def finish_part(self, writer, save_id, part, tmp) -> None:
        super().finish_part(writer, save_id, part, tmp)
        step = int(tmp.name.split(".")[0].removeprefix("step-"))
        if step > self.after_step:
            self.say(f"stalling {step}")
            time.sleep(self.seconds)


def stall_saves(ckpt: pe.Checkpointer, after_step: int, seconds: float, say: Say) -> None:
    inject(ckpt, _StallingStorage(ckpt.directory, after_step, seconds, say))


def final_state(run_dir: Path) -> tuple[int | None, dict]:
    """The newest checkpoint's step and contents, without the Trainer's wall-clock figures."""
    with pe.Checkpointer(run_dir) as ckpt:
        step = ckpt.latest_step()
        state = ckpt.load() if step is not None else {}
    for record in state.get("trainer", {}).get("history", []):
        record.pop("samples_per_s", None)
        record.pop("seconds", None)
    return step, state
