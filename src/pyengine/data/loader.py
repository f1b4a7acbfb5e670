"""The Loader: batches from a :class:`Dataset` as torch tensors, prefetched by C++ threads."""

from __future__ import annotations

import atexit
import os
import warnings
import weakref
from collections.abc import Iterator
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from pyengine import _core
from pyengine.data.dataset import Dataset
from pyengine.data.device import DeviceCopier, pin_pool_buffers
from pyengine.data.sample_transform import SampleTransform, SampleTransformPipeline

_ORDERS = {"sequential": 0, "full": 1, "block": 2}
_STATE_FORMAT = "pyengine.data.Loader"
_STATE_KEYS = ("seed", "shuffle", "batch_size", "drop_last", "rank", "world_size", "num_samples")
_live_loaders: weakref.WeakSet[Loader] = weakref.WeakSet()


@atexit.register
def _stop_all_loaders() -> None:
    # Worker threads must be joined before the interpreter tears down the memory they use.
    for loader in list(_live_loaders):
        loader.close()


class Loader:
    """Batches of a :class:`Dataset` as ``dict[str, torch.Tensor]``, usable in any loop.

    Worker threads in C++ (GIL released) gather each batch straight into a pooled buffer;
    the tensors you get view that buffer without a copy, and it returns to the pool when
    they are freed. Variable-length fields arrive flattened, with ``<name>_offsets``
    (int64, ``batch + 1`` entries) marking where each sample starts.

    The order is a pure function of (seed, epoch, rank, world_size): the loader is a cursor
    (epoch, batch) that advances as batches are consumed, moves to the next epoch by itself
    at the end of one, and can be saved with :meth:`state_dict` and restored in O(1).

    Args:
        dataset: A :class:`Dataset` or its path.
        batch_size: Samples per batch.
        shuffle: True / "full" (a new permutation of everything each epoch), "block" (shuffled
            blocks of consecutive samples, shuffled within windows: for data far larger than
            memory), or False / "sequential".
        seed: Seed of the order.
        drop_last: Drop each rank's last partial batch; every rank then gets the same number
            of batches (use it with DDP). Without it every sample is seen exactly once.
        rank, world_size: This process's share: positions rank, rank + world_size, ...
        threads: Worker threads (default: half the CPUs, 1 to 4: the training step needs the rest;
            one thread already gathers over a million 3 KB samples a second).
        prefetch: Batches built or waiting ahead of the consumer (default 2 * threads).
        cache_bytes: Keep up to this many dataset bytes in memory across epochs (for slow
            storage whose page cache does not hold the dataset); 0 relies on the page cache.
        pin_memory: Gather into page-locked memory (needs CUDA; ignored with a warning otherwise).
        device: Copy batches to this CUDA device on a side stream (implies pin_memory).
        infinite: Stream across epoch boundaries forever (virtual epochs); len() stays the
            per-epoch batch count.
        transform: Called on each batch dict (after the device copy) before it is yielded:
            the place for per-batch augmentation with torch ops.
        sample_transform: ``fn(sample, rng) -> dict of arrays``, called on every sample (a dict
            of numpy arrays, read-only; a variable-length field is one 1-D array) in
            `transform_threads` threads ahead of the consumer; the results, which must have the
            same keys, shapes and dtypes for every sample, are stacked into the batch.
            ``rng`` is a ``numpy.random.Generator`` seeded from (seed, epoch, sample index)
            only, so batches are bit-identical for any thread count and after a resume. Runs
            before the device copy and `transform`. Heavy work must release the GIL (numpy,
            :mod:`pyengine.data.image`, most decoders do). An exception reaches the consumer
            at its batch as :class:`SampleTransformError`, naming the sample.
        transform_threads: Threads running `sample_transform` (default: `threads`).
        block_size, window_blocks: Geometry of shuffle="block" (samples per block, default
            ~4 MiB worth; blocks shuffled together, default 16).

    Use from one thread. Only one iteration is live at a time: a new ``iter()``,
    ``set_epoch`` or ``load_state_dict`` ends the previous one.
    """

    def __init__(
        self,
        dataset: Union[Dataset, str, os.PathLike],
        batch_size: int,
        shuffle: Union[bool, str] = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        threads: Optional[int] = None,
        prefetch: Optional[int] = None,
        cache_bytes: int = 0,
        pin_memory: bool = False,
        device: Union[str, torch.device, None] = None,
        infinite: bool = False,
        transform: Optional[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None,
        block_size: Optional[int] = None,
        window_blocks: int = 16,
        sample_transform: Optional[SampleTransform] = None,
        transform_threads: Optional[int] = None,
    ) -> None:
        self.dataset = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
        order = {True: "full", False: "sequential"}.get(shuffle, shuffle) if isinstance(shuffle, bool) else shuffle
        if order not in _ORDERS:
            raise ValueError(f"shuffle must be True, False, 'full', 'block' or 'sequential', got {shuffle!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if seed < 0 or cache_bytes < 0:
            raise ValueError("seed and cache_bytes must be non-negative")
        self.threads = threads if threads is not None else max(1, min(4, (os.cpu_count() or 2) // 2))
        self.prefetch = prefetch if prefetch is not None else 2 * self.threads
        if self.threads < 1 or self.prefetch < 1:
            raise ValueError(f"threads and prefetch must be >= 1, got {self.threads} and {self.prefetch}")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world_size, self.infinite = rank, world_size, infinite
        self.order, self.transform = order, transform
        self.device = torch.device(device) if device is not None else None
        self._fields = _check_fields(self.dataset)
        block = block_size if block_size is not None else max(1, (4 << 20) // max(self._mean_sample_bytes(), 1))
        self._core = _core.DataLoaderCore(
            self.dataset._core, batch_size, drop_last, _ORDERS[order], seed, rank, world_size,
            block, window_blocks, self.threads, self.prefetch, cache_bytes,
        )  # fmt: skip
        self._core.set_views([(f.dtype, None if f.kind == "variable" else f.shape) for f in self._fields.values()])
        self._names = [k for name, f in self._fields.items() for k in _batch_keys(name, f.kind)]
        self._pipeline: Optional[SampleTransformPipeline] = None
        if sample_transform is not None:
            n = transform_threads if transform_threads is not None else self.threads
            self._pipeline = SampleTransformPipeline(sample_transform, n, self.prefetch, seed)
        elif transform_threads is not None:
            raise ValueError("transform_threads is set but there is no sample_transform to run")
        self._copier: Optional[DeviceCopier] = None
        if self.device is not None and self.device.type == "cuda":
            pin_memory = True
            self._copier = DeviceCopier(self.device)
        elif self.device is not None and self.device.type != "cpu":
            raise ValueError(f"device must be a CUDA device or None, got {self.device}")
        self.pin_memory = pin_memory and torch.cuda.is_available()
        if pin_memory and not self.pin_memory:
            warnings.warn("pin_memory=True but CUDA is not available: batches are not pinned", stacklevel=2)
        if self.pin_memory:
            pin_pool_buffers(self._core, self.prefetch + self.threads + 2, self._core.fixed_batch_bytes(batch_size))
        self._epoch, self._batch = 0, 0
        self._generation = 0
        _live_loaders.add(self)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return int(self._core.num_batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._end_iteration()
        return _LoaderIterator(self, self._generation)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Moves the cursor to the start of `epoch` (only needed to jump: epochs advance by themselves)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self._end_iteration()
        self._epoch, self._batch = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """The position (next batch to yield) and what the order depends on; JSON-serialisable."""
        return {
            "format": _STATE_FORMAT, "version": 1, "epoch": self._epoch, "batch": self._batch,
            "seed": self.seed, "shuffle": self.order, "batch_size": self.batch_size,
            "drop_last": self.drop_last, "rank": self.rank, "world_size": self.world_size,
            "num_samples": len(self.dataset),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues exactly where `state` was taken: the next batch is the one that would have come next.

        Raises:
            ValueError: `state` is not a loader state, or was taken with a different order
                (seed, shuffle, batch size, drop_last, rank, world size or dataset size).
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("not a pyengine Loader state_dict")
        mine = self.state_dict()
        differ = [
            f"{k}: saved {state.get(k)!r}, this loader {mine[k]!r}" for k in _STATE_KEYS if state.get(k) != mine[k]
        ]
        if differ:
            raise ValueError("the saved loader state has a different order; " + "; ".join(differ))
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"invalid position epoch={epoch}, batch={batch} (epoch has {len(self)} batches)")
        self._end_iteration()
        self._epoch, self._batch = (epoch + 1, 0) if batch == len(self) and len(self) > 0 else (epoch, batch)

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """The sample indices of a batch, computed without reading data (for checks and tests)."""
        return self._core.batch_indices(epoch, batch)

    def cache_stats(self) -> dict[str, int]:
        return dict(self._core.cache_stats())

    def close(self) -> None:
        """Stops and joins the worker threads; the loader can be iterated again afterwards."""
        self._end_iteration()

    def _end_iteration(self) -> None:
        self._generation += 1
        self._core.stop()
        if self._pipeline is not None:
            self._pipeline.stop_threads()
        if self._copier is not None:
            self._copier.synchronize()

    def _mean_sample_bytes(self) -> int:
        return self.dataset.nbytes // max(len(self.dataset), 1)

    def _next_raw_samples(self) -> Optional[tuple[int, int, np.ndarray, list[dict[str, np.ndarray]]]]:
        """The next raw batch split into samples (views of its pool buffer), for the transform stage."""
        got = self._core.next()
        if got is None:
            return None
        epoch, index, _, arrays = got
        columns = dict(zip(self._names, arrays))
        for a in arrays:
            a.flags.writeable = False  # a transform must not edit the shared pool buffer in place
        indices = self._core.batch_indices(epoch, index)
        samples: list[dict[str, np.ndarray]] = [{} for _ in range(len(indices))]
        for name, field in self._fields.items():
            values = columns[name]
            if field.kind == "variable":
                offsets = columns[name + "_offsets"]
                for k, sample in enumerate(samples):
                    sample[name] = values[offsets[k] : offsets[k + 1]]
            else:
                for k, sample in enumerate(samples):
                    sample[name] = values[k]
        return epoch, index, indices, samples

    def _advance(self, epoch: int, index: int) -> None:
        self._epoch, self._batch = (epoch + 1, 0) if index + 1 == len(self) else (epoch, index + 1)

    def _to_tensors(self, arrays: dict[str, np.ndarray], pinned: bool) -> dict[str, torch.Tensor]:
        # Each array views the pooled buffer and keeps its lease alive; so does each tensor.
        out = {name: torch.from_numpy(a) for name, a in arrays.items()}
        if self.pin_memory and self._copier is None and not pinned:
            out = {k: v.pin_memory() for k, v in out.items()}
        return out


class _LoaderIterator:
    """One pass over the loader's cursor; stops the workers when exhausted, dropped or superseded."""

    def __init__(self, loader: Loader, generation: int) -> None:
        self._loader = loader
        self._generation = generation
        self._done = False
        loader._core.start(loader._epoch, loader._batch, loader.infinite)
        if loader._pipeline is not None:
            loader._pipeline.start(loader._next_raw_samples)

    def __iter__(self) -> _LoaderIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        loader = self._loader
        if self._done or loader._generation != self._generation:
            self._done = True
            raise StopIteration
        try:
            if loader._pipeline is not None:
                got = loader._pipeline.next()
                got = None if got is None else (got[0], got[1], False, got[2])
            else:
                got = loader._core.next()
                got = None if got is None else (got[0], got[1], got[2], dict(zip(loader._names, got[3])))
        except BaseException:
            self._finish()
            raise
        if got is None:
            if len(loader) == 0:
                loader._epoch += 1  # an epoch with no batches still counts as an epoch
            self._finish()
            raise StopIteration
        epoch, index, pinned, arrays = got
        loader._advance(epoch, index)
        out = loader._to_tensors(arrays, pinned)
        if loader._copier is not None:
            out = loader._copier(out)
        return loader.transform(out) if loader.transform is not None else out

    def _finish(self) -> None:
        self._done = True
        if self._loader._generation == self._generation:
            self._loader._core.stop()
            if self._loader._pipeline is not None:
                self._loader._pipeline.stop_threads()

    def __del__(self) -> None:
        # A consumer that breaks out of its loop drops the iterator: stop the workers now.
        if not self._done:
            self._finish()


def _batch_keys(name: str, kind: str) -> list[str]:
    return [name, name + "_offsets"] if kind == "variable" else [name]


def _check_fields(dataset: Dataset) -> dict[str, Any]:
    for name, info in dataset.fields.items():
        try:
            torch.from_numpy(np.empty(0, dtype=info.dtype))
        except TypeError:
            raise ValueError(f"field {name!r} has dtype {info.dtype}, which torch tensors cannot hold") from None
        if info.kind == "variable" and name + "_offsets" in dataset.fields:
            raise ValueError(f"field names {name!r} and {name + '_offsets'!r} collide in a batch")
    return dict(dataset.fields)
