"""Loader benchmark: pyengine.data.Loader against baselines measured in the same run.

Run (never alongside other benchmarks)::

    flock /tmp/pyengine-bench.lock python bench/bench_loader.py [--quick] [--dir DIR]

Prints one table. Baselines: memcpy (numpy copyto, 1 and 2 threads), a vectorised numpy gather
from an in-memory array, and torch.utils.data.DataLoader (num_workers 0 and 2, per-sample
__getitem__ + default collate) over the same in-memory data. Datasets are written once under
--dir and reused. An image section ends the table (``--images N``; ``--only-images`` runs it
alone): JPEG decode + RandomResizedCrop against DataLoader+Pillow, and DALI and FFCV when they
import (run under a Python that has them; see src/pyengine/benchmarks/image_loaders.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from collections.abc import Iterable

import numpy as np
import torch

import pyengine as pe

BATCH = 256


def memcpy_gbps(nbytes: int, threads: int, repeats: int = 5) -> float:
    """Best-of-N copy bandwidth (bytes copied / s) with `threads` threads (numpy releases the GIL)."""
    src = np.random.randint(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault both in
    parts = np.array_split(np.arange(nbytes), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def timed_samples(batches: Iterable, limit: int) -> tuple[float, int]:
    """Seconds to draw `limit` samples (or the whole iterable) and how many were drawn."""
    n = 0
    t = time.perf_counter()
    for b in batches:
        n += len(b["y"]) if isinstance(b, dict) else len(b[1])
        if n >= limit:
            break
    return time.perf_counter() - t, n


class ArrayDataset(torch.utils.data.Dataset):
    """The usual map-style dataset over in-memory arrays: one sample per __getitem__."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.x[i]), int(self.y[i])


def dataloader_rate(x: np.ndarray, y: np.ndarray, workers: int, limit: int) -> float:
    dl = torch.utils.data.DataLoader(
        ArrayDataset(x, y), batch_size=BATCH, shuffle=True, num_workers=workers,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    timed_samples(dl, min(limit, 20 * BATCH))  # start workers, warm up
    secs, n = timed_samples(dl, limit)
    return n / secs


def gather_rate(x: np.ndarray, limit: int) -> float:
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    t = time.perf_counter()
    n = 0
    for start in range(0, len(perm), BATCH):
        batch = x[perm[start : start + BATCH]]
        n += len(batch)
        if n >= limit:
            break
    return n / (time.perf_counter() - t)


def gather_into_gbps(x: np.ndarray, batch: int, repeats: int = 3) -> float:
    """Best epoch bandwidth of np.take(x, shuffled batch, out=buf): a memcpy with the loader's access pattern."""
    perm = np.random.default_rng(0).permutation(len(x))
    buf = np.empty((batch, *x.shape[1:]), dtype=x.dtype)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for start in range(0, len(perm) - batch + 1, batch):
            np.take(x, perm[start : start + batch], axis=0, out=buf)
        best = min(best, time.perf_counter() - t)
    return (len(perm) // batch) * batch * x[0].nbytes / best / 1e9


def loader_rate(ds: pe.data.Dataset, threads: int, epochs: int = 2, **kw) -> tuple[float, float]:
    """Warm samples/s and bytes/s of full-shuffle epochs (after one warm-up epoch)."""
    loader = pe.data.Loader(ds, batch_size=kw.pop("batch_size", BATCH), threads=threads, **kw)
    for _ in loader:
        pass
    best = 0.0
    for _ in range(epochs):
        secs, n = timed_samples(loader, 1 << 62)
        best = max(best, n / secs)
    return best, best * ds.nbytes / len(ds)


def evict_page_cache(path: str) -> None:
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_rate(ds: pe.data.Dataset, threads: int, **kw) -> float:
    loader = pe.data.Loader(ds, batch_size=BATCH, threads=threads, **kw)
    evict_page_cache(ds.path)
    secs, n = timed_samples(loader, 1 << 62)
    return n / secs * ds.nbytes / len(ds)


def stall_fraction(batches: Iterable, step, steps: int) -> tuple[float, float]:
    """(time waiting for the next batch) / (loop time), and the mean step time."""
    it = iter(batches)
    step(next(it))  # warm up: first batch, first step
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t
        step(batch)
    total = time.perf_counter() - t0
    return wait / total, (total - wait) / steps


def make_step(hidden: int):
    """An MLP training step on 3 KB uint8 images (one intra-op thread; the loader gets the other core).

    hidden=64 takes ~5 ms a step on the 2-core dev VM, hidden=384 ~20 ms.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3072, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(batch):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        loss = torch.nn.functional.cross_entropy(model(x.float().div_(255)), y % 10)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def ensure_dataset(path: str, n: int, sample_bytes: int) -> tuple[pe.data.Dataset, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (n, sample_bytes), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64)
    if not os.path.exists(path):
        pe.data.write_dataset(path, {"x": x, "y": y}, durable=False)
    ds = pe.data.Dataset(path)
    if len(ds) != n:
        ds = pe.data.write_dataset(path, {"x": x, "y": y}, durable=False, overwrite=True)
    return ds, x, y


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def image_section(args: argparse.Namespace, row) -> None:
    """JPEG decode + RandomResizedCrop(224) + flip: pe against DataLoader+Pillow, DALI and FFCV
    (the last two when they import), images/s and the stall of a 50 ms step; see
    src/pyengine/benchmarks/image_loaders.py for what each does."""
    from pyengine.benchmarks import image_loaders

    images = args.images or (1000 if args.quick else 20_000)
    print(f"\nimages: JPEG decoder {pe.data.image.jpeg_decoder()}", flush=True)
    results = image_loaders.run(
        images, batch_size=64, measure=640 if args.quick else 3000, steps=10 if args.quick else 40,
        workdir=os.path.join(args.dir, f"jpeg-{images}"),
    )  # fmt: skip
    base = next(r for r in results if r["name"].startswith("dataloader"))["images_per_s"]
    best_pe = max(r["images_per_s"] for r in results if r["name"].startswith("pe "))
    for r in results:
        ratio = f"pe best {best_pe / r['images_per_s']:.2f}x this" if not r["name"].startswith("pe ") else ""
        row(
            f"images: {r['name']}",
            f"{r['images_per_s']:,.0f} /s",
            f"{r['images_per_s'] / base:.2f}x DataLoader+Pillow; stall {r['stall_sleep']:.1%} of a "
            f"{r['step_sleep_s'] * 1e3:.0f} ms sleep step, {r['stall_compute']:.1%} of a "
            f"{r['step_compute_s'] * 1e3:.0f} ms CPU step; {ratio}",
        )
    row("images: largest batch pe (best) feeds every 50 ms", f"{int(best_pe * 0.05)}", "no stall below this")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "pyengine-bench-data"))
    ap.add_argument("--quick", action="store_true", help="smaller datasets (a smoke run)")
    ap.add_argument("--images", type=int, default=None, help="JPEGs in the image section (default 20000, quick 1000)")
    ap.add_argument("--only-images", action="store_true", help="run the image section alone")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    torch.set_num_threads(1)
    n_small, n_large = (20_000, 400) if args.quick else (131_072, 2_048)
    rows: list[tuple[str, str, str]] = []

    def row(what: str, value: str, note: str = "") -> None:
        rows.append((what, value, note))
        print(f"{what:<58} {value:>16}  {note}", flush=True)

    print(f"cores: {os.cpu_count()}, torch {torch.__version__}, batch {BATCH}, load average {os.getloadavg()[0]:.2f}\n")
    if args.only_images:
        image_section(args, row)
        return
    mc1, mc2 = memcpy_gbps(256 << 20, 1), memcpy_gbps(256 << 20, 2)
    row("memcpy 256 MiB, 1 thread", f"{mc1:.2f} GB/s")
    row("memcpy 256 MiB, 2 threads", f"{mc2:.2f} GB/s")

    # 3 KB samples, full shuffle.
    ds, x, y = ensure_dataset(os.path.join(args.dir, f"u8-3k-{n_small}"), n_small, 3072)
    if ds.verification == "unverified":  # written by an older pyengine (format 1): rewrite, to measure the checks
        ds = pe.data.write_dataset(ds.path, {"x": x, "y": y}, durable=False, overwrite=True)
    limit = min(n_small, 60_000)
    dl0 = dataloader_rate(x, y, 0, limit)
    dl2 = dataloader_rate(x, y, 2, limit)
    gather = gather_rate(x, n_small)
    row("3 KB: DataLoader(num_workers=0)", f"{dl0:,.0f} /s")
    row("3 KB: DataLoader(num_workers=2)", f"{dl2:,.0f} /s")
    row("3 KB: numpy fancy-index gather (in memory)", f"{gather:,.0f} /s")
    # Block checksums (verify="on_read", the default) against the opt-out, in the same run, each
    # from a fresh open: the first epoch checks every 64 KiB block once, later ones only load
    # each block's "checked" mark. Alternating the two per round spreads machine noise over both.
    first: dict[tuple[int, str], float] = {}
    warm: dict[tuple[int, str], float] = {}
    for threads in (1, 2):
        for _ in range(2):
            for verify in ("on_read", "never"):
                fresh = pe.data.Dataset(ds.path, verify=verify)
                loader = pe.data.Loader(fresh, batch_size=BATCH, threads=threads)
                secs, n = timed_samples(loader, 1 << 62)
                first[threads, verify] = max(first.get((threads, verify), 0.0), n / secs)
                for _ in range(2):
                    secs, n = timed_samples(loader, 1 << 62)
                    warm[threads, verify] = max(warm.get((threads, verify), 0.0), n / secs)
                loader.close()
        for verify in ("on_read", "never"):
            rate, label = warm[threads, verify], "" if verify == "on_read" else ", verify='never'"
            row(
                f"3 KB: pe Loader threads={threads}, warm{label}",
                f"{rate:,.0f} /s",
                f"{rate * 3072 / 1e9:.2f} GB/s; {rate / dl2:.1f}x DataLoader(nw=2); {rate / gather:.2f}x numpy gather",
            )
        for phase, rates in (("first epoch", first), ("warm", warm)):
            ratio = rates[threads, "on_read"] / rates[threads, "never"]
            row(
                f"3 KB: threads={threads}, {phase}: on_read / never",
                f"{ratio:.3f}",
                f"{rates[threads, 'on_read']:,.0f} vs {rates[threads, 'never']:,.0f} /s; target >= 0.90 "
                f"{'PASS' if ratio >= 0.90 else 'MISS'}",
            )
    cold = cold_rate(ds, 2)
    row("3 KB: pe Loader threads=2, cold page cache", f"{cold / 1e9:.2f} GB/s", "after posix_fadvise(DONTNEED)")
    half = ds.nbytes // 2
    rate, bw = loader_rate(ds, 2, cache_bytes=half)
    row("3 KB: pe Loader, cache_bytes = 50% of data, warm", f"{rate:,.0f} /s", f"{bw / 1e9:.2f} GB/s")
    loader = pe.data.Loader(ds, batch_size=BATCH, threads=2)
    t = time.perf_counter()
    next(iter(loader))
    row("3 KB: pe Loader time to first batch", f"{(time.perf_counter() - t) * 1e3:.2f} ms")
    resumed = pe.data.Loader(ds, batch_size=BATCH, threads=2)
    state = {**loader.state_dict(), "batch": len(loader) - 1}
    t = time.perf_counter()
    resumed.load_state_dict(state)
    next(iter(resumed))
    row(
        "3 KB: resume at the last batch of the epoch + first batch",
        f"{(time.perf_counter() - t) * 1e3:.2f} ms",
        f"O(1): no replay of {len(loader) - 1} batches",
    )
    loader.close()
    resumed.close()
    del x, y

    # ~150 KB samples.
    ds_l, xl, yl = ensure_dataset(os.path.join(args.dir, f"u8-150k-{n_large}"), n_large, 150 * 1024)
    take = gather_into_gbps(xl, 32)
    row(
        "150 KB: numpy take(out=) into a reused batch, 1 thread",
        f"{take:.2f} GB/s",
        "same access pattern as the loader, data in memory",
    )
    del xl, yl
    for threads in (1, 2):
        rate, bw = loader_rate(ds_l, threads, batch_size=32)
        row(
            f"150 KB: pe Loader threads={threads}, batch 32, warm",
            f"{bw / 1e9:.2f} GB/s",
            f"{rate:,.0f} /s; {bw / 1e9 / mc1:.0%} / {bw / 1e9 / mc2:.0%} of 1- / 2-thread memcpy, "
            f"{bw / 1e9 / take:.0%} of numpy take",
        )

    # Data stall in a small training step.
    steps = 100 if args.quick else 400
    _, x, y = ensure_dataset(os.path.join(args.dir, f"u8-3k-{n_small}"), n_small, 3072)
    for hidden in (64, 384):
        step = make_step(hidden)
        for threads in (1, 2):
            runs = []
            for _ in range(3):  # median of 3: other processes on a small machine add noise
                loader = pe.data.Loader(ds, batch_size=BATCH, threads=threads, infinite=True)
                runs.append(stall_fraction(loader, step, steps))
                loader.close()
            frac, step_s = sorted(runs)[1]
            oversubscribed = " (workers + step > cores)" if threads >= (os.cpu_count() or 2) else ""
            row(
                f"stall: pe Loader threads={threads}, MLP hidden={hidden}{oversubscribed}",
                f"{frac:.2%}",
                f"median of 3 ({', '.join(f'{r[0]:.2%}' for r in runs)}); step {step_s * 1e3:.1f} ms",
            )
        dl = torch.utils.data.DataLoader(ArrayDataset(x, y), batch_size=BATCH, shuffle=True, num_workers=1)
        frac_dl, step_dl = stall_fraction(dl, step, min(steps, len(dl) - 2))
        row(f"stall: DataLoader(num_workers=1), MLP hidden={hidden}", f"{frac_dl:.2%}", f"step {step_dl * 1e3:.1f} ms")
    del x, y, dl

    # Memory against thread count (pool buffers are the only per-thread cost).
    for threads in (1, 2, 4, 8):
        before = rss_mib()
        lo = pe.data.Loader(ds, batch_size=BATCH, threads=threads)
        for _ in lo:
            pass
        row(
            f"memory: threads={threads}",
            f"{lo._core.pool_bytes / 2**20:.1f} MiB pool",
            f"RSS +{rss_mib() - before:.1f} MiB after an epoch",
        )
        del lo
    image_section(args, row)
    row("load average (1 min) at the end", f"{os.getloadavg()[0]:.2f}", "other processes share these cores")
    row("peak RSS of this run", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
