"""A pyengine checkpoint's weights as a directory `transformers`' from_pretrained loads.

    from pyengine.integrations.pretrained_export import export_pretrained

    export_pretrained("runs/exp1", "runs/exp1/final", model)   # the newest committed step
    model = AutoModelForCausalLM.from_pretrained("runs/exp1/final")

The directory gets what `save_pretrained` writes for one unsharded model: `model.safetensors`
(weights, metadata format=pt), `config.json` and, for a model that can generate,
`generation_config.json`. The weights come from a committed, verified checkpoint, not from the
live model: the export is of what was saved. The live model supplies the config and tells which
weights are tied (share storage), because safetensors stores a tensor once and from_pretrained
ties the others back; as save_pretrained does, the names transformers declares tied (lm_head.weight
of GPT-2) are dropped and their source (transformer.wte.weight) kept. Each file is written to a
temporary name, fsynced and renamed, so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from pyengine import durable
from pyengine.checkpoint import directory as ckdir
from pyengine.checkpoint.export import _write_safetensors
from pyengine.checkpoint.state_codec import tensor_names
from pyengine.checkpoint.stateful import unwrap_module
from pyengine.checkpoint.step_reader import open_step
from pyengine.errors import CheckpointError

__all__ = ["export_pretrained"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"


def export_pretrained(checkpoint: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], model: torch.nn.Module,
                      *, config: Optional[Any] = None, key: str = "model", step: Optional[int] = None) -> Path:
    """Writes the weights saved under `key` with `model`'s config as a from_pretrained directory.

    Args:
        checkpoint: a pe.Checkpointer directory (its newest committed step unless `step` is
            given) or one committed step directory.
        out_dir: created if missing; files already there other than the ones written are kept
            (a tokenizer saved beside the model stays).
        model: the model the checkpoint was saved from (wrapped or not): its config, and which
            of its weights are tied. A transformers PreTrainedModel, or any module with `config`.
        config: a transformers PretrainedConfig, needed when `model` is not a PreTrainedModel.
        key: the name the model was saved under ("model" for an AcceleratorCheckpointer's first).

    Returns:
        out_dir.

    Raises:
        TypeError: no config (the model is not a PreTrainedModel and none was given), or the
            config cannot be written as JSON. Nothing is written then.
        CheckpointError: no committed checkpoint, no `key` in it, its weights are not the
            model's (other names), or a file fails verification. Nothing is written then.
    """
    module = unwrap_module(model)
    config_json = _config_json(_config_of(module, config))
    step_path = ckdir.committed_step_dir(Path(checkpoint), step)
    opened = open_step(step_path, rank=0, threads=4)
    if key not in opened.objects:
        raise CheckpointError(f"{step_path} has no {key!r}; it holds {sorted(opened.objects)}. Pass the key the "
                              "model was saved under.")
    saved = opened.objects[key]
    live = module.state_dict()
    if not isinstance(saved, Mapping) or set(saved) != set(live):
        names = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
        raise CheckpointError(f"{step_path}'s {key!r} is not this model's state: it holds {names}, the model "
                              f"has {sorted(live)}; nothing was written")
    kept = _names_without_tied_copies(live, module)
    tensors = opened.read(tensor_names({name: saved[name] for name in kept}))
    prefix = f"{key}/"
    weights = {name[len(prefix):]: t for name, t in tensors.items()}
    weights = {name: weights[name] for name in kept}  # the model's order, as save_pretrained writes

    out = Path(out_dir)
    durable.make_dirs_durably(out)
    _write_safetensors(weights, out / WEIGHTS_NAME, {"format": "pt", "source": str(step_path),
                                                     "step": str(opened.step)})
    _write_text(out / CONFIG_NAME, config_json)
    generation = _generation_config(module)
    if generation is not None:
        _write_text(out / GENERATION_CONFIG_NAME, _config_json(generation))
    return out


def _config_of(module: torch.nn.Module, config: Optional[Any]) -> Any:
    """The config to write; the model's own gets what save_pretrained adds to it (the model's class
    in `architectures`, which pipelines and AutoModel read, and its dtype), on a copy."""
    if config is not None:
        return config
    found = getattr(module, "config", None)
    if found is None or not callable(getattr(found, "to_json_string", None)):
        raise TypeError(
            f"cannot export a {type(module).__qualname__}: it is not a transformers PreTrainedModel and has no "
            "config, and from_pretrained needs config.json. Pass config=<a transformers PretrainedConfig> "
            "(whose model class from_pretrained will build); nothing was written")
    found = copy.deepcopy(found)
    found.architectures = [type(module).__name__]
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        found.dtype = str(dtype).removeprefix("torch.")
    return found


def _config_json(config: Any) -> str:
    if not callable(getattr(config, "to_json_string", None)):
        raise TypeError(f"config must be a transformers PretrainedConfig (with to_json_string), got "
                        f"{type(config).__qualname__}; nothing was written")
    return config.to_json_string(use_diff=True)


def _generation_config(module: torch.nn.Module) -> Optional[Any]:
    can_generate = getattr(module, "can_generate", None)
    if callable(can_generate) and can_generate():
        return getattr(module, "generation_config", None)
    return None


def _names_without_tied_copies(live: Mapping[str, Any], module: torch.nn.Module) -> list[str]:
    """The state_dict names to store: of names sharing one storage (tied weights) only one, the
    one that is not a declared tie target (transformers' {target: source}), else the first."""
    declared = getattr(module, "all_tied_weights_keys", None) or getattr(module, "_tied_weights_keys", None) or {}
    targets = set(declared)  # a dict's keys, or (transformers 4) a list of target names
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, t in live.items():
        where: tuple[Any, ...]
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            where = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        else:
            where = (name,)
        groups.setdefault(where, []).append(name)
    dropped: set[str] = set()
    for names in groups.values():
        if len(names) > 1:
            keep = next((n for n in names if n not in targets), names[0])
            dropped.update(n for n in names if n != keep)
    return [name for name in live if name not in dropped]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        durable.write_new_file(tmp, text.encode())
        durable.rename_durably(tmp, path, replace=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
