"""Per-sample transforms run by a pool of threads, ahead of the consumer, in the epoch's order.

The loader's C++ workers gather raw batches; this stage splits each one into samples, calls
``fn(sample, rng)`` on every sample in ``threads`` Python threads, and stacks the results into
the batch the consumer gets. Decoders and image kernels release the GIL, so the threads run in
parallel where the work is.

Exactness: sample ``i`` of epoch ``e`` is transformed with a generator seeded from
``(seed, e, i)`` alone. What a batch holds therefore depends on neither the thread count nor
the timing, nor on where a run was resumed: batch ``b`` of epoch ``e`` is the same bytes
whether the loader got there from the start or from a saved state.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np

SampleTransform = Callable[[dict[str, np.ndarray], np.random.Generator], Mapping[str, Any]]
# Mixed into every per-sample seed so the transform's stream is unrelated to the order's
# (the sampler also derives its permutations from `seed`).
_STREAM_TAG = 0x5A3D_7E11


class SampleTransformError(RuntimeError):
    """A ``sample_transform`` raised, or returned something that cannot be stacked into a batch."""


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator sample `index` of `epoch` is transformed with (a pure function of the three)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([_STREAM_TAG, seed, epoch, index])))


class _PendingBatch:
    """One raw batch being transformed: filled by the workers sample by sample, in any order."""

    def __init__(self, epoch: int, index: int, indices: np.ndarray, samples: list[dict[str, np.ndarray]]) -> None:
        self.epoch, self.index, self.indices, self.samples = epoch, index, indices, samples
        self.outputs: Optional[dict[str, np.ndarray]] = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self._left = len(samples)
        self._lock = threading.Lock()

    def store(self, k: int, result: Mapping[str, Any]) -> None:
        """Copies sample k's result into the batch arrays (made from the first result to arrive)."""
        with self._lock:
            if self.outputs is None:
                self.outputs = {
                    name: np.empty((len(self.samples), *np.shape(v)), dtype=np.asarray(v).dtype)
                    for name, v in result.items()
                }
            outputs = self.outputs
        if result.keys() != outputs.keys():
            raise SampleTransformError(
                f"sample_transform returned keys {sorted(result)} for sample {self.indices[k]}, but "
                f"{sorted(outputs)} for another sample of the same batch: every sample needs the same keys"
            )
        for name, value in result.items():
            out = outputs[name]
            arr = np.asarray(value)
            if arr.shape != out.shape[1:] or arr.dtype != out.dtype:
                raise SampleTransformError(
                    f"sample_transform returned {name!r} with shape {arr.shape} and dtype {arr.dtype} for "
                    f"sample {self.indices[k]}, but {out.shape[1:]} and {out.dtype} for another sample of the "
                    "batch: samples are stacked, so every one needs the same shape and dtype (crop or pad to "
                    "a fixed size)"
                )
            out[k] = arr

    def finish(self, n: int, error: Optional[BaseException]) -> None:
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            self._left -= n
            last = self._left == 0
        if last:
            self.samples = []  # drops the views of the raw batch: its pool buffer can be reused
            self.done.set()


class SampleTransformPipeline:
    """Runs ``fn`` over the samples of the raw batches ``next_raw`` returns, `depth` batches ahead.

    One feeder thread pulls raw batches (``next_raw()`` -> ``(epoch, index, indices, samples)``
    or None at the end) and hands out their samples in chunks to `threads` workers; the
    consumer's :meth:`next` returns the batches in the order they were pulled. Used from one
    consumer thread; :meth:`stop` ends a run and joins every thread.
    """

    def __init__(self, fn: SampleTransform, threads: int, depth: int, seed: int) -> None:
        if not callable(fn):
            raise TypeError(f"sample_transform must be callable as fn(sample, rng), got {type(fn).__name__}")
        if threads < 1 or depth < 1:
            raise ValueError(f"transform_threads and prefetch must be >= 1, got {threads} and {depth}")
        self.fn, self.threads, self.depth, self.seed = fn, threads, depth, seed
        self._threads: list[threading.Thread] = []
        self._ready: queue.Queue[Optional[_PendingBatch]] = queue.Queue()
        self._work: queue.Queue[Optional[tuple[_PendingBatch, int, int]]] = queue.Queue()
        self._stopping = threading.Event()
        self._feed_error: Optional[BaseException] = None

    def start(self, next_raw: Callable[[], Optional[tuple[int, int, np.ndarray, list[dict[str, np.ndarray]]]]]) -> None:
        self.stop_threads()
        self._stopping.clear()
        self._feed_error = None
        self._ready = queue.Queue(maxsize=self.depth)  # bounds the batches ahead of the consumer
        self._work = queue.Queue()
        self._threads = [threading.Thread(target=self._feed, args=(next_raw,), name="pe-transform-feed", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work_loop, name=f"pe-transform-{i}", daemon=True) for i in range(self.threads)
        ]
        for t in self._threads:
            t.start()

    def next(self) -> Optional[tuple[int, int, dict[str, np.ndarray]]]:
        """The next transformed batch as (epoch, index, arrays); None at the end of the run.

        Raises:
            SampleTransformError: ``fn`` raised on a sample of this batch (earlier batches were
                all delivered); the message names the sample index, epoch and batch.
        """
        pending = self._ready.get()
        if pending is None:
            if self._feed_error is not None:
                raise self._feed_error
            return None
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.outputs is not None
        return pending.epoch, pending.index, pending.outputs

    def stop_threads(self) -> None:
        """Ends the run: the feeder and workers finish what they hold and exit; joins them.

        The caller must first make ``next_raw`` return (the loader stops its core, which makes a
        blocked ``next()`` return None)."""
        if not self._threads:
            return
        self._stopping.set()
        for _ in range(self.threads):
            self._work.put(None)
        while True:  # unblock a feeder waiting for room in the ready queue
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        for t in self._threads:
            t.join()
        self._threads = []

    def _feed(self, next_raw: Callable[[], Any]) -> None:
        try:
            while not self._stopping.is_set():
                raw = next_raw()
                if raw is None:
                    break
                epoch, index, indices, samples = raw
                pending = _PendingBatch(epoch, index, indices, samples)
                if not samples:
                    pending.outputs = {}
                    pending.done.set()
                # Chunks a few per thread: few queue operations, yet one slow sample does not
                # leave the other threads idle for the rest of the batch.
                step = max(1, -(-len(samples) // (4 * self.threads)))
                for start in range(0, len(samples), step):
                    self._work.put((pending, start, min(start + step, len(samples))))
                self._put_ready(pending)
        except BaseException as e:  # a worker error of the core: delivered after the earlier batches
            self._feed_error = e
        self._put_ready(None)

    def _put_ready(self, item: Optional[_PendingBatch]) -> None:
        while not self._stopping.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _work_loop(self) -> None:
        while True:
            task = self._work.get()
            if task is None:
                return
            pending, start, end = task
            error: Optional[BaseException] = None
            if not self._stopping.is_set() and pending.error is None:
                k = start
                try:
                    for k in range(start, end):
                        sample_index = int(pending.indices[k])
                        rng = sample_rng(self.seed, pending.epoch, sample_index)
                        result = self.fn(pending.samples[k], rng)
                        if not isinstance(result, Mapping):
                            raise SampleTransformError(
                                f"sample_transform must return a dict of arrays, got {type(result).__name__}"
                            )
                        pending.store(k, result)
                except SampleTransformError as e:
                    error = e
                except Exception as e:
                    error = SampleTransformError(
                        f"sample_transform raised on sample {int(pending.indices[k])} (epoch {pending.epoch}, "
                        f"batch {pending.index}): {type(e).__name__}: {e}"
                    )
                    error.__cause__ = e
            pending.finish(end - start, error)
