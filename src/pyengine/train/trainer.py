"""pe.Trainer: the training loop of the book's patterns on pyengine's loader and checkpoints.

    trainer = pe.Trainer(model, optimizer, loss_fn, train_loader, val_loader, checkpoint_dir="runs/a")
    history = trainer.fit(pe.VirtualEpochs(len(dataset), stop_point=10, batch_size=128, num_checkpoints=20))

Each virtual epoch ends with evaluation, early stopping, callbacks and an asynchronous
checkpoint of the full state (model, optimizer, scheduler, scaler, loader position, RNG,
step, early-stopping state, history). `fit(resume=True)` continues bit for bit from the
newest checkpoint that verifies. With `on_preemption="save"`, SIGTERM / SIGUSR1 ends the step in
progress, saves it (mid-epoch) and exits with status 0; the restarted fit() continues from there.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

import torch

from pyengine import distributed
from pyengine.checkpoint import Checkpointer, PreemptionGuard
from pyengine.checkpoint.dtensors import module_state_like
from pyengine.checkpoint.preemption import DEFAULT_SIGNALS, check_grace, check_signals
from pyengine.train.callbacks import Callback
from pyengine.train.early_stopping import EarlyStopping
from pyengine.train.metrics_log import MetricsLog
from pyengine.train.step_runner import StepRunner, batch_size_of
from pyengine.train.strategy_loaders import check_loaders
from pyengine.train.virtual_epochs import VirtualEpochs

_ON_NONFINITE = ("raise", "skip", "rollback")
_ON_PREEMPTION = (None, "save")


class _Progress:
    """What the Trainer itself must carry across a resume (saved as JSON)."""

    def __init__(self) -> None:
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.skipped_steps = 0
        self.rollbacks = 0
        # The running train loss of the epoch in progress: a checkpoint taken mid-epoch (at a
        # preemption) must carry it, or the resumed epoch's train_loss would cover only its end.
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": self.history, "skipped_steps": self.skipped_steps,
                "rollbacks": self.rollbacks, "epoch_loss_sum": self.epoch_loss_sum,
                "epoch_loss_count": self.epoch_loss_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.history = int(state["step"]), list(state["history"])
        self.skipped_steps, self.rollbacks = int(state["skipped_steps"]), int(state["rollbacks"])
        # Checkpoints from before mid-epoch saves were taken at epoch ends, where the sum is 0.
        self.epoch_loss_sum = float(state.get("epoch_loss_sum", 0.0))
        self.epoch_loss_count = int(state.get("epoch_loss_count", 0))


class _Rollback(Exception):
    """Raised inside the loop to restart it from the restored checkpoint."""


class Trainer:
    """Trains `model` with `loss_fn(model, batch) -> scalar tensor` on batches of `train_loader`.

    Args:
        loss_fn: loss_fn(model, batch) -> scalar tensor; None under a pipeline strategy, whose
            own loss_fn(output, target) runs on the last stage.
        train_loader: batches to train on; a pe.data.Loader (its position is checkpointed, so
            resume is exact) or any iterable (re-iterated when exhausted; resume then restarts
            its iteration, with a warning).
        val_loader: evaluated at the end of every virtual epoch ("val_loss").
        scheduler: stepped after every optimizer step.
        checkpoint_dir: where checkpoints go; None trains without them.
        callbacks: Callback objects (checkpointed when they have state_dict).
        device: where the model and batches go (default: the model's device).
        grad_clip: clip the gradient norm to this value.
        amp: mixed precision (bfloat16 autocast on CPU; float16 + GradScaler on CUDA).
        log_dir: metrics.csv (and TensorBoard when installed) go here.
        early_stopping: an EarlyStopping; its best weights are restored when fit ends.
        on_nonfinite: what a NaN or infinite loss does: "raise" (stop with a message),
            "skip" (drop that step's update) or "rollback" (restore the last checkpoint,
            scale the learning rate by `nonfinite_lr_factor`, and go on; at most
            `max_rollbacks` times).
        keep_last: checkpoints to keep.
        overlap_checkpoints: copy parameters and optimizer state during the next step
            (CheckFreq-style) instead of before save() returns.
        on_preemption: None: signals keep their usual effect. "save": on one of
            `preemption_signals` (default SIGTERM and SIGUSR1; on any rank) the step in progress
            finishes, the saves in flight complete, a checkpoint of that step (mid-epoch too) is
            saved and made durable, and fit() raises SystemExit(0) (on_fit_end callbacks and
            early stopping's best weights are skipped: the run is not over); fit(resume=True)
            then continues from it bit for bit, history included. Under torchrun every rank
            stops at the same step. If the checkpoint cannot be durable within
            `preemption_grace_seconds` of the signal, the process exits with status 75 and a
            restart resumes from the newest earlier checkpoint (pe.checkpoint.PreemptionGuard,
            which this uses, explains why). Call fit() in the main thread then.
        progress: show a tqdm progress bar with loss and throughput.
        unfreezer: a pe.transfer.GradualUnfreezer; its on_epoch_start runs before each
            virtual epoch's first step, and it is restored before the optimizer on resume.
        strategy: distribution strategy: None (one process), "ddp", "fsdp", "local_sgd", "tensor",
            or a pe.distributed strategy object, applied or not (FullyShard(), TensorParallel(),
            PipelineParallel(...)). An optimizer built before wrapping, over model.parameters(),
            is rebound to the wrapped (sharded) parameters, keeping its param groups, their
            hyperparameters and any state (pe.distributed.rebind_optimizer; it raises
            OptimizerRebindError where that cannot be done). Run the script under torchrun.
            Checkpoints become rank-sharded; only rank 0 logs and shows progress.
            Data parallel ("ddp", "fsdp", "local_sgd"): give each rank its slice through
            pe.data.Loader(rank=, world_size=). After the unfreezer changes which parameters
            train, DDP is re-wrapped at the epoch start.
            Model parallel ("tensor", PipelineParallel): every rank must see the same batches,
            so the loaders must not be rank-sharded (world_size=1, the same seed everywhere).
            With a pe.data.Loader, the ranks' loaders are compared when the Trainer is built
            (seed, order, batch size, data size; under data parallelism distinct ranks), and
            loaders built differently raise a ValueError on every rank.
            Under a pipeline, `model` is this rank's stage (strategy.wrap(model)) and loss_fn
            is None: each step runs strategy.step(*strategy.split_batch(batch)) (forward and
            backward of every stage), evaluation a forward through the stages, and the loss
            is broadcast from the last stage, so every rank logs, skips, rolls back and stops
            early alike; grad_clip clips the norm over all stages; checkpoints are the plain
            model's (each stage saved by its rank).
            "hogwild" runs its own processes: use pe.distributed.Hogwild(...).run().
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None, train_loader: Iterable,
                 val_loader: Iterable | None = None, scheduler: Any = None, checkpoint_dir: str | Path | None = None,
                 callbacks: Iterable[Callback] = (), device: str | torch.device | None = None,
                 grad_clip: float | None = None, amp: bool = False, log_dir: str | Path | None = None, *,
                 early_stopping: EarlyStopping | None = None, on_nonfinite: str = "raise",
                 nonfinite_lr_factor: float = 0.5, max_rollbacks: int = 3, keep_last: int = 3,
                 overlap_checkpoints: bool = True, progress: bool = True, unfreezer: Any = None,
                 strategy: Any = None, on_preemption: str | None = None,
                 preemption_signals: Iterable[int] = DEFAULT_SIGNALS, preemption_grace_seconds: float = 30.0) -> None:
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
        if on_preemption not in _ON_PREEMPTION:
            raise ValueError(f"on_preemption must be one of {_ON_PREEMPTION}, got {on_preemption!r}")
        if on_preemption == "save" and checkpoint_dir is None:
            raise ValueError("on_preemption='save' needs a checkpoint_dir to save the final checkpoint to")
        self.preemption_signals = check_signals(preemption_signals)
        self.preemption_grace_seconds = check_grace(preemption_grace_seconds)
        if on_nonfinite == "rollback" and checkpoint_dir is None:
            raise ValueError("on_nonfinite='rollback' needs a checkpoint_dir to roll back to")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {grad_clip}")
        if not 0 < nonfinite_lr_factor <= 1:
            raise ValueError(f"nonfinite_lr_factor must be in (0, 1], got {nonfinite_lr_factor}")
        _check_loss_and_strategy(loss_fn, strategy)
        self.device = torch.device(device) if device is not None else _device_of(model)
        self.strategy = _distribute(strategy, model.to(self.device), optimizer, train_loader, val_loader)
        self.pipeline = self.strategy if isinstance(self.strategy, distributed.PipelineParallel) else None
        self.model = self.strategy.wrapped if self.strategy is not None else model.to(self.device)
        if self.strategy is not None and not distributed.is_main():
            log_dir, progress = None, False
        self.optimizer, self.loss_fn, self.scheduler = optimizer, loss_fn, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.callbacks = list(callbacks)
        self.early_stopping = early_stopping
        self.unfreezer = unfreezer
        self.on_nonfinite = on_nonfinite
        self.on_preemption = on_preemption
        self.nonfinite_lr_factor, self.max_rollbacks = nonfinite_lr_factor, max_rollbacks
        self.keep_last, self.overlap_checkpoints, self.progress = keep_last, overlap_checkpoints, progress
        self.log = MetricsLog(log_dir)
        self.runner = StepRunner(self.model, optimizer, loss_fn, scheduler, self.device, amp, grad_clip,
                                 pipeline=self.pipeline)
        self.stop_training = False
        self.checkpoint_stalls: list[float] = []  # seconds each save paused training (this process only)
        self._progress = _Progress()
        self._ckpt: Checkpointer | None = None
        self._preemption: PreemptionGuard | None = None

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (restored on resume)."""
        return self._progress.step

    @property
    def history(self) -> list[dict[str, Any]]:
        return self._progress.history

    # ---------------------------------------------------------------------------- the loop

    def fit(self, schedule: VirtualEpochs, resume: bool = True) -> list[dict[str, Any]]:
        """Trains for schedule.total_steps steps (less if early stopping or a callback stops it).

        Returns:
            The history: one record per virtual epoch (epoch, step, train_loss, val_loss, lr, ...).
        """
        if not isinstance(schedule, VirtualEpochs):
            raise TypeError(f"schedule must be a pe.VirtualEpochs, got {type(schedule).__name__}")
        self.stop_training = False
        self._ckpt = Checkpointer(self.checkpoint_dir, keep_last=self.keep_last) if self.checkpoint_dir else None
        self._preemption = None
        try:
            if self._ckpt is not None and self.on_preemption == "save":
                # The state is a function: a DDP model re-wrapped after unfreezing is saved as it is then.
                self._preemption = PreemptionGuard(self._ckpt, self._state, signals=self.preemption_signals,
                                                   grace_seconds=self.preemption_grace_seconds, exit_on_stop=False)
            with self._preemption or contextlib.nullcontext():
                if self._ckpt is not None and resume:
                    self._restore_newest()
                self.log.rewrite(self.history)
                for cb in self.callbacks:
                    cb.on_fit_start(self)
                while True:
                    try:
                        self._run(schedule)
                        break
                    except _Rollback:
                        self.log.rewrite(self.history)
                if self._ckpt is not None:
                    self._ckpt.wait()  # the last checkpoint is durable before fit returns
        finally:
            if self._ckpt is not None:
                self._ckpt.close()
            self.log.close()
        if self._preemption is not None and self._preemption.stopped:
            raise SystemExit(0)  # preempted: the final checkpoint is durable (PreemptionGuard)
        if self.early_stopping is not None and self.early_stopping.restore_best and self.early_stopping.best_weights:
            # After a resume under FSDP / tensor parallelism the best weights are this rank's shards.
            self.model.load_state_dict(module_state_like(self.model, self.early_stopping.best_weights, per_rank=True))
        for cb in self.callbacks:
            cb.on_fit_end(self, self.history)
        return self.history

    def _run(self, schedule: VirtualEpochs) -> None:
        bar = _progress_bar(schedule.total_steps, self.step, self.progress)
        batches = self._batches()
        progress = self._progress
        samples, epoch_start = 0, time.perf_counter()
        try:
            self.model.train()
            while self.step < schedule.total_steps and not self.stop_training:
                if self.step % schedule.steps_per_epoch == 0:
                    self._start_epoch(self.step // schedule.steps_per_epoch)
                batch = next(batches)
                value = self._train_step(batch, schedule)
                if math.isfinite(value):
                    progress.epoch_loss_sum += value
                    progress.epoch_loss_count += 1
                progress.step += 1
                samples += batch_size_of(batch)
                bar.update(1)
                if schedule.is_epoch_end(self.step):
                    seconds = time.perf_counter() - epoch_start
                    record = self._end_epoch(schedule, samples / seconds, seconds)
                    bar.set_postfix(loss=f"{record['train_loss']:.4g}", samples_s=f"{record['samples_per_s']:.0f}")
                    samples, epoch_start = 0, time.perf_counter()
                if self._preemption is not None and self._preemption.stop_requested(self.step):
                    break  # this step's checkpoint is durable; fit() exits with status 0
        finally:
            bar.close()

    def _train_step(self, batch: Any, schedule: VirtualEpochs) -> float:
        """Computes the batch's loss and, when it is finite, applies the update; a non-finite loss
        goes to _nonfinite instead (which raises, or skips the update). Returns the loss."""
        if self.pipeline is not None:
            # The schedule runs every micro-batch's backward right after the forwards, so the
            # gradients exist before the loss is known; the loss comes from the last stage.
            value = self.runner.pipeline_forward_backward(batch).item()
            apply_update: Callable[[], None] = self.runner.optimizer_step
        else:
            loss = self.runner.forward(batch)
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}")
            value = loss.item()  # one host sync per step: the NaN check and the running mean share it
            apply_update = functools.partial(self.runner.backward_and_step, loss)
        if not math.isfinite(value):
            self._nonfinite(value, schedule)  # raises, or skips this update
            return value
        apply_update()
        if self.strategy is not None:
            self.strategy.after_optimizer_step()  # local SGD averages here (a collective)
        return value

    def _start_epoch(self, epoch: int) -> None:
        if self.unfreezer is not None:
            self.unfreezer.on_epoch_start(epoch)
        if self.strategy is not None and self.strategy.needs_rewrap():
            self.model = self.runner.model = self.strategy.rewrap()  # DDP only syncs what trained at wrap time
        for cb in self.callbacks:
            cb.on_epoch_start(self, epoch)

    def _end_epoch(self, schedule: VirtualEpochs, samples_per_s: float, seconds: float) -> dict[str, Any]:
        progress = self._progress
        train_loss = progress.epoch_loss_sum / max(progress.epoch_loss_count, 1)
        progress.epoch_loss_sum, progress.epoch_loss_count = 0.0, 0  # before this epoch's checkpoint
        record: dict[str, Any] = {"epoch": schedule.epoch_of(self.step) + 1, "step": self.step,
                                  "train_loss": train_loss, "val_loss": math.nan,
                                  "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": samples_per_s,
                                  "seconds": seconds}
        if self.val_loader is not None:
            record["val_loss"] = self.evaluate(self.val_loader)
        self.history.append(record)
        self.log.append(record)
        if self.early_stopping is not None and self.early_stopping.update(record, self.step, self.model):
            self.stop_training = True
        try:
            for cb in self.callbacks:
                cb.on_epoch_end(self, record)
        except Exception as e:
            from pyengine.tune.trial import TrialPruned  # here: pyengine.tune is not a dependency of training

            # A trial pruned at the end of an epoch (the pruner pauses it; ASHA may promote it
            # later) must keep that epoch: without this save the resumed trial repeated it.
            # Other errors save nothing: a callback that failed half-way may have left the
            # state in between, and a checkpoint of that would not resume exactly.
            if isinstance(e, TrialPruned) and self._ckpt is not None:
                self._ckpt.save(self.step, self._state()).wait()
            raise
        if self._ckpt is not None:
            # Asynchronous: returns after the snapshot; the write overlaps the next epoch.
            handle = self._ckpt.save(self.step, self._state(), overlap=self.overlap_checkpoints)
            self.checkpoint_stalls.append(handle.stall_seconds)
        return record

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> float:
        """Mean of loss_fn over `loader`, weighted by batch size, in eval mode (under a pipeline:
        the pipeline's loss, the same on every rank; every rank must call this)."""
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(0)  # the same order every time, so the sum is reproducible
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for batch in loader:
                n = batch_size_of(batch)
                total += float(self.runner.eval_loss(batch)) * n
                count += n
        finally:
            self.model.train(was_training)
        if count == 0:
            raise ValueError("the validation loader yielded no samples")
        return total / count

    def _batches(self) -> Iterator[Any]:
        # A finite loader is re-iterated; pe.data.Loader continues with its next epoch.
        while True:
            empty = True
            for batch in self.train_loader:
                empty = False
                yield batch
            if empty:
                raise ValueError("train_loader yielded no batch")

    # ---------------------------------------------------------------------- checkpoints

    def _state(self) -> dict[str, Any]:
        # Restore order matters: the unfreezer re-adds its param groups before the optimizer
        # state that refers to them is loaded.
        state: dict[str, Any] = {"model": self.model}
        if self.unfreezer is not None:
            state["unfreezer"] = self.unfreezer
        state["optimizer"] = self.optimizer
        state["trainer"] = self._progress
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler
        if self.runner.scaler is not None:
            state["scaler"] = self.runner.scaler
        if hasattr(self.train_loader, "state_dict") and hasattr(self.train_loader, "load_state_dict"):
            state["loader"] = self.train_loader
        if self.early_stopping is not None:
            state["early_stopping"] = self.early_stopping
        for i, cb in enumerate(self.callbacks):
            if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict"):
                state[f"callback_{i}"] = cb
        return state

    def _restore_newest(self) -> int | None:
        assert self._ckpt is not None
        state = self._state()
        restored = self._ckpt.restore(state)
        if restored is not None and "loader" not in state:
            warnings.warn("train_loader has no state_dict: a resumed run restarts its iteration, so it is not "
                          "exact; use pe.data.Loader for exact resume", stacklevel=3)
        return restored

    def _nonfinite(self, value: float, schedule: VirtualEpochs) -> None:
        where = f"step {self.step + 1} (virtual epoch {schedule.epoch_of(self.step + 1) + 1})"
        if self.on_nonfinite == "skip":
            self._progress.skipped_steps += 1
            return
        advice = ("try a lower learning rate, grad_clip=1.0, amp=False, or check that batch's data; "
                  "on_nonfinite='rollback' restores the last checkpoint with a lower learning rate")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(f"the loss is {value} at {where}: {advice}")
        assert self._ckpt is not None
        self._ckpt.wait()  # the newest checkpoint may still be in flight
        if self._progress.rollbacks >= self.max_rollbacks or self._ckpt.latest_step() is None:
            reason = "no checkpoint to roll back to" if self._ckpt.latest_step() is None else (
                f"already rolled back {self._progress.rollbacks} times")
            raise FloatingPointError(f"the loss is {value} at {where} and {reason}: {advice}")
        rollbacks = self._progress.rollbacks
        restored = self._restore_newest()
        self._progress.rollbacks = rollbacks + 1
        for group in self.optimizer.param_groups:
            group["lr"] *= self.nonfinite_lr_factor
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * self.nonfinite_lr_factor for lr in self.scheduler.base_lrs]
        warnings.warn(f"the loss is {value} at {where}; rolled back to step {restored} with the learning rate "
                      f"scaled by {self.nonfinite_lr_factor}", RuntimeWarning, stacklevel=5)
        raise _Rollback

    # ------------------------------------------------------------------------ warm start

    def warm_start(self, source: str | Path, step: int | None = None, *, reset_optimizer: bool = True,
                   strict: bool = True) -> int:
        """Initialises the weights (and optionally the optimizer) from another run's checkpoint,
        to retrain on new data. Training state (step, loader, history) starts fresh.

        Returns:
            The step of the checkpoint used.
        """
        with Checkpointer(source) as src:
            chosen = step if step is not None else src.latest_step()
            if chosen is None:
                raise FileNotFoundError(f"no checkpoint in {source} to warm-start from")
            data = src.load(chosen)
        if "model" not in data:
            raise KeyError(f"checkpoint {chosen} in {source} holds no 'model'; it holds {sorted(data)}")
        self.model.load_state_dict(data["model"], strict=strict)
        if not reset_optimizer:
            self.optimizer.load_state_dict(data["optimizer"])
        return chosen


def _check_loss_and_strategy(loss_fn: Any, strategy: Any) -> None:
    if isinstance(strategy, str) and strategy == "pipeline":
        raise ValueError("strategy='pipeline' needs the last stage's loss and wraps the model into stages first: "
                         "s = pe.distributed.PipelineParallel(loss_fn=lambda output, target: ..., n_microbatches=4); "
                         "stage = s.wrap(model); opt = torch.optim.Adam(stage.parameters()); "
                         "pe.Trainer(stage, opt, None, loader, strategy=s)")
    if isinstance(strategy, distributed.PipelineParallel):
        if loss_fn is not None:
            raise ValueError("under a pipeline the loss is the strategy's loss_fn(output, target), computed on the "
                             "last stage; loss_fn(model, batch) cannot run on one stage: pass loss_fn=None")
    elif loss_fn is None:
        raise ValueError("loss_fn is required: loss_fn(model, batch) -> scalar tensor (only a PipelineParallel "
                         "strategy brings its own)")


def _distribute(strategy: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                train_loader: Iterable, val_loader: Iterable | None) -> Any:
    """Joins the torchrun job, wraps `model` and rebinds `optimizer` to what trains (an optimizer
    built before wrapping keeps its groups and state); the strategy's `wrapped` is what trains."""
    if strategy is None:
        return None
    strategy = distributed.make_strategy(strategy)
    if isinstance(strategy, distributed.Hogwild):
        raise NotImplementedError("strategy='hogwild' runs its own worker processes on one host, which pe.Trainer "
                                  "does not start: use pe.distributed.Hogwild(num_processes).run(train_fn, model)")
    distributed.init()
    check_loaders(strategy, train_loader, val_loader)  # before wrapping: a wrong loader fails fast
    return distributed.setup(model, optimizer, strategy).strategy


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but keep training if it is missing
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.5)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass
