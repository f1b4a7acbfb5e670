"""Writing datasets: a streaming writer (bounded memory) and the one-call ``write_dataset``."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

from pyengine import _core, durable
from pyengine.data import format as fmt
from pyengine.data.progress import Progress

Chunk = Mapping[str, Union[np.ndarray, Sequence[Any]]]


class _FieldShardFile:
    """One field's file of the shard being written: payload streamed (its block CRC32Cs computed
    as it goes), then the offset table (variable fields) and block table, header written last."""

    def __init__(self, path: str, kind: int, dtype: np.dtype, shape: tuple[int, ...], block_bytes: int) -> None:
        self.path, self.kind, self.dtype, self.shape = path, kind, dtype, shape
        self.block_bytes = block_bytes
        self.file = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.file.write(bytes(fmt.HEADER_BYTES))
        self.count = 0
        self.checksums = _core.BlockChecksumWriter(block_bytes)
        self.offsets = [0]

    def write(self, data: np.ndarray, count: int, sizes: Optional[list[int]] = None) -> None:
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        self.file.write(memoryview(buf))
        self.checksums.update(buf)
        self.count += count
        if sizes is not None:
            for s in sizes:
                self.offsets.append(self.offsets[-1] + s)

    def finish(self, durable: bool) -> None:
        itemsize = self.dtype.itemsize
        payload_bytes = self.checksums.payload_bytes
        self.file.write(fmt.align8_padding(payload_bytes))
        offsets_crc = 0
        if self.kind == fmt.FIXED:
            sample_bytes = int(np.prod(self.shape, dtype=np.int64)) * itemsize
        else:
            sample_bytes = itemsize
            table = np.asarray(self.offsets, dtype="<u8")
            offsets_crc = _core.crc32c(table)
            self.file.write(table.tobytes())
        block_table = self.checksums.table()
        self.file.write(block_table)
        self.file.seek(0)
        self.file.write(
            fmt.pack_header(
                self.kind,
                self.count,
                sample_bytes,
                payload_bytes,
                self.checksums.payload_crc32c,
                self.dtype,
                self.shape if self.kind == fmt.FIXED else (),
                self.block_bytes,
                _core.crc32c(np.frombuffer(block_table, dtype=np.uint8)),
                offsets_crc,
            )
        )
        self.file.flush()
        if durable:
            os.fsync(self.file.fileno())
        self.file.close()


class DatasetWriter:
    """Writes a dataset chunk by chunk, so it never has to fit in memory.

    Field kinds are fixed by the first chunk: a numpy array (first dimension = samples) makes
    a fixed-shape field; a list of bytes or 1-D arrays makes a variable-length field.
    Files go to ``PATH.tmp-<pid>`` and the directory is renamed into place after the
    manifest, so a crash never leaves something that opens as a dataset.

    Args:
        path: Directory to create.
        samples_per_shard: Samples per shard file; default from ``shard_bytes``.
        shard_bytes: Target bytes per shard (all fields together) when samples_per_shard is None.
        overwrite: Replace an existing dataset at ``path``.
        durable: fsync files and directory before returning from close().
        progress: Show a progress line (None: only on a terminal).
        total: Expected samples, for the progress line.
        metadata: A dict stored in dataset.json and returned as ``Dataset.metadata`` (class
            names, provenance, ...); it must come back from JSON unchanged (string keys; lists,
            not tuples; no NaN).
        block_bytes: Payload bytes per checksummed block (a power of two, 512 B to 1 GiB);
            the default suits every use but tests that want many blocks in a small file.

    Not thread-safe: one thread appends.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        samples_per_shard: Optional[int] = None,
        shard_bytes: int = 1 << 30,
        overwrite: bool = False,
        durable: bool = True,
        progress: Optional[bool] = None,
        total: Optional[int] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        block_bytes: int = fmt.BLOCK_BYTES,
    ) -> None:
        self.path = os.fspath(path)
        self._metadata = _checked_metadata(metadata)
        fmt.check_block_bytes(block_bytes)
        self._block_bytes = block_bytes
        if os.path.exists(self.path) and not overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite=True to replace it")
        if samples_per_shard is not None and samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self._tmp = f"{self.path}.tmp-{os.getpid()}"
        shutil.rmtree(self._tmp, ignore_errors=True)
        os.makedirs(self._tmp)
        self._samples_per_shard = samples_per_shard
        self._shard_bytes = shard_bytes
        self._overwrite, self._durable = overwrite, durable
        self._fields: dict[str, dict[str, Any]] = {}
        self._open: dict[str, _FieldShardFile] = {}
        self._shard_counts: list[int] = []
        self._in_shard = 0
        self._closed = False
        self._progress = Progress(f"writing {self.path}", total, progress)

    def append(self, chunk: Chunk) -> None:
        """Appends the samples of one chunk (every field with the same number of samples)."""
        if self._closed:
            raise ValueError("append() after close()")
        if not self._fields:
            self._declare(chunk)
        if set(chunk) != set(self._fields):
            raise ValueError(f"chunk fields {sorted(chunk)} differ from the first chunk's {sorted(self._fields)}")
        columns = {name: self._normalise(name, chunk[name]) for name in self._fields}
        counts = {len(c) for c in columns.values()}
        if len(counts) != 1:
            raise ValueError(f"fields of one chunk must have the same number of samples, got {counts}")
        n, start = counts.pop(), 0
        while start < n:
            if self._in_shard == self._samples_per_shard:
                self._finish_shard()
            take = min(n - start, self._samples_per_shard - self._in_shard)
            for name, col in columns.items():
                self._write_field(name, col[start : start + take], take)
            self._in_shard += take
            start += take
        self._progress.update(n)

    def close(self) -> None:
        """Finishes the last shard, writes the manifest and moves the dataset into place."""
        if self._closed:
            return
        self._closed = True
        self._progress.close()
        if not self._fields:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise ValueError("no samples were written")
        if self._in_shard > 0 or not self._shard_counts:
            self._finish_shard()
        manifest = {
            "format": fmt.FORMAT_NAME,
            "version": fmt.FORMAT_VERSION,
            "num_samples": sum(self._shard_counts),
            "shard_counts": self._shard_counts,
            "fields": self._fields,
            "metadata": self._metadata,
        }
        with open(os.path.join(self._tmp, fmt.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            if self._durable:
                os.fsync(f.fileno())
        if os.path.exists(self.path) and self._overwrite:
            shutil.rmtree(self.path)
        if self._durable:
            durable.fsync_dir(self._tmp)  # the shard files' and the manifest's entries
            durable.rename_durably(self._tmp, self.path)
        else:
            os.rename(self._tmp, self.path)

    def abort(self) -> None:
        """Discards everything written so far."""
        self._closed = True
        for f in self._open.values():
            f.file.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _declare(self, chunk: Chunk) -> None:
        if not chunk:
            raise ValueError("a dataset needs at least one field")
        sample_bytes = 0.0
        for name, col in chunk.items():
            fmt.check_field_name(name)
            if isinstance(col, np.ndarray):
                if col.ndim < 1:
                    raise ValueError(f"field {name!r}: the first dimension must index samples, got a scalar")
                dtype = np.dtype(fmt.dtype_str(col.dtype))
                self._fields[name] = {"kind": "fixed", "dtype": dtype.str, "shape": list(col.shape[1:])}
                sample_bytes += col[:1].nbytes
            elif isinstance(col, (list, tuple)) and len(col) > 0:
                first = col[0]
                dtype = np.dtype(np.uint8) if isinstance(first, (bytes, bytearray)) else np.asarray(first).dtype
                dtype = np.dtype(fmt.dtype_str(dtype))
                self._fields[name] = {"kind": "variable", "dtype": dtype.str, "shape": [-1]}
                sample_bytes += sum(len(_as_1d(x, dtype)) for x in col) * dtype.itemsize / len(col)
            else:
                raise ValueError(
                    f"field {name!r} must be a numpy array (fixed shape) or a non-empty list of bytes / "
                    f"1-D arrays (variable length), got {type(col).__name__}"
                )
        if self._samples_per_shard is None:
            self._samples_per_shard = max(1, int(self._shard_bytes // max(sample_bytes, 1.0)))

    def _normalise(self, name: str, col: Any) -> Any:
        info = self._fields[name]
        dtype = np.dtype(info["dtype"])
        if info["kind"] == "fixed":
            arr = np.asarray(col)
            if list(arr.shape[1:]) != info["shape"]:
                raise ValueError(f"field {name!r}: sample shape {arr.shape[1:]} differs from {tuple(info['shape'])}")
            return arr.astype(dtype, copy=False)
        return [_as_1d(x, dtype) for x in col]

    def _write_field(self, name: str, col: Any, count: int) -> None:
        info = self._fields[name]
        f = self._open.get(name)
        if f is None:
            kind = fmt.FIXED if info["kind"] == "fixed" else fmt.VARIABLE
            path = os.path.join(self._tmp, fmt.shard_file_name(name, len(self._shard_counts)))
            f = self._open[name] = _FieldShardFile(
                path, kind, np.dtype(info["dtype"]), tuple(info["shape"]), self._block_bytes
            )
        if info["kind"] == "fixed":
            f.write(col, count)
        else:
            sizes = [x.nbytes for x in col]  # the offset table is in bytes
            data = np.concatenate(col) if col else np.empty(0, dtype=np.dtype(info["dtype"]))
            f.write(data, count, sizes)

    def _finish_shard(self) -> None:
        for name, info in self._fields.items():
            if name not in self._open:  # an empty dataset still gets one (empty) shard per field
                self._write_field(name, _empty_column(info), 0)
            self._open.pop(name).finish(self._durable)
        self._shard_counts.append(self._in_shard)
        self._in_shard = 0


def _checked_metadata(metadata: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        text = json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from None
    if json.loads(text) != metadata:
        raise ValueError(
            "metadata must come back from JSON unchanged (string keys, lists rather than tuples): "
            f"{metadata!r} would be read back as {json.loads(text)!r}"
        )
    return json.loads(text)


def _as_1d(x: Any, dtype: np.dtype) -> np.ndarray:
    raw = isinstance(x, (bytes, bytearray, memoryview))
    arr = np.frombuffer(x, dtype=np.uint8) if raw else np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"variable-length samples must be 1-D, got shape {arr.shape}")
    return arr.astype(dtype, copy=False)


def _empty_column(info: dict[str, Any]) -> Any:
    if info["kind"] == "fixed":
        return np.empty([0, *info["shape"]], dtype=np.dtype(info["dtype"]))
    return []


def write_dataset(
    path: Union[str, os.PathLike],
    fields: Union[Chunk, Iterable[Chunk]],
    **options: Any,
) -> Any:
    """Writes a dataset and returns it opened as a :class:`pyengine.data.Dataset`.

    Args:
        path: Directory to create.
        fields: ``{"x": array, "y": array}`` (first dimension = samples; lists of bytes or 1-D
            arrays make variable-length fields), or an iterable of such chunks for data that
            does not fit in memory.
        **options: Passed to :class:`DatasetWriter` (samples_per_shard, shard_bytes,
            overwrite, durable, progress, total, metadata, block_bytes).

    Returns:
        The written dataset.
    """
    from pyengine.data.dataset import Dataset

    if isinstance(fields, Mapping):
        n = len(next(iter(fields.values()))) if fields else 0
        options.setdefault("total", n)
        chunks: Iterable[Chunk] = _split(fields, n)
    else:
        chunks = fields
    with DatasetWriter(path, **options) as writer:
        for chunk in chunks:
            writer.append(chunk)
    return Dataset(path)


def _split(fields: Chunk, n: int, chunk_bytes: int = 64 << 20) -> Iterable[Chunk]:
    """Cuts whole arrays into chunks so the progress line moves."""
    per_sample = sum(c[:1].nbytes if isinstance(c, np.ndarray) else 64 for c in fields.values())
    step = max(1, chunk_bytes // max(per_sample, 1))
    if n == 0:
        yield fields
    for start in range(0, n, step):
        yield {k: v[start : start + step] for k, v in fields.items()}
