"""pe.data.Loader + pe.Checkpointer in a plain PyTorch loop, with exact resume (no Trainer).

    python examples/plain_loop_exact_resume.py --dir runs/plain     # kill it any time; run it again

The state saved every `--every` steps is everything the next steps depend on: weights
(with BatchNorm statistics), Adam moments, the learning-rate schedule, the loader's
position and the RNG states (dropout draws from torch's). So a run that is killed and
resumed, however often, ends with exactly the weights of a run that never stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import pyengine as pe


def make_dataset(path: Path, n: int = 8192, dim: int = 32, seed: int = 0) -> pe.data.Dataset:
    """Synthetic 4-class data: labels from a fixed random linear map of the inputs."""
    if not path.exists():
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, dim)).astype(np.float32)
        y = np.argmax(x @ rng.standard_normal((dim, 4)), axis=1).astype(np.int64)
        pe.data.write_dataset(path, {"x": x, "y": y})
    return pe.data.Dataset(path)


def make_model(dim: int = 32) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.BatchNorm1d(256), torch.nn.ReLU(),
                               torch.nn.Dropout(0.1), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("runs/plain-loop"))
    parser.add_argument("--data", type=Path, default=None, help="dataset path (default: DIR/data)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)

    dataset = make_dataset(args.data or args.dir / "data")
    loader = pe.data.Loader(dataset, batch_size=64, shuffle=True, seed=0, drop_last=True)
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader}

    with pe.Checkpointer(args.dir / "checkpoints", keep_last=2) as ckpt:
        step = ckpt.restore(state) or 0
        print(f"resumed from step {step}", flush=True)
        batches = iter(loader)
        while step < args.steps:
            try:
                batch = next(batches)
            except StopIteration:  # the loader moves on to its next epoch by itself
                batches = iter(loader)
                continue
            loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % args.every == 0:
                ckpt.save(step, state)
                print(f"step {step} loss {loss.item():.4f}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
