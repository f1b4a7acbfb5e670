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
first stage feeds the inputs, the last computes the loss, which only it returns (or every
rank, with loss_on_every_rank=True: one scalar broadcast). evaluate() is the forward alone,
for validation. pe.Trainer(stage, opt, None, loader, strategy=strategy) does all of this,
cutting each batch into (inputs, target) with `split_batch`.

    strategy = pe.distributed.PipelineParallel(loss_fn, n_microbatches=4)   # or split_points=["4"]
    stage = strategy.wrap(model)
    opt = torch.optim.Adam(stage.parameters())
    ...  opt.zero_grad(); loss = strategy.step(x, y); opt.step()
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pyengine.checkpoint.dtypes import TORCH_TO_CODE
from pyengine.checkpoint.partitioned import Partition
from pyengine.checkpoint.partitioned import mark as mark_partition
from pyengine.distributed.process_group import is_distributed, rank, world_size

# An activation crosses stages in evaluate() as a header (dtype index, ndim, shape padded to
# _MAX_DIMS) and then its bytes, so eval batches may have any size and shape.
_WIRE_DTYPES = list(TORCH_TO_CODE)
_MAX_DIMS = 8


def default_split_batch(batch: Any) -> tuple[Any, Any]:
    """(inputs, target) of a batch: a 2-item tuple or list as is, or a dict's "x" and "y".

    Raises:
        TypeError: for any other batch; pass PipelineParallel(split_batch=...) for those.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and "x" in batch and "y" in batch:
        return batch["x"], batch["y"]
    shape = f"a dict with keys {sorted(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
    raise TypeError(f"a pipeline cannot tell the inputs from the target in {shape}; the default takes (x, y) "
                    "tuples or {'x': ..., 'y': ...} dicts: pass PipelineParallel(..., split_batch=lambda b: "
                    "(inputs, target))")


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
        split_batch: batch -> (inputs, target), for pe.Trainer, whose batches are whole
            (loader items); default `default_split_batch`: (x, y) tuples or {"x", "y"} dicts.

    Raises:
        ValueError: on split points that are not top-level children in order, or a count of
            them that is not world_size - 1.
    """

    name = "pipeline"
    splits_data = False  # model parallel: every rank must see the same batch

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        n_microbatches: int = 4,
        split_points: Sequence[str] | None = None,
        split_batch: Callable[[Any], tuple[Any, Any]] = default_split_batch,
    ) -> None:
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches must be at least 1, got {n_microbatches}")
        self.loss_fn = loss_fn
        self.n_microbatches = n_microbatches
        self.split_points = list(split_points) if split_points is not None else None
        self.split_batch = split_batch
        self.module: torch.nn.Module | None = None
        self.wrapped: torch.nn.Module | None = None  # this rank's stage
        self._schedule: object | None = None
        self._batch_shape: tuple[int, ...] | None = None  # fixed by the first step (the stage's buffers)

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

    def step(self, inputs: torch.Tensor, target: torch.Tensor, *,
             loss_on_every_rank: bool = False) -> torch.Tensor | None:
        """Forward and backward of one batch; every rank calls it with the same batch.

        Gradients accumulate into the stage's .grad (zero them before, as for backward()).

        Args:
            loss_on_every_rank: broadcast the loss from the last stage (one scalar), so that
                every rank can take the same decisions on it (a collective: all ranks pass
                the same value).

        Returns:
            The batch's mean loss on the last stage (and outside a job), None on other
            stages; with loss_on_every_rank, that loss as a float64 scalar on every rank.

        Raises:
            ValueError: when the batch size is not divisible by n_microbatches, or the batch's
                shape differs from the first step's.
        """
        assert self.wrapped is not None, "wrap() first"
        self._check_batch_shape(inputs)
        loss: torch.Tensor | None
        if self._schedule is None:
            full = self.loss_fn(self.wrapped(inputs), target)
            full.backward()
            loss = full.detach()
        else:
            losses: list[torch.Tensor] = []
            first, last = rank() == 0, rank() == world_size() - 1
            args = (inputs,) if first else ()
            self._schedule.step(*args, target=target if last else None, losses=losses)  # type: ignore[attr-defined]
            loss = torch.stack(losses).mean().detach() if last else None
        return self._broadcast_loss(loss) if loss_on_every_rank else loss

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, target: torch.Tensor, *,
                 loss_on_every_rank: bool = False) -> torch.Tensor | None:
        """The loss of one batch, forward only and whole (not cut into micro-batches), so any
        batch size and shape works; every rank calls it with the same batch.

        Each stage sends its output to the next one itself (the GPipe schedule's buffers are
        shaped for the training batch). Put the stage in eval mode first where it matters.

        Returns:
            As step(): the loss on the last stage (and outside a job), or on every rank.
        """
        assert self.wrapped is not None, "wrap() first"
        first, last = rank() == 0, rank() == world_size() - 1  # both outside a job
        output = self.wrapped(inputs if first else self._receive_activation(rank() - 1))
        loss = None
        if last:
            loss = self.loss_fn(output, target).detach()
        else:
            self._send_activation(output, rank() + 1)
        return self._broadcast_loss(loss) if loss_on_every_rank else loss

    def _check_batch_shape(self, inputs: torch.Tensor) -> None:
        shape = tuple(inputs.shape)
        if not shape or shape[0] % self.n_microbatches:
            raise ValueError(f"a pipeline batch of {shape[0] if shape else 'no'} samples cannot be cut into "
                             f"{self.n_microbatches} equal micro-batches: use a batch size divisible by "
                             "n_microbatches (and drop_last=True in the loader)")
        if self._batch_shape is None:
            self._batch_shape = shape
        elif shape != self._batch_shape:
            raise ValueError(f"the stages sized their activation buffers for the first batch's inputs "
                             f"{self._batch_shape}, and this batch's are {shape}: train on batches of one shape "
                             "(pe.data.Loader(..., drop_last=True))")

    def _broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The last stage's loss on every rank, as a float64 scalar (lossless for any float loss)."""
        value = loss.to(torch.float64) if loss is not None else torch.empty((), dtype=torch.float64,
                                                                            device=self._device())
        if self._schedule is not None:
            dist.broadcast(value, src=world_size() - 1)
        return value

    def _send_activation(self, output: Any, dst: int) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() > _MAX_DIMS:
            raise TypeError(f"pipeline evaluate() passes one tensor of at most {_MAX_DIMS} dims between stages; "
                            f"stage {rank()} returned {type(output).__name__}")
        header = [_WIRE_DTYPES.index(output.dtype), output.dim(), *output.shape]
        header += [0] * (2 + _MAX_DIMS - len(header))
        dist.send(torch.tensor(header, dtype=torch.int64, device=output.device), dst)
        dist.send(output.contiguous(), dst)

    def _receive_activation(self, src: int) -> torch.Tensor:
        header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=self._device())
        dist.recv(header, src)
        dtype, ndim, *shape = header.tolist()
        activation = torch.empty(shape[:ndim], dtype=_WIRE_DTYPES[dtype], device=self._device())
        dist.recv(activation, src)
        return activation

    def _device(self) -> torch.device:
        assert self.module is not None, "wrap() first"
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def needs_rewrap(self) -> bool:
        """Never: each stage's gradients are its own, nothing is reduced across ranks."""
        return False

    def rewrap(self) -> torch.nn.Module:
        assert self.wrapped is not None, "wrap() first"
        return self.wrapped

    def after_optimizer_step(self) -> None:
        """Nothing to do: each rank updates only its own stage."""
