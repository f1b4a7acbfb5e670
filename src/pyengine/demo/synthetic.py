"""Embedded data for the demo: nothing is downloaded.

Labels come from a fixed random "teacher" network, so the task is nonlinear but exactly
reproducible from a seed; a domain-shifted variant keeps the labels and moves the inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import pyengine as pe


def teacher_task(
    n: int,
    *,
    dim: int = 32,
    classes: int = 8,
    seed: int = 0,
    label_noise: float = 0.0,
    shift: float = 0.0,
    teacher_seed: int = 1234,
    hidden: int = 64,
    readout_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs x ~ N(0, I) (then shifted) labelled by argmax of a random 2-layer network of x.

    Args:
        hidden: the teacher's hidden units: the features tanh(x @ w1) every task of this
            teacher shares.
        readout_seed: draws the teacher's readout (hidden -> classes) from this seed instead:
            another task on the same hidden features, as a transfer-learning target.
        shift: strength of the domain shift applied to the inputs after labelling: a random
            rotation-like mixing plus an offset, both scaled by `shift`. The labels stay those
            of the unshifted inputs, so the task is the same and only the inputs move.
        label_noise: fraction of labels replaced by random ones.
    """
    teacher = np.random.default_rng(teacher_seed)
    w1 = teacher.standard_normal((dim, hidden)) / np.sqrt(dim)
    w2 = teacher.standard_normal((hidden, classes)) / 8.0
    if readout_seed is not None:
        w2 = np.random.default_rng(readout_seed).standard_normal((hidden, classes))
    mix = np.eye(dim) + shift * teacher.standard_normal((dim, dim)) / np.sqrt(dim)
    offset = shift * teacher.standard_normal(dim)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    if label_noise > 0:
        noisy = rng.random(n) < label_noise
        y[noisy] = rng.integers(0, classes, int(noisy.sum()))
    if shift:
        x = x @ mix + offset
    return x.astype(np.float32), y.astype(np.int64)


def write(path: Path, x: np.ndarray, y: np.ndarray) -> pe.data.Dataset:
    if not path.exists():
        pe.data.write_dataset(path, {"x": x, "y": y})
    return pe.data.Dataset(path)


def mlp(dim: int = 32, classes: int = 8, width: int = 128, dropout: float = 0.1) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(dim, width),
        torch.nn.BatchNorm1d(width),
        torch.nn.ReLU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, classes),
    )


def cross_entropy(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    was_training = model.training
    model.eval()
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    model.train(was_training)
    return float((pred == y).mean())
