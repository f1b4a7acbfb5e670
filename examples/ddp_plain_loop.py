"""One script, one process or many: a plain PyTorch loop with a pe.distributed strategy and
rank-sharded checkpoints.

    python examples/ddp_plain_loop.py --dir runs/ddp                                # one process
    torchrun --standalone --nproc-per-node 2 examples/ddp_plain_loop.py --dir runs/ddp   # two ranks
    torchrun --standalone --nproc-per-node 2 examples/ddp_plain_loop.py --strategy fsdp --dir runs/fsdp

Stop it and run it again (with any number of ranks): it resumes from the newest committed
checkpoint. Model and optimizer restore at any world size; the loader's position is kept
per rank and restores only at the world size it was saved with (it says so otherwise).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import pyengine as pe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="runs/ddp-example")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "local_sgd"])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    pe.distributed.init()  # a no-op under plain python
    rank, world = pe.distributed.rank(), pe.distributed.world_size()
    data = Path(tempfile.gettempdir()) / "pyengine-ddp-example-data"
    if pe.distributed.is_main() and not data.exists():
        rng = np.random.default_rng(0)
        x = rng.standard_normal((8192, 32)).astype(np.float32)
        pe.data.write_dataset(data, {"x": x, "y": (x @ rng.standard_normal((32, 1))).astype(np.float32)})
    pe.distributed.barrier()

    torch.manual_seed(0)  # every rank builds the same initial model
    strategy = pe.distributed.make_strategy(args.strategy)
    model = strategy.wrap(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # after wrap: FSDP shards the parameters
    loader = pe.data.Loader(pe.data.Dataset(data), batch_size=64 // world, shuffle=True, seed=0,
                            drop_last=True, infinite=True, rank=rank, world_size=world)

    with pe.Checkpointer(args.dir, keep_last=2) as ckpt:   # every rank opens it and saves its part
        state = {"model": model, "optimizer": opt}
        step = ckpt.restore(state) or 0
        batches = iter(loader)
        while step < args.steps:
            batch = next(batches)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
            loss.backward()
            opt.step()
            strategy.after_optimizer_step()
            step += 1
            if step % 50 == 0:
                ckpt.save(step, state)   # returns after the snapshot; rank 0 commits when all parts are durable
                if pe.distributed.is_main():
                    print(f"step {step}  loss {loss.item():.4f}  ranks {world}")
    pe.distributed.destroy()


if __name__ == "__main__":
    main()
