"""One optimisation step: forward under autocast, backward (scaled when needed), gradient
clipping, optimizer and scheduler steps. Kept apart from the loop so the loop reads as
phases and a bare PyTorch loop can be compared against it line for line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Callable, cast

import torch
import torch.distributed as dist

from pyengine.distributed.pipeline_parallel import PipelineParallel
from pyengine.distributed.process_group import is_distributed


class StepRunner:
    """Runs steps for one model/optimizer pair.

    Args:
        amp: autocast to bfloat16 on CPU, or to float16 with a GradScaler on CUDA.
        grad_clip: clip the global gradient norm to this value.
        pipeline: the model is this pipeline's stage: the loss is the pipeline's, the forward and
            backward run together (pipeline_forward_backward), and the gradient norm is global
            across the stages.

    Raises:
        ValueError: for amp with a GradScaler (CUDA) under a pipeline, which runs the backward
            inside its schedule where the loss cannot be scaled.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None, scheduler: Any,
                 device: torch.device, amp: bool, grad_clip: float | None,
                 pipeline: PipelineParallel | None = None) -> None:
        self.model, self.optimizer, self.loss_fn, self.scheduler = model, optimizer, loss_fn, scheduler
        self.device = device
        self.grad_clip = grad_clip
        self.pipeline = pipeline
        self.amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else None
        self.scaler = torch.amp.GradScaler(device.type) if amp and device.type == "cuda" else None
        if pipeline is not None and self.scaler is not None:
            raise ValueError("amp=True on CUDA scales the loss (float16 GradScaler) before backward, but a pipeline "
                             "runs the backward inside its schedule: train the pipeline with amp=False")

    def forward(self, batch: Any) -> torch.Tensor:
        """loss_fn(model, batch), under autocast when amp is on."""
        assert self.loss_fn is not None, "a pipeline has no loss_fn(model, batch): use pipeline_forward_backward"
        batch = _to_device(batch, self.device)
        with self._autocast():
            return self.loss_fn(self.model, batch)

    def pipeline_forward_backward(self, batch: Any) -> torch.Tensor:
        """Zeroes the gradients, then runs the pipeline's forward and backward of `batch`.

        Returns:
            The loss, broadcast from the last stage: the same float64 scalar on every rank.
        """
        assert self.pipeline is not None
        inputs, target = self.pipeline.split_batch(_to_device(batch, self.device))
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.pipeline.step(inputs, target, loss_on_every_rank=True)
        assert loss is not None
        return loss

    def eval_loss(self, batch: Any) -> torch.Tensor:
        """The batch's loss without gradients (call under torch.no_grad()); the same on every
        rank under a pipeline."""
        if self.pipeline is None:
            return self.forward(batch)
        inputs, target = self.pipeline.split_batch(_to_device(batch, self.device))
        with self._autocast():
            loss = self.pipeline.evaluate(inputs, target, loss_on_every_rank=True)
        assert loss is not None
        return loss

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self.optimizer_step()

    def optimizer_step(self) -> None:
        """Clips the gradients already in .grad, then steps the optimizer and the scheduler."""
        if self.scaler is not None:
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.grad_clip is not None:
                self._clip()
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def _clip(self) -> None:
        assert self.grad_clip is not None
        across_stages = self.pipeline is not None and is_distributed()
        clip_grad_norm(self.model.parameters(), self.grad_clip, self.device, across_stages=across_stages)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float, device: torch.device, *,
                   across_stages: bool = False) -> None:
    """torch.nn.utils.clip_grad_norm_, also where it cannot go alone.

    Tensor parallelism leaves some layers whole, and torch's clipping refuses a mix of DTensor
    and plain gradients; a pipeline stage holds only part of the parameters, so the global norm
    sums every stage's squared norm (an all-reduce: every rank calls this). Either way the
    clipped gradients equal the single-process model's, up to rounding.
    """
    params = list(parameters)
    grads = [g for g in (p.grad for p in params) if g is not None]
    sharded = [g for g in grads if _is_dtensor(g)]
    if not across_stages and len(sharded) in (0, len(grads)):
        torch.nn.utils.clip_grad_norm_(params, max_norm)  # all plain, or all DTensors (FSDP2)
        return
    plain = [g for g in grads if not _is_dtensor(g)]
    squared = torch.zeros((), dtype=torch.float32, device=device)
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded)  # a replicated DTensor: the norm over all shards
        squared = squared + (cast(Any, norm).full_tensor() if _is_dtensor(norm) else norm).float() ** 2
    if plain:
        squared = squared + torch.nn.utils.get_total_norm(plain).float() ** 2
    if across_stages:
        dist.all_reduce(squared)  # a stage without gradients still joins, with 0
    # torch's rule: scale by max_norm / (norm + 1e-6) when that is below 1. A Python float
    # multiplies DTensor and plain gradients alike.
    coefficient = float((max_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0))
    with torch.no_grad():
        for g in grads:
            g.mul_(coefficient)


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "full_tensor")


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
