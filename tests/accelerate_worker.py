"""A small Accelerate loop checkpointed by AcceleratorCheckpointer, for tests/test_integration_accelerate.py.

It always starts with restore(): a fresh run (no checkpoint yet) starts from scratch, a killed
one resumes from the newest checkpoint that verifies. Deterministic on the CPU: one thread,
seeded, and dropout, whose random numbers resume only through the stored RNG states. The data
come from a pe.data.Loader registered for checkpointing, so a resumed run continues mid-epoch.
Gradients are accumulated over 2 batches, so saves happen only at optimizer steps.

Prints "resumed from step N" before the first batch, "step N" after every optimizer step
(before the checkpoint for that step is saved) and "done" once the final state is durable in
DIR/final. A plain torch model keeps the start-up short (no transformers import).
"""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from killed_worker_runs import worker_arguments

import pyengine as pe
from pyengine.integrations.accelerate import AcceleratorCheckpointer

EPOCHS = 4
ACCUMULATION = 2


def main() -> None:
    args = worker_arguments().parse_args()

    torch.set_num_threads(1)  # the same arithmetic in every run
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    loader = pe.data.Loader(args.data, batch_size=16, shuffle=True, seed=0, drop_last=True, threads=1)
    accelerator.register_for_checkpointing(loader)
    checkpoints = AcceleratorCheckpointer(accelerator, args.dir / "checkpoints", keep_last=2,
                                          policy=pe.checkpoint.Every(steps=args.every))
    step = checkpoints.restore() or 0
    print(f"resumed from step {step}", flush=True)

    while loader.epoch < EPOCHS:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
                accelerator.backward(loss)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                print(f"step {step}", flush=True)
                checkpoints.maybe_save(step)
                time.sleep(args.pause)  # gives the test time to kill the run mid-training
    checkpoints.close()

    with AcceleratorCheckpointer(accelerator, args.dir / "final") as final:
        final.save(step)
    print("done", flush=True)


if __name__ == "__main__":
    main()
