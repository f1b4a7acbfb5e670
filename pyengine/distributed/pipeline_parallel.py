"""Pipeline parallelism: the model split into stages across ranks (`torch.distributed.pipelining`).

Rank r keeps stage r, a contiguous run of the model's top-level children under their
original names (so its state_dict keys are the plain model's), and drops the rest. A GPipe
schedule cuts each batch into micro-batches: all forwards flow stage to stage, then all
backwards flow back; gradients accumulate over micro-batches, scaled so they equal one
full-batch backward of a mean loss. Works on CPU with gloo and on GPUs with NCCL.

Checkpoints: each rank writes its stage's weights and optimizer state through the rank-sharded
checkpoint, renumbered to the full model's parameter order (pyengine/checkpoint/partitioned.py),
so a pipeline checkpoint is the plain model's checkpoint: it restores into a plain model, and a
plain checkpoint (or one from a pipeline split differently) restores into the stages.

Training goes through step(), not model(x): every rank calls it with the same batch; the
first stage feeds the inputs, the last computes the loss, which only it returns.

    strategy = pe.distributed.PipelineParallel(loss_fn, n_microbatches=4)   # or split_points=["4"]
    stage = strategy.wrap(model)
    opt = torch.optim.Adam(stage.parameters())
    ...  opt.zero_grad(); loss = strategy.step(x, y); opt.step()
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from pyengine.checkpoint.partitioned import Partition
from pyengine.checkpoint.partitioned import mark as mark_partition
from pyengine.distributed.process_group import is_distributed, rank, world_size


def even_split_points(children: Sequence[tuple[str, torch.nn.Module]], stages: int) -> list[str]:
    """Names of the children that start stages 1.., balancing parameter counts greedily.

    A stage takes the next child while that brings it closer to its fair share (the
    parameters still left / the stages still left); every stage keeps at least one child.
    """
    if len(children) < stages:
        raise ValueError(f"cannot split {len(children)} top-level modules into {stages} pipeline stages")
    sizes = [sum(p.numel() for p in child.parameters()) for _, child in children]
    points: list[str] = []
    start = 0
    for stage in range(stages - 1):
        left = stages - stage
        share = sum(sizes[start:]) / left
        end, held = start, 0
        while end < len(children) - (left - 1) and (end == start or held + sizes[end] / 2 <= share):
            held += sizes[end]
            end += 1
        points.append(children[end][0])
        start = end
    return points


class PipelineParallel:
    """Splits a model's top-level children into one stage per rank and runs GPipe over them.

    Args:
        loss_fn: loss(output, target) of the last stage, a mean over the batch.
        n_microbatches: micro-batches per step; the batch size must be divisible by it.
        split_points: names of the top-level children that start stages 1..world-1; default
            `even_split_points` by parameter count.

    Raises:
        ValueError: on split points that are not top-level children in order, or a count of
            them that is not world_size - 1.
    """

    name = "pipeline"

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        n_microbatches: int = 4,
        split_points: Sequence[str] | None = None,
    ) -> None:
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches must be at least 1, got {n_microbatches}")
        self.loss_fn = loss_fn
        self.n_microbatches = n_microbatches
        self.split_points = list(split_points) if split_points is not None else None
        self.module: torch.nn.Module | None = None
        self.wrapped: torch.nn.Module | None = None  # this rank's stage
        self._schedule: object | None = None

    def stage_modules(self, model: torch.nn.Module, stages: int) -> list[torch.nn.Sequential]:
        """The stages as Sequentials of the model's children, keeping the children's names."""
        children = list(model.named_children())
        points = self.split_points if self.split_points is not None else even_split_points(children, stages)
        names = [n for n, _ in children]
        if len(points) != stages - 1 or any(p not in names for p in points):
            raise ValueError(f"split_points {points} must name {stages - 1} top-level modules of {names}")
        starts = [0] + [names.index(p) for p in points] + [len(children)]
        if any(a >= b for a, b in zip(starts, starts[1:])):
            raise ValueError(f"split_points {points} must be in model order and leave no stage empty")
        return [torch.nn.Sequential(OrderedDict(children[a:b])) for a, b in zip(starts, starts[1:])]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        self.module = model
        if not is_distributed():
            self.wrapped = model
            return model
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        stage = self.stage_modules(model, world_size())[rank()]
        mark_partition(stage, Partition(model, stage))
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        pipe_stage = PipelineStage(stage, rank(), world_size(), device)
        self._schedule = ScheduleGPipe(pipe_stage, self.n_microbatches, loss_fn=self.loss_fn)
        self.wrapped = stage
        return stage

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of one batch; every rank calls it with the same batch.

        Returns:
            The batch's mean loss on the last stage (and outside a job); None on other stages.
        """
        assert self.wrapped is not None, "wrap() first"
        if self._schedule is None:
            loss = self.loss_fn(self.wrapped(inputs), target)
            loss.backward()
            return loss.detach()
        losses: list[torch.Tensor] = []
        first, last = rank() == 0, rank() == world_size() - 1
        args = (inputs,) if first else ()
        self._schedule.step(*args, target=target if last else None, losses=losses)  # type: ignore[attr-defined]
        return torch.stack(losses).mean().detach() if last else None

    def needs_rewrap(self) -> bool:
        """Never: each stage's gradients are its own, nothing is reduced across ranks."""
        return False

    def rewrap(self) -> torch.nn.Module:
        assert self.wrapped is not None, "wrap() first"
        return self.wrapped

    def after_optimizer_step(self) -> None:
        """Nothing to do: each rank updates only its own stage."""
