"""Early stopping on a monitored metric, keeping the best weights (checkpointed with the run,
so a resumed run still knows its best)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EarlyStopping:
    """Stops when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    Args:
        monitor: a key of the epoch record, e.g. "val_loss".
        patience: epochs without improvement before stopping.
        mode: "min" or "max".
        min_delta: the smallest change that counts as an improvement.
        restore_best: load the best weights into the model when training ends.
    """

    monitor: str = "val_loss"
    patience: int = 3
    mode: str = "min"
    min_delta: float = 0.0
    restore_best: bool = True
    best_value: float | None = None
    best_step: int | None = None
    bad_epochs: int = 0
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.patience < 0 or self.min_delta < 0:
            raise ValueError("patience and min_delta must be non-negative")

    def update(self, record: dict[str, Any], step: int, model: torch.nn.Module) -> bool:
        """Records one epoch's metrics; returns True when training should stop."""
        if self.monitor not in record:
            raise KeyError(f"early stopping monitors {self.monitor!r}, but the epoch record has only {sorted(record)}; "
                           "pass a val_loader or monitor another metric")
        value = float(record[self.monitor])
        if not math.isfinite(value):
            self.bad_epochs += 1
        elif self.best_value is None or self._improves(value):
            self.best_value, self.best_step, self.bad_epochs = value, step, 0
            self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.bad_epochs > self.patience

    def _improves(self, value: float) -> bool:
        assert self.best_value is not None
        if self.mode == "min":
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_step": self.best_step, "bad_epochs": self.bad_epochs,
                "best_weights": self.best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.bad_epochs, self.best_weights = state["bad_epochs"], state["best_weights"]
