"""The model artifact: weights only, one safetensors file, as opposed to the full training
state a checkpoint holds (optimizer, schedule, RNG, data position)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pyengine import durable
from pyengine.checkpoint import directory as ckdir
from pyengine.checkpoint.dtypes import code_of_torch
from pyengine.checkpoint.state_codec import tensor_names
from pyengine.checkpoint.step_reader import open_step
from pyengine.errors import CheckpointError


def export_weights(checkpoint: str | Path, out_path: str | Path, *, key: str = "model",
                   step: int | None = None) -> Path:
    """Writes the weights saved under `key` to one safetensors file, atomically.

    Args:
        checkpoint: a checkpoint directory (DIR, whose newest committed step is used unless
            `step` is given) or one committed step directory (DIR/step-N, or any directory
            holding a committed step's manifest, such as a Lightning `last.ckpt`).
        out_path: the .safetensors file to write; an existing file is replaced only once the
            new one is complete and durable.
        key: the name the module was saved under.

    Returns:
        out_path. Raises CheckpointError if the checkpoint lacks `key` or fails verification.
    """
    root = Path(checkpoint)
    if (root / "manifest.json").exists():
        step_path = root
    else:
        steps = ckdir.committed_steps(root)
        if not steps:
            raise CheckpointError(f"{root} holds no committed checkpoint")
        chosen = steps[-1] if step is None else step
        step_path = ckdir.step_dir(root, chosen)
    opened = open_step(step_path, rank=0, threads=4)  # a sharded step's tensors come back whole
    if key not in opened.objects:
        raise CheckpointError(f"{step_path} has no {key!r}; it holds {sorted(opened.objects)}")
    tensors = opened.read(tensor_names(opened.objects[key]))
    prefix = f"{key}/"
    weights = {name[len(prefix):]: t for name, t in tensors.items()}
    # "format": "pt" is what transformers' from_pretrained checks for in a safetensors file.
    metadata = {"format": "pt", "source": str(step_path), "step": str(opened.step)}
    return _write_safetensors(weights, Path(out_path), metadata)


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
