"""Refuses to train a wrapped model whose set of trainable parameters changed after wrapping.

DDP registers for all-reduce only the parameters that require grad when it is built, and
FSDP groups them when it shards; a parameter unfrozen later would train on each rank's own
gradient and the replicas would silently diverge (Lightning #20340). The guard checks the
set on every forward and raises instead; re-wrap (DataParallel.rewrap / the Trainer does it
at epoch starts) to train the new set.
"""

from __future__ import annotations

from typing import Any

import torch


class TrainableSetChanged(RuntimeError):
    """Parameters were frozen or unfrozen after the model was wrapped for distribution."""


def trainable_names(module: torch.nn.Module) -> frozenset[str]:
    return frozenset(name for name, p in module.named_parameters() if p.requires_grad)


class TrainableGuard:
    """Forward pre-hook on `wrapper` comparing `inner`'s trainable set with the one at wrap time."""

    def __init__(self, wrapper: torch.nn.Module, inner: torch.nn.Module, strategy: str) -> None:
        self.inner = inner
        self.strategy = strategy
        self.expected = trainable_names(inner)
        self._handle = wrapper.register_forward_pre_hook(self._check)

    def _check(self, _module: torch.nn.Module, _args: Any) -> None:
        if not torch.is_grad_enabled():
            return  # evaluation never reduces gradients
        now = trainable_names(self.inner)
        if now != self.expected:
            added, removed = sorted(now - self.expected), sorted(self.expected - now)
            raise TrainableSetChanged(
                f"the trainable parameters changed after the model was wrapped for {self.strategy!r} "
                f"(unfrozen: {added[:5]}{'...' if len(added) > 5 else ''}, frozen: {removed[:5]}"
                f"{'...' if len(removed) > 5 else ''}); their gradients would not be synchronised and the "
                "replicas would diverge. Re-wrap after changing requires_grad (strategy.rewrap(), which "
                "pe.Trainer does at each epoch start).")

    def remove(self) -> None:
        self._handle.remove()
