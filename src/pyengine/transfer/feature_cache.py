"""Bottleneck-feature cache: run a frozen backbone once and train the head on its outputs.

With a frozen backbone (and no augmentation), every epoch computes the same features
again. Computing them once and storing them as a :class:`pyengine.data.Dataset` turns each
later epoch into reading small feature vectors and training only the head.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from pyengine.data.dataset import Dataset
from pyengine.data.writer import DatasetWriter


def cache_features(
    backbone: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    path: Union[str, os.PathLike],
    *,
    input_key: str = "x",
    feature_key: str = "features",
    keep: Optional[Sequence[str]] = None,
    device: Union[str, torch.device, None] = None,
    overwrite: bool = False,
    durable: bool = True,
) -> Dataset:
    """Runs ``backbone`` once over ``loader`` and writes its outputs as a dataset.

    The backbone runs in eval mode (BatchNorm on stored statistics, no dropout) under
    ``torch.no_grad``; its mode is restored afterwards. Samples are written in the order
    the loader yields them, one pass from its current position: use a loader with
    ``shuffle=False`` to keep the dataset's order, and ``drop_last=False`` to keep every
    sample.

    Args:
        backbone: The frozen feature extractor; ``backbone(batch[input_key])`` must return
            one tensor whose first dimension is the batch.
        loader: Batches as ``dict[str, torch.Tensor]`` (a :class:`pyengine.data.Loader` or
            any finite iterable of such dicts).
        path: Directory of the new dataset.
        input_key: The batch field fed to the backbone.
        feature_key: The field name of the features in the new dataset.
        keep: Batch fields copied next to the features (labels, ids); default every field
            except ``input_key``.
        device: Where the backbone runs (batches are moved there); default: where its
            parameters are, else CPU.
        overwrite: Replace an existing dataset at ``path``.
        durable: fsync the dataset before returning.

    Returns:
        The written dataset, opened: fields ``feature_key`` plus ``keep``.

    Raises:
        ValueError: The loader is infinite or yields no batch, a field is missing, has
            the wrong first dimension, or a name collides.
        TypeError: The backbone is not a module or does not return a tensor, or a batch is not a dict.
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    if getattr(loader, "infinite", False):
        raise ValueError("cache_features needs a finite loader (one pass); this one has infinite=True")
    dev = torch.device(device) if device is not None else _device_of(backbone)
    was_training = backbone.training
    backbone.eval()
    writer = DatasetWriter(path, overwrite=overwrite, durable=durable)
    batches = 0
    try:
        with torch.no_grad():
            for batch in loader:
                writer.append(_features_chunk(backbone, batch, dev, input_key, feature_key, keep))
                batches += 1
        if batches == 0:
            raise ValueError("the loader yielded no batch, so there are no features to cache")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        backbone.train(was_training)
    return Dataset(path)


def _features_chunk(
    backbone: nn.Module,
    batch: Any,
    device: torch.device,
    input_key: str,
    feature_key: str,
    keep: Optional[Sequence[str]],
) -> dict[str, np.ndarray]:
    if not isinstance(batch, dict):
        raise TypeError(f"cache_features needs batches as dict[str, Tensor], got {type(batch).__name__}")
    if input_key not in batch:
        raise ValueError(f"the batch has no field {input_key!r} (fields: {sorted(batch)}); set input_key")
    fields = [k for k in batch if k != input_key] if keep is None else list(keep)
    if feature_key in fields:
        raise ValueError(f"feature_key {feature_key!r} collides with a kept batch field; choose another name")
    x = batch[input_key]
    features = backbone(x.to(device, non_blocking=True))
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"the backbone returned a {type(features).__name__}; cache_features needs one tensor")
    n = x.shape[0]
    if features.shape[:1] != (n,):
        raise ValueError(f"the backbone returned shape {tuple(features.shape)} for a batch of {n}")
    chunk = {feature_key: _to_numpy(features, feature_key)}
    for name in fields:
        if name not in batch:
            raise ValueError(f"keep names {name!r}, which the batch does not have (fields: {sorted(batch)})")
        value = batch[name]
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != n:
            raise ValueError(
                f"batch field {name!r} is not a tensor with one row per sample (batch of {n}); variable-length "
                "fields (with _offsets) cannot be kept: leave them out with keep="
            )
        chunk[name] = _to_numpy(value, name)
    return chunk


def _to_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        raise ValueError(f"field {name!r} is bfloat16, which numpy cannot hold; cast the backbone's output")
    return t.cpu().numpy()


def _device_of(module: nn.Module) -> torch.device:
    tensors = [*module.parameters(), *module.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")
