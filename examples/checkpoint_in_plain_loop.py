"""pe.Checkpointer inside a plain PyTorch loop: no Trainer, nothing else changed.

    python examples/checkpoint_in_plain_loop.py --dir runs/example     # run it, Ctrl-C it, run it again

Each run resumes from the newest checkpoint that verifies and continues exactly where the
last one stopped: weights, Adam moments, learning-rate schedule and RNG states included.
"""

from __future__ import annotations

import argparse

import torch

import pyengine as pe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="runs/checkpoint-example")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(4096, 32)
    y = x @ torch.randn(32, 1) + 0.1 * torch.randn(4096, 1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    state = {"model": model, "optimizer": opt, "scheduler": sched}

    with pe.Checkpointer(args.dir, keep_last=3) as ckpt:
        start = ckpt.restore(state) or 0  # None when the directory holds no checkpoint yet
        print(f"starting at step {start}")
        for step in range(start + 1, args.steps + 1):
            idx = torch.randint(0, len(x), (128,))
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                # Returns once the state is copied (milliseconds); the write runs in C++ threads.
                ckpt.save(step, state)
                print(f"step {step}: loss {loss.item():.4f}, checkpoint saved")
    # Leaving the `with` block waits until every checkpoint is durable.


if __name__ == "__main__":
    main()
