"""Virtual epochs (Machine Learning Design Patterns, "Checkpoints"): the training budget is
a number of examples, cut into a fixed number of equal checkpoint intervals, so adding
data does not change what an "epoch" costs and checkpoints come at a steady pace."""

from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class VirtualEpochs:
    """steps_per_epoch = int(stop_point * num_training_examples) // (batch_size * num_checkpoints).

    Args:
        num_training_examples: examples in one pass over the training data.
        stop_point: how many passes over the data to train for (may be fractional: 14.3).
        batch_size: examples per step.
        num_checkpoints: virtual epochs; evaluation and a checkpoint end each of them.

    The book's example: 1,000,000 examples, stop point 14.3, batch 128, 32 checkpoints give
    3491 steps per virtual epoch.
    """

    num_training_examples: int
    stop_point: float
    batch_size: int
    num_checkpoints: int

    def __post_init__(self) -> None:
        for name in ("num_training_examples", "batch_size", "num_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.stop_point, numbers.Real) or isinstance(self.stop_point, bool) or not (
            self.stop_point > 0
        ):
            raise ValueError(f"stop_point must be a positive number of passes over the data, got {self.stop_point!r}")
        if self.steps_per_epoch < 1:
            budget = int(self.stop_point * self.num_training_examples)
            raise ValueError(
                f"{budget} training examples cannot fill {self.num_checkpoints} virtual epochs of batch "
                f"{self.batch_size} (0 steps per epoch): lower num_checkpoints or batch_size, or raise stop_point")

    @property
    def steps_per_epoch(self) -> int:
        return int(self.stop_point * self.num_training_examples) // (self.batch_size * self.num_checkpoints)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.num_checkpoints

    @property
    def checkpoint_steps(self) -> range:
        """The steps after which a virtual epoch ends (evaluation and a checkpoint)."""
        return range(self.steps_per_epoch, self.total_steps + 1, self.steps_per_epoch)

    def epoch_of(self, step: int) -> int:
        """The virtual epoch (0-based) that step number `step` (1-based) belongs to."""
        if step < 1:
            raise ValueError(f"steps are counted from 1, got {step}")
        return (step - 1) // self.steps_per_epoch

    def is_epoch_end(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    @classmethod
    def of_steps(cls, steps_per_epoch: int, num_checkpoints: int) -> VirtualEpochs:
        """A schedule given directly in steps (batch size 1 examples per step in the formula)."""
        return cls(steps_per_epoch * num_checkpoints, 1.0, 1, num_checkpoints)
