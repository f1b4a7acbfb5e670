"""Trainer overhead per step against a bare PyTorch loop on the same model, loader and data,
measured side by side (interleaved rounds; these machines are shared and noisy).

    python bench/bench_trainer.py [--steps 100] [--rounds 9] [--width 1024] [--threads N]

The Trainer runs with its defaults (progress bar on, NaN check every step) and without
validation or checkpoints, which the bare loop does not do either; a second row adds the
Trainer's per-epoch asynchronous checkpoints.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pyengine as pe


def _model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 10))


def _loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def bare_loop(loader: pe.data.Loader, width: int, steps: int) -> float:
    model = _model(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = iter(loader)
    t0 = time.perf_counter()
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def trainer_loop(loader: pe.data.Loader, width: int, steps: int, checkpoint_dir: Path | None) -> float:
    model = _model(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = pe.Trainer(model, opt, _loss, loader, checkpoint_dir=checkpoint_dir)
    t0 = time.perf_counter()
    trainer.fit(pe.VirtualEpochs.of_steps(steps_per_epoch=steps // 5, num_checkpoints=5), resume=False)
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        pe.data.write_dataset(Path(tmp) / "ds", {"x": rng.standard_normal((8192, 256)).astype(np.float32),
                                                  "y": rng.integers(0, 10, 8192)})
        loader = pe.data.Loader(pe.data.Dataset(Path(tmp) / "ds"), batch_size=128, shuffle=True, seed=0)
        bare_loop(loader, args.width, 20)  # warm up allocator and threads
        times: dict[str, list[float]] = {"bare": [], "trainer": [], "trainer+ckpt": []}
        for r in range(args.rounds):
            times["bare"].append(bare_loop(loader, args.width, args.steps))
            times["trainer"].append(trainer_loop(loader, args.width, args.steps, None))
            times["trainer+ckpt"].append(trainer_loop(loader, args.width, args.steps, Path(tmp) / f"ck{r}"))
        # The Trainer's own cost per step in absolute terms, where a tiny model makes it visible.
        tiny = {"bare": [], "trainer": []}
        for _ in range(args.rounds):
            tiny["bare"].append(bare_loop(loader, 8, args.steps * 5))
            tiny["trainer"].append(trainer_loop(loader, 8, args.steps * 5, None))
    med = {k: statistics.median(v) for k, v in times.items()}
    tiny_us = 1e6 * (statistics.median(tiny["trainer"]) - statistics.median(tiny["bare"]))
    params = sum(p.numel() for p in _model(args.width).parameters())
    print(f"model: {params / 1e6:.2f}M parameters, batch 128, {torch.get_num_threads()} torch threads, "
          f"{args.steps} steps x {args.rounds} interleaved rounds")
    print(f"bare PyTorch loop                    {med['bare'] * 1e3:8.3f} ms/step")
    for key, label in (("trainer", "pe.Trainer"), ("trainer+ckpt", "pe.Trainer + checkpoint per epoch")):
        overhead = med[key] / med["bare"] - 1
        print(f"{label:<36} {med[key] * 1e3:8.3f} ms/step   overhead {100 * overhead:+.2f}% (target <= 3%)")
    print(f"Trainer's own cost, measured on an 8-wide model: {tiny_us:+.0f} us/step "
          f"(= {tiny_us / 50:.2f}% of a 5 ms step, {tiny_us / 300:.2f}% of a 30 ms step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
