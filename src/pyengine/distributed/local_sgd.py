"""Local SGD: every rank takes optimizer steps on its own batches, and the parameters are
averaged across ranks every `period` steps. Communication drops by `period`x against DDP,
which suits slow links between hosts; replicas differ between averaging points.

    strategy = pe.distributed.LocalSGD(period=8)
    model = strategy.wrap(model)       # broadcasts rank 0's weights, so replicas start equal
    ... loss.backward(); opt.step(); strategy.after_optimizer_step()
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pyengine.distributed.optimizer_rebind import ParametersBeforeWrap
from pyengine.distributed.process_group import is_distributed, world_size


class LocalSGD:
    """Periodic parameter (and floating buffer) averaging with all_reduce.

    Optimizer state stays local to each rank. Freezing/unfreezing needs no re-wrap: the
    averaging covers every parameter, trainable or not.

    Args:
        period: optimizer steps between averagings (H); 1 averages after every step.
    """

    name = "local_sgd"

    def __init__(self, period: int = 8) -> None:
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an integer >= 1, got {period!r}")
        self.period = period
        self.steps = 0
        self.averagings = 0
        self.module: torch.nn.Module | None = None
        self.wrapped: torch.nn.Module | None = None  # the module itself: nothing wraps it
        self.parameters_before_wrap: ParametersBeforeWrap | None = None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        self.module = self.wrapped = model
        self.parameters_before_wrap = ParametersBeforeWrap(model)  # kept, not replaced; recorded alike
        if is_distributed():
            with torch.no_grad():
                for t in self._tensors():
                    dist.broadcast(t, src=0)
        return model

    def rewrap(self) -> torch.nn.Module:
        if self.module is None:
            raise RuntimeError("rewrap() before wrap()")
        return self.module

    def needs_rewrap(self) -> bool:
        return False

    def after_optimizer_step(self) -> None:
        """Counts a local step; every `period` steps averages the replicas (a collective)."""
        self.steps += 1
        if self.steps % self.period == 0:
            self.average()

    def average(self) -> None:
        if not is_distributed():
            return
        tensors = self._tensors()
        dtype = tensors[0].dtype if len({t.dtype for t in tensors}) == 1 else torch.float64
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(flat)
        flat /= world_size()
        offset = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
                offset += n
        self.averagings += 1

    def bytes_per_averaging(self) -> int:
        tensors = self._tensors()
        itemsize = tensors[0].element_size() if len({t.dtype for t in tensors}) == 1 else 8
        return sum(t.numel() for t in tensors) * itemsize

    def _tensors(self) -> list[torch.Tensor]:
        if self.module is None:
            raise RuntimeError("LocalSGD used before wrap()")
        params = [p.data for p in self.module.parameters()]
        buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        return params + buffers
