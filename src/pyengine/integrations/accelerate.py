"""An Accelerate training loop's full state saved and restored by pyengine: asynchronous,
atomic, checksummed, never pickled (Accelerate's own save_state writes with torch.save).

    from accelerate import Accelerator
    from pyengine.integrations.accelerate import AcceleratorCheckpointer

    accelerator = Accelerator()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loader = pe.data.Loader(dataset, batch_size=32, shuffle=True, rank=accelerator.process_index,
                            world_size=accelerator.num_processes)
    accelerator.register_for_checkpointing(loader)          # its position is saved too
    ckpt = AcceleratorCheckpointer(accelerator, "runs/exp1", policy=pe.checkpoint.Every(steps=500))
    step = ckpt.restore() or 0                               # the newest checkpoint that verifies
    ... each optimizer step: step += 1; ckpt.maybe_save(step)
    ckpt.close()
    ckpt.export_pretrained("runs/exp1/final")                # from_pretrained loads it

What is saved, under the names Accelerate's save_state gives its files: "model", "model_1", ...
(accelerator.prepare's models, unwrapped), "optimizer", "scheduler" (the inner ones), "dataloader"
(prepared dataloaders that have a state, i.e. with use_stateful_dataloader), "custom_checkpoint_0",
... (the objects given to register_for_checkpointing, in order), "scaler" (mixed precision's
GradScaler), "accelerator" (its step counter), and the torch, CUDA, numpy and Python RNG states.
A plain torch DataLoader's position is not saved, as with save_state; a pe.data.Loader registered
for checkpointing resumes exactly mid-epoch. The lists are read at each save, so objects prepared
or registered later are included; restore() needs the same ones, in the same order.

Supported: one process, and data parallel (DDP) across processes, where every process calls
save() and restore() for the same steps (pe.Checkpointer's collective). FSDP, DeepSpeed,
Megatron-LM and XLA keep their own checkpoint formats: refused, use accelerator.save_state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

try:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        'pyengine.integrations.accelerate needs Accelerate: pip install "pyengine[accelerate]"'
    ) from e

from pyengine.checkpoint.checkpointer import Checkpointer, SaveHandle
from pyengine.integrations.pretrained_export import export_pretrained

__all__ = ["AcceleratorCheckpointer"]

_OWN_FORMATS = {DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA}


class AcceleratorCheckpointer:
    """Saves and restores everything an Accelerator tracks through a pe.Checkpointer.

    Concurrency: as pe.Checkpointer's: the training loop calls every method; a save returns
    once its snapshot is taken and is persisted by C++ threads; a background error is raised
    by the next save(), wait() or close(). Save after an optimizer step: in the middle of a
    gradient accumulation cycle the accumulated gradients, which are not state, would be lost,
    so save() refuses and maybe_save() skips while accelerator.sync_gradients is False.

    Args:
        accelerator: the Accelerator whose prepared and registered objects are saved.
        checkpointer: a pe.Checkpointer, or the directory for one made with `checkpointer_options`
            (keep_last=3, policy=..., max_shards=..., ...). A Checkpointer made here is closed
            by close(); one passed in belongs to the caller.

    Raises:
        NotImplementedError: the accelerator uses FSDP, DeepSpeed, Megatron-LM or XLA.
    """

    def __init__(self, accelerator: Accelerator, checkpointer: Union[Checkpointer, str, os.PathLike],
                 **checkpointer_options: Any) -> None:
        if not isinstance(accelerator, Accelerator):
            raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__qualname__}")
        if accelerator.distributed_type in _OWN_FORMATS:
            raise NotImplementedError(
                f"{accelerator.distributed_type.value} keeps its own sharded checkpoint format, which "
                "AcceleratorCheckpointer does not write: use accelerator.save_state / load_state")
        self.accelerator = accelerator
        if isinstance(checkpointer, Checkpointer):
            if checkpointer_options:
                raise TypeError(f"options {sorted(checkpointer_options)} are for a Checkpointer made here; "
                                "the one passed in is already configured")
            self.checkpointer, self._owns_checkpointer = checkpointer, False
        else:
            self.checkpointer, self._owns_checkpointer = Checkpointer(Path(checkpointer), **checkpointer_options), True

    @property
    def directory(self) -> Path:
        return Path(self.checkpointer.directory)  # a local directory: this wrapper opens it with Path()

    def state(self) -> dict[str, Any]:
        """The objects a save stores, by name (see the module's docstring)."""
        acc = self.accelerator
        state: dict[str, Any] = {}
        # AcceleratedOptimizer / AcceleratedScheduler delegate their state to the inner one, which is stored.
        optimizers = [getattr(o, "optimizer", o) for o in acc._optimizers]
        schedulers = [getattr(s, "scheduler", s) for s in acc._schedulers]
        for name, objects in (("model", acc._models), ("optimizer", optimizers), ("scheduler", schedulers),
                              ("dataloader", _stateful(acc._dataloaders))):
            for i, obj in enumerate(objects):
                state[name if i == 0 else f"{name}_{i}"] = obj
        for i, obj in enumerate(acc._custom_objects):
            state[f"custom_checkpoint_{i}"] = obj
        if acc.scaler is not None:
            state["scaler"] = acc.scaler
        state["accelerator"] = {"step": acc.step}
        return state

    def save(self, step: int, **save_options: Any) -> SaveHandle:
        """Snapshots the accelerator's state as checkpoint `step`; returns once the snapshot is
        taken (`save_options`: overlap=, rng= as for pe.Checkpointer.save).

        Raises:
            RuntimeError: in the middle of a gradient accumulation cycle (nothing is written).
            TypeError: a value that cannot be stored without pickling, named by its path
                (custom_checkpoint_N is the Nth object given to register_for_checkpointing);
                nothing is written and nothing saved is touched.
            CheckpointError / OSError / ValueError: as pe.Checkpointer.save.
        """
        if not self.accelerator.sync_gradients:
            raise RuntimeError(
                f"cannot save step {step} in the middle of a gradient accumulation cycle: the gradients "
                "accumulated so far are not part of the saved state, so a resumed run would differ. Save "
                "after the optimizer step (when accelerator.sync_gradients is True).")
        state = self.state()
        try:
            return self.checkpointer.save(step, state, **save_options)
        except TypeError as e:
            custom = [f"custom_checkpoint_{i} is the {type(obj).__qualname__} given to register_for_checkpointing"
                      for i, obj in enumerate(self.accelerator._custom_objects) if f"custom_checkpoint_{i}/" in str(e)
                      or str(e).endswith(f"custom_checkpoint_{i}")]
            if not custom:
                raise
            raise TypeError(f"{e} ({'; '.join(custom)}; nothing was saved)") from e

    def maybe_save(self, step: int, **save_options: Any) -> Optional[SaveHandle]:
        """Saves when the Checkpointer's policy says so; call it once per optimizer step.
        Returns None (without asking the policy) inside a gradient accumulation cycle."""
        if not self.accelerator.sync_gradients:
            return None
        if self.checkpointer.policy is None:
            raise ValueError("maybe_save() needs a policy: AcceleratorCheckpointer(accelerator, directory, "
                             "policy=pe.checkpoint.Every(steps=100))")
        return self.checkpointer.maybe_save(step, self.state(), **save_options)

    def restore(self, step: Optional[int] = None, *, rng: bool = True) -> Optional[int]:
        """Loads checkpoint `step` (default: the newest that verifies) into the accelerator's
        objects in place, with the RNG states (rng=True), and returns its step; None when the
        directory holds no checkpoint (a fresh run). Call it after prepare() and
        register_for_checkpointing(), before the first batch is drawn.

        Raises:
            CheckpointError: the checkpoint lacks one of the objects (other objects were
                prepared or registered than at save time); nothing is changed then.
            ValueError: a saved tensor's shape differs from its target's (a different model).
        """
        state = self.state()
        restored = self.checkpointer.restore(state, step, rng=rng)
        if restored is not None:
            self.accelerator.step = int(state["accelerator"]["step"])
        return restored

    def export_pretrained(self, out_dir: Union[str, os.PathLike], model: Optional[torch.nn.Module] = None, *,
                          config: Optional[Any] = None, step: Optional[int] = None) -> Path:
        """Writes a saved model as a directory transformers' from_pretrained loads (model.safetensors
        with tied weights stored once, config.json), from the newest committed checkpoint (or `step`),
        after waiting for the saves in flight. See pretrained_export.export_pretrained.

        Args:
            model: which of accelerator.prepare's models; default the only one.
            config: a transformers PretrainedConfig, needed when the model is not a PreTrainedModel.

        Raises:
            ValueError: `model` was not prepared by this accelerator, or several were and none was named.
            TypeError / CheckpointError: as export_pretrained; nothing is written then.
        """
        models = self.accelerator._models
        if model is None:
            if len(models) != 1:
                raise ValueError(f"the accelerator prepared {len(models)} models: name the one to export with model=")
            model = models[0]
        index = next((i for i, m in enumerate(models) if m is model), None)
        if index is None:
            raise ValueError(f"this {type(model).__qualname__} was not prepared by the accelerator, so no checkpoint "
                             "holds it: pass the object accelerator.prepare returned")
        self.checkpointer.wait()
        return export_pretrained(self.directory, out_dir, model, config=config, step=step,
                                 key="model" if index == 0 else f"model_{index}")

    def wait(self) -> None:
        """Blocks until every save is durable; raises the first background error not yet raised."""
        self.checkpointer.wait()

    def close(self) -> None:
        """Waits for every save; closes the Checkpointer if it was made here."""
        if self._owns_checkpointer:
            self.checkpointer.close()
        else:
            self.checkpointer.wait()

    def __enter__(self) -> AcceleratorCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stateful(dataloaders: list[Any]) -> list[Any]:
    """The prepared dataloaders whose position can be saved (use_stateful_dataloader=True)."""
    return [d for d in dataloaders if getattr(d, "use_stateful_dataloader", False)]
