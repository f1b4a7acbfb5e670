"""One optimisation step: forward under autocast, backward (scaled when needed), gradient
clipping, optimizer and scheduler steps. Kept apart from the loop so the loop reads as
phases and a bare PyTorch loop can be compared against it line for line."""

from __future__ import annotations

from typing import Any, Callable

import torch


class StepRunner:
    """Runs steps for one model/optimizer pair.

    Args:
        amp: autocast to bfloat16 on CPU, or to float16 with a GradScaler on CUDA.
        grad_clip: clip the global gradient norm to this value.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], scheduler: Any, device: torch.device,
                 amp: bool, grad_clip: float | None) -> None:
        self.model, self.optimizer, self.loss_fn, self.scheduler = model, optimizer, loss_fn, scheduler
        self.device = device
        self.grad_clip = grad_clip
        self.amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else None
        self.scaler = torch.amp.GradScaler(device.type) if amp and device.type == "cuda" else None

    def forward(self, batch: Any) -> torch.Tensor:
        batch = _to_device(batch, self.device)
        if self.amp_dtype is None:
            return self.loss_fn(self.model, batch)
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            return self.loss_fn(self.model, batch)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


def _to_device(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.dim() else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0])
    return 0
