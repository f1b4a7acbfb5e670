"""The one model and data set that every distribution strategy of the demo trains.

Labels come from synthetic.teacher_task (8 classes of 32-dimensional inputs); the model is a
3-layer MLP without BatchNorm, whose running statistics would differ from rank to rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pyengine.demo import synthetic

WIDTH = 128
PER_RANK_BATCH = 32  # the global batch is 64 on two ranks
LR = 2e-3
LOCAL_SGD_PERIOD = 8


def write_data(out: Path) -> Path:
    synthetic.write(out / "train", *synthetic.teacher_task(8192, seed=20))
    return out / "train"


def validation_set() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = synthetic.teacher_task(2048, seed=21)
    return torch.from_numpy(x), torch.from_numpy(y)


def make_model() -> torch.nn.Module:
    """The same initial weights on every call (and so on every rank)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, 8),
    )  # fmt: skip


@torch.no_grad()
def evaluate(weights: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(cross-entropy, accuracy) of `weights` in a plain model on the validation set."""
    model = make_model()
    model.load_state_dict(weights)
    x, y = validation_set()
    logits = model(x)
    return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
