"""Moving an existing map-style torch Dataset into the pyengine format in one call."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from pyengine.data.dataset import Dataset
from pyengine.data.writer import DatasetWriter


def from_torch_dataset(
    dataset: Any,
    path: Union[str, os.PathLike],
    *,
    names: Optional[Sequence[str]] = None,
    variable: Sequence[str] = (),
    chunk_samples: int = 1024,
    **options: Any,
) -> Dataset:
    """Materialises a map-style dataset (``len`` and ``dataset[i]``) and returns it opened.

    Each item may be a dict (its keys name the fields), a tuple / list (fields named by
    `names`, default "x", "y", "2", ...), or a single tensor / array ("x"). Tensors, numpy
    arrays and Python numbers are accepted. A field whose samples all share one shape is
    stored fixed-shape; list it in `variable` if later samples may differ (it is then
    stored flattened, 1-D per sample).

    Args:
        dataset: The torch (or any map-style) dataset.
        path: Directory to create.
        names: Field names for tuple items.
        variable: Fields to store as variable-length.
        chunk_samples: Samples converted per write (bounds memory).
        **options: Passed to :class:`DatasetWriter` (overwrite, samples_per_shard, progress, ...).

    Returns:
        The written :class:`Dataset`.

    Raises:
        ValueError: An item has a different structure or (for a fixed field) shape than the first.
    """
    n = len(dataset)
    options.setdefault("total", n)
    with DatasetWriter(path, **options) as writer:
        for chunk in _chunks(dataset, n, names, set(variable), chunk_samples):
            writer.append(chunk)
    return Dataset(path)


def _chunks(
    dataset: Any, n: int, names: Optional[Sequence[str]], variable: set[str], chunk_samples: int
) -> Iterator[dict[str, Any]]:
    for start in range(0, n, chunk_samples):
        rows = [_as_fields(dataset[i], names) for i in range(start, min(n, start + chunk_samples))]
        keys = list(rows[0])
        chunk: dict[str, Any] = {}
        for key in keys:
            try:
                column = [row[key] for row in rows]
            except KeyError:
                raise ValueError(f"items differ in structure: some lack field {key!r}") from None
            if key in variable:
                chunk[key] = [c.reshape(-1) for c in column]
            else:
                shapes = {c.shape for c in column}
                if len(shapes) != 1:
                    raise ValueError(
                        f"field {key!r} has samples of shapes {sorted(shapes)}; pass variable=({key!r},) "
                        "to store it as variable-length"
                    )
                chunk[key] = np.stack(column)
        yield chunk


def _as_fields(item: Any, names: Optional[Sequence[str]]) -> dict[str, np.ndarray]:
    if isinstance(item, dict):
        return {str(k): _to_numpy(v) for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        default = ["x", "y"] + [str(i) for i in range(2, len(item))]
        keys = list(names) if names is not None else default[: len(item)]
        if len(keys) != len(item):
            raise ValueError(f"names has {len(keys)} entries but items have {len(item)} parts")
        return {k: _to_numpy(v) for k, v in zip(keys, item)}
    return {"x": _to_numpy(item)}


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
