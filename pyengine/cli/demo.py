"""`pyengine demo`: trains a small model on embedded data with asynchronous checkpoints,
"crashes", resumes from the newest checkpoint into fresh objects, and checks that the
resumed run matches an uninterrupted one bit for bit."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import pyengine as pe


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help="train, checkpoint, crash, resume exactly")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one)")
    p.add_argument("--steps", type=int, default=150, help="training steps")
    p.add_argument("--every", type=int, default=25, help="save a checkpoint every N steps")
    p.set_defaults(run=run)


def _make_data(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    # Two interleaved spirals: small, embedded, and not linearly separable.
    g = torch.Generator().manual_seed(1234)
    t = torch.rand(n, generator=g) * 3 * torch.pi
    label = torch.randint(0, 2, (n,), generator=g)
    r = t / (3 * torch.pi)
    angle = t + label * torch.pi
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1) + 0.02 * torch.randn(n, 2, generator=g)
    return x, label


class _Run:
    """Model, optimizer, schedule and data order: everything a resume must restore."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        torch.manual_seed(0)
        self.x, self.y = x, y
        self.model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                         torch.nn.Dropout(0.1), torch.nn.Linear(64, 2))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-2)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=200)

    def state(self) -> dict:
        return {"model": self.model, "optimizer": self.opt, "scheduler": self.sched}

    def step(self) -> float:
        idx = torch.randint(0, len(self.x), (128,))  # the torch RNG is checkpointed too
        loss = torch.nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.item()


def run(args: argparse.Namespace) -> int:
    x, y = _make_data()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir) if args.dir else Path(tmp) / "checkpoints"
        if root.exists() and any(root.iterdir()):
            print(f"pyengine demo: {root} is not empty; give an empty or new directory")
            return 2
        crash_at = args.steps * 2 // 3 + 3
        print(f"pyengine demo: {args.steps} steps, a checkpoint every {args.every}, a crash at step {crash_at}")
        print(f"checkpoints in {root}\n")

        reference = _Run(x, y)
        for _ in range(args.steps):
            reference.step()

        run1 = _Run(x, y)
        stalls = []
        with pe.Checkpointer(root, keep_last=3) as ckpt:
            for step in range(1, crash_at + 1):
                loss = run1.step()
                if step % args.every == 0:
                    stalls.append(ckpt.save(step, run1.state()).stall_seconds)
                    print(f"  step {step:4d}  loss {loss:.4f}  saved (training paused {stalls[-1] * 1e3:.2f} ms)")
        print(f"\n*** crash at step {crash_at}: every object is thrown away ***\n")
        del run1

        run2 = _Run(x, y)  # fresh model, optimizer and schedule
        with pe.Checkpointer(root, keep_last=3) as ckpt:
            t0 = time.perf_counter()
            resumed = ckpt.restore(run2.state())
            print(f"restored step {resumed} in {(time.perf_counter() - t0) * 1e3:.1f} ms; steps on disk: "
                  f"{ckpt.steps()}")
            for step in range(resumed + 1, args.steps + 1):
                loss = run2.step()
                if step % args.every == 0:
                    ckpt.save(step, run2.state())
            ckpt.wait()
            weights = pe.checkpoint.export_weights(root, root / "model.safetensors")

        exact = all(torch.equal(a, b) for a, b in zip(reference.model.state_dict().values(),
                                                      run2.model.state_dict().values()))
        acc = (reference.model.eval()(x).argmax(1) == y).float().mean().item()
        print(f"finished at step {args.steps}, final loss {loss:.4f}, accuracy {acc:.3f}")
        print(f"weights exported to {weights.name} ({weights.stat().st_size / 1024:.1f} KB)")
        print(f"resumed run identical to the uninterrupted run, bit for bit: {exact}")
        return 0 if exact else 1
