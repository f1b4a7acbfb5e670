"""Tune the learning rate, width and activation of a model trained in a plain PyTorch loop.

    python examples/tune_plain_loop.py --storage runs/tune.db --trials 20 --workers 2

Each trial trains an MLP for up to --epochs epochs, checkpointing every epoch into its own
directory (trial.checkpointer()). ASHA pauses unpromising trials at epochs 1, 3, 9, ... and
may promote them later: a promoted trial restores its checkpoint and continues; it never
repeats an epoch. Kill the script and run it again: the study continues where it stopped,
and the trial that was running resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

import pyengine as pe

SPACE = {
    "lr": pe.tune.LogUniform(1e-4, 1e-1),
    "width": pe.tune.IntUniform(16, 256, log=True),
    "act": pe.tune.Choice(["relu", "tanh"]),
}


def make_data(seed: int = 0, n: int = 2048) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 8, generator=g) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * x[:, 1:2] + 0.5 * x[:, 2:3] ** 2 + 0.05 * torch.randn(n, 1, generator=g)
    split = n * 3 // 4
    return x[:split], y[:split], x[split:], y[split:]


def make_objective(epochs: int = 9, batch_size: int = 64) -> Callable[[pe.tune.Trial], float]:
    """An objective(trial) -> validation MSE, training for up to `epochs` epochs."""
    x_train, y_train, x_val, y_val = make_data()

    def objective(trial: pe.tune.Trial) -> float:
        p = trial.params
        torch.manual_seed(trial.number)  # the initial weights; the checkpoint carries the RNG from here on
        act = torch.nn.ReLU() if p["act"] == "relu" else torch.nn.Tanh()
        model = torch.nn.Sequential(torch.nn.Linear(8, p["width"]), act, torch.nn.Linear(p["width"], 1))
        opt = torch.optim.AdamW(model.parameters(), lr=p["lr"])
        state = {"model": model, "optimizer": opt}
        with trial.checkpointer(keep_last=1) as ckpt:
            start = ckpt.restore(state) or 0  # > 0 when the trial was paused and promoted, or its worker died
            for epoch in range(start + 1, epochs + 1):
                for idx in torch.randperm(len(x_train)).split(batch_size):
                    loss = torch.nn.functional.mse_loss(model(x_train[idx]), y_train[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                with torch.no_grad():
                    val = torch.nn.functional.mse_loss(model(x_val), y_val).item()
                ckpt.save(epoch, state).wait()  # before should_prune: a paused trial resumes from here
                trial.report(epoch, val)
                if trial.should_prune():
                    raise pe.tune.TrialPruned()
        return val

    return objective


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", default="runs/tune-plain-loop.db")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=9)
    args = parser.parse_args()
    study = pe.tune.Study(
        SPACE,
        direction="minimize",
        sampler="bayes",
        storage=args.storage,
        seed=0,
        pruner=pe.tune.ASHAPruner(min_resource=1, reduction_factor=3, max_resource=args.epochs),
    )
    study.optimize(make_objective(args.epochs), n_trials=args.trials, n_workers=args.workers)
    states = [t.state.value for t in study.trials]
    print({s: states.count(s) for s in sorted(set(states))})
    print(f"best validation MSE {study.best_value:.4f} with {study.best_params}")


if __name__ == "__main__":
    main()
