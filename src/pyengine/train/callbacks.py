"""Hooks into Trainer.fit. Subclass Callback and override what you need; a callback that
has state_dict / load_state_dict is checkpointed with the run and restored on resume."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyengine.train.trainer import Trainer


class Callback:
    """Every method is called on the training thread; set `trainer.stop_training = True` to stop."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After resuming (trainer.step is the step training continues from)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first step of virtual epoch `epoch` (0-based), also right after a resume."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After evaluation and early stopping, before the epoch's checkpoint is saved."""

    def on_fit_end(self, trainer: Trainer, history: list[dict[str, Any]]) -> None:
        """After the last checkpoint is durable."""
