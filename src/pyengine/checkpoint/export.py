"""The model artifact: weights only, one safetensors file, as opposed to the full training
state a checkpoint holds (optimizer, schedule, RNG, data position)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pyengine import durable
from pyengine.checkpoint import directory as ckdir
from pyengine.checkpoint.dtypes import code_of_torch
from pyengine.checkpoint.object_storage import ObjectStorage, is_object_url
from pyengine.checkpoint.state_codec import tensor_names
from pyengine.checkpoint.step_reader import OpenStep, open_step
from pyengine.errors import CheckpointError


def export_weights(checkpoint: str | Path, out_path: str | Path, *, key: str = "model",
                   step: int | None = None, storage_options: Mapping[str, Any] | None = None) -> Path:
    """Writes the weights saved under `key` to one safetensors file, atomically.

    Args:
        checkpoint: a checkpoint directory (DIR, whose newest committed step is used unless
            `step` is given) or one committed step directory (DIR/step-N, or any directory
            holding a committed step's manifest, such as a Lightning `last.ckpt`). Or an
            object-store URL: s3://bucket/prefix, or s3://bucket/prefix/step-N.
        out_path: the .safetensors file to write; an existing file is replaced only once the
            new one is complete and durable.
        key: the name the module was saved under.
        storage_options: for an s3:// URL: as pe.Checkpointer takes them.

    Returns:
        out_path. Raises CheckpointError if the checkpoint lacks `key` or fails verification.
    """
    if is_object_url(checkpoint):
        source, opened = _open_in_object_store(str(checkpoint), step, storage_options)
    else:
        step_path = ckdir.committed_step_dir(Path(checkpoint), step)
        source, opened = str(step_path), open_step(step_path, rank=0, threads=4)  # a sharded step comes back whole
    if key not in opened.objects:
        raise CheckpointError(f"{source} has no {key!r}; it holds {sorted(opened.objects)}")
    tensors = opened.read(tensor_names(opened.objects[key]))
    prefix = f"{key}/"
    weights = {name[len(prefix):]: t for name, t in tensors.items()}
    # "format": "pt" is what transformers' from_pretrained checks for in a safetensors file.
    metadata = {"format": "pt", "source": source, "step": str(opened.step)}
    return _write_safetensors(weights, Path(out_path), metadata)


def _open_in_object_store(url: str, step: int | None,
                          storage_options: Mapping[str, Any] | None) -> tuple[str, OpenStep]:
    prefix, _, last = url.rstrip("/").rpartition("/")
    named = ckdir.STEP_DIR.match(last)
    if named is not None and prefix != "s3:/":  # s3://bucket/prefix/step-N: that step
        url, step = prefix, int(named.group(1))
    storage = ObjectStorage(url, storage_options)
    steps = storage.steps()
    if not steps:
        raise CheckpointError(f"{storage.root} holds no committed checkpoint")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise CheckpointError(f"{storage.root} has no committed checkpoint for step {chosen}; it holds {steps}")
    return storage.step_path(chosen).url, storage.open_step(chosen, rank=0, threads=4)


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> Path:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": code_of_torch(t.dtype, name), "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.numel() * t.element_size()]}
        offset += t.numel() * t.element_size()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for t in tensors.values():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        durable.rename_durably(tmp, out, replace=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
