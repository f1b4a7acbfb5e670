"""JPEG decode + RandomResizedCrop(224) + flip throughput, side by side in one run.

Loaders, all doing the same work per image (decode a ~400x350 q90 JPEG, torchvision's random
crop geometry, antialiased bilinear resize to 224x224, random horizontal flip, batch):

- ``dataloader``: torch DataLoader(num_workers=2) over the files, with the ``__getitem__`` a
  user writes without torchvision (Pillow open, convert, crop, resize, flip, np.array).
- ``pe``: pe.data.Loader over the written dataset with sample_transform=RandomResizedCrop,
  at 1 and 2 transform threads.
- ``dali``: NVIDIA DALI's CPU pipeline (readers.file + decoders.image_random_crop + resize +
  flip, 2 threads), when ``nvidia.dali`` imports.
- ``ffcv``: FFCV's RandomResizedCropRGBImageDecoder over a .beton of the same images
  re-encoded as JPEG q90, 2 threads, when ``ffcv`` imports (it needs OpenCV and libturbojpeg
  from the system: ``apt-get install pkg-config libopencv-dev libturbojpeg0-dev``).

And the data stall of each: the share of a loop's time spent waiting for the next batch when
every batch is followed by a ~50 ms training step, either on the CPU (a fixed matmul on one
thread: the loader has the other core) or off it (a sleep, like a step waiting on a GPU).

    python -m pyengine.benchmarks.image_loaders --images 20000
    python -m pyengine.benchmarks.image_loaders --quick
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import numpy as np
import torch

IMAGE_SIZE = (350, 400)  # height, width: about an ImageNet image
QUALITY = 90
_NOISE_TILE = 512


def generate_jpeg_folder(root: str, images: int, classes: int = 10, seed: int = 0, threads: int = 2) -> str:
    """Writes `images` JPEGs (~400x350, q90, 20-70 KB) into `root`/<class>/<n>.jpg; deterministic.

    Each image is a colour gradient with a low-frequency wave, 3-7 flat ellipses and
    rectangles, and sensor-like noise: file sizes and decode cost like photographs'.
    Existing files are kept (a second call with the same arguments is free).
    """
    import simplejpeg

    bank_rng = np.random.default_rng(seed)
    noise = [bank_rng.normal(0, 5.5, (_NOISE_TILE, _NOISE_TILE, 3)).astype(np.float32) for _ in range(4)]
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c:03d}"), exist_ok=True)

    def write(i: int) -> None:
        path = os.path.join(root, f"class{i % classes:03d}", f"{i:07d}.jpg")
        if os.path.exists(path):
            return
        pixels = synthetic_photo(np.random.default_rng([seed, i]), noise)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(simplejpeg.encode_jpeg(pixels, quality=QUALITY))
        os.replace(tmp, path)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(images)))
    return root


def synthetic_photo(rng: np.random.Generator, noise: list[np.ndarray]) -> np.ndarray:
    """One uint8 [350, 400, 3] image (see generate_jpeg_folder)."""
    h, w = IMAGE_SIZE
    y = np.arange(h, dtype=np.float32)[:, None, None] / h
    x = np.arange(w, dtype=np.float32)[None, :, None] / w
    c0, c1, c2 = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
    angle = rng.uniform(0, 2 * math.pi)
    fy, fx = rng.uniform(1, 4, 2)
    img = c0 + (c1 - c0) * (x * np.float32(math.cos(angle)) + y * np.float32(math.sin(angle)))
    img = img + (c2 - c0) * np.float32(0.3) * np.sin(np.float32(2 * math.pi * fx) * x) * np.cos(
        np.float32(2 * math.pi * fy) * y
    )
    for _ in range(int(rng.integers(3, 8))):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(15, h / 3), rng.uniform(15, w / 3)
        y0, y1, x0, x1 = int(max(cy - ry, 0)), int(min(cy + ry, h)), int(max(cx - rx, 0)), int(min(cx + rx, w))
        if y1 <= y0 or x1 <= x0:
            continue
        patch = img[y0:y1, x0:x1]
        color = rng.uniform(0, 255, 3).astype(np.float32) * np.float32(0.7)
        if rng.random() < 0.5:
            yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry
            xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
            inside = yy * yy + xx * xx <= 1
            patch[inside] = patch[inside] * np.float32(0.3) + color
        else:
            patch *= np.float32(0.3)
            patch += color
    oy, ox = rng.integers(0, _NOISE_TILE - h), rng.integers(0, _NOISE_TILE - w)
    img += noise[int(rng.integers(len(noise)))][oy : oy + h, ox : ox + w] * np.float32(rng.uniform(0.6, 1.2))
    return np.clip(img, 0, 255).astype(np.uint8)


def image_files(root: str) -> tuple[list[str], list[int]]:
    """The folder's files and labels in ImageFolder order (the order write_image_folder uses)."""
    from pyengine.data.image_folder import list_image_folder

    _, files = list_image_folder(root)
    return [p for p, _ in files], [label for _, label in files]


class PillowRandomResizedCrop(torch.utils.data.Dataset):
    """What a user writes without torchvision: Pillow decode, torchvision's crop geometry, resize, flip."""

    def __init__(self, files: list[str], labels: list[int], size: int = 224) -> None:
        self.files, self.labels, self.size = files, labels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        img = Image.open(self.files[i]).convert("RGB")
        top, left, h, w = _torchvision_crop_params(img.height, img.width)
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.Resampling.BILINEAR)
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(img)), self.labels[i]


def _torchvision_crop_params(height: int, width: int) -> tuple[int, int, int, int]:
    area = height * width
    for _ in range(10):
        target = area * random.uniform(0.08, 1.0)
        aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def dataloader_batches(root: str, batch_size: int, workers: int = 2) -> Iterator[Any]:
    files, labels = image_files(root)
    loader = torch.utils.data.DataLoader(
        PillowRandomResizedCrop(files, labels), batch_size=batch_size, shuffle=True, num_workers=workers,
        drop_last=True, persistent_workers=True,
    )  # fmt: skip
    while True:
        yield from loader


def pe_batches(dataset_path: str, batch_size: int, transform_threads: int) -> Iterator[Any]:
    import pyengine as pe

    loader = pe.data.Loader(
        dataset_path, batch_size, shuffle=True, seed=0, drop_last=True, threads=1, infinite=True,
        sample_transform=pe.data.RandomResizedCrop(size=224), transform_threads=transform_threads,
    )  # fmt: skip
    try:
        yield from loader
    finally:
        loader.close()


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken install raising on import
        return False
    return True


def dali_batches(root: str, batch_size: int, threads: int = 2) -> Iterator[Any]:
    """DALI's CPU pipeline doing the same work; yields (images, labels) TensorLists."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, seed=0)
    def pipeline():  # type: ignore[no-untyped-def]
        jpegs, labels = fn.readers.file(file_root=root, random_shuffle=True, name="files")
        images = fn.decoders.image_random_crop(
            jpegs, device="cpu", output_type=types.RGB, random_area=[0.08, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
        )  # fmt: skip
        images = fn.resize(images, resize_x=224, resize_y=224, interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
        return images, labels

    pipe = pipeline()
    pipe.build()
    while True:
        images, labels = pipe.run()
        yield images.as_tensor(), labels.as_tensor()  # dense batches, as the other loaders give


def ffcv_available() -> bool:
    try:
        import ffcv  # noqa: F401
    except Exception:
        return False
    return True


def ffcv_batches(root: str, workdir: str, batch_size: int, threads: int = 2) -> Iterator[Any]:
    """FFCV's JPEG pipeline doing the same work: its .beton holds the images re-encoded as JPEG
    q90 (RGBImageField write_mode="jpg"), decoded by RandomResizedCropRGBImageDecoder (crop
    fused with the decode, libjpeg-turbo), flipped, batched; yields (images, labels)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor
    from ffcv.writer import DatasetWriter
    from PIL import Image

    beton = os.path.join(workdir, "ffcv.beton")
    if not os.path.exists(beton):
        files, labels = image_files(root)

        class Files(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(files)

            def __getitem__(self, i: int) -> tuple[Any, int]:
                return Image.open(files[i]).convert("RGB"), labels[i]

        fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=QUALITY), "label": IntField()}
        DatasetWriter(beton + ".tmp", fields, num_workers=2).from_indexed_dataset(Files())
        os.replace(beton + ".tmp", beton)
    torch_threads = torch.get_num_threads()
    loader = Loader(
        beton, batch_size=batch_size, num_workers=threads, order=OrderOption.RANDOM, drop_last=True, seed=0,
        pipelines={
            "image": [RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip(), ToTensor()],
            "label": [IntDecoder(), ToTensor()],
        },
    )  # fmt: skip
    while True:
        for images, labels in loader:
            # FFCV sets torch.set_num_threads(num_workers) process-wide each epoch; undo it so
            # the training step it feeds runs like the other loaders'.
            torch.set_num_threads(torch_threads)
            yield images, labels


def images_per_second(batches: Iterator[Any], batch_size: int, images: int, warmup: int = 8) -> float:
    """Images per second over `images` images, after `warmup` batches: workers started, and the
    batches each loader had prefetched at the start drained, so the rate is the steady one."""
    for _ in range(warmup):
        next(batches)
    n = 0
    t = time.perf_counter()
    while n < images:
        next(batches)
        n += batch_size
    return n / (time.perf_counter() - t)


def make_step(kind: str, seconds: float = 0.05) -> Callable[[], None]:
    """A ~`seconds` training step: "compute" (a fixed matmul chain on one torch thread) or "sleep"."""
    if kind == "sleep":
        return lambda: time.sleep(seconds)
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    reps = 1
    while True:  # calibrate the repetitions to the target time on this machine
        t = time.perf_counter()
        for _ in range(reps):
            a = torch.tanh(a @ a)
        took = time.perf_counter() - t
        if took > 0.02:
            break
        reps *= 2
    reps = max(1, round(reps * seconds / took))

    def step() -> None:
        x = a
        for _ in range(reps):
            x = torch.tanh(x @ x)

    return step


def stall_fraction(batches: Iterator[Any], step: Callable[[], None], steps: int) -> tuple[float, float]:
    """(time waiting for the next batch) / (loop time) over `steps` steps, and the mean step time."""
    next(batches)
    step()
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        next(batches)
        wait += time.perf_counter() - t
        step()
    total = time.perf_counter() - t0
    return wait / total, (total - wait) / steps


def _close(batches: Iterator[Any]) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def run(
    images: int, batch_size: int = 64, measure: Optional[int] = None, steps: int = 40, workdir: Optional[str] = None
) -> list[dict[str, Any]]:
    """Generates (or reuses) the image folder and dataset, measures every available loader.

    Returns:
        One dict per loader: name, images_per_s, and stall_compute / stall_sleep (fractions).
    """
    import pyengine as pe

    workdir = workdir or os.path.join(tempfile.gettempdir(), f"pe-image-bench-{images}")
    root = os.path.join(workdir, "jpegs")
    t = time.perf_counter()
    generate_jpeg_folder(root, images)
    dataset_path = os.path.join(workdir, "dataset")
    if not os.path.exists(dataset_path):
        pe.data.write_image_folder(root, dataset_path, durable=False)
    mean_kb = pe.data.Dataset(dataset_path).nbytes / images / 1e3
    print(f"{images} JPEGs, mean {mean_kb:.1f} KB, ready in {time.perf_counter() - t:.1f} s ({workdir})")
    measure = measure or min(images, 3000)
    loaders: list[tuple[str, Callable[[], Iterator[Any]]]] = [
        ("dataloader(num_workers=2)+Pillow", lambda: dataloader_batches(root, batch_size)),
        ("pe transform_threads=1", lambda: pe_batches(dataset_path, batch_size, 1)),
        ("pe transform_threads=2", lambda: pe_batches(dataset_path, batch_size, 2)),
    ]
    if dali_available():
        loaders.append(("dali cpu num_threads=2", lambda: dali_batches(root, batch_size)))
    else:
        print("dali: nvidia.dali does not import here; skipped")
    if ffcv_available():
        loaders.append(("ffcv num_workers=2", lambda: ffcv_batches(root, workdir, batch_size)))
    else:
        print("ffcv: not importable; skipped")
    # Calibrated once, before any loader runs: loader threads would slow the calibration.
    steps_by_kind = {kind: make_step(kind) for kind in ("compute", "sleep")}
    rows = []
    for name, make in loaders:
        row: dict[str, Any] = {"name": name}
        batches = make()
        row["images_per_s"] = images_per_second(batches, batch_size, measure)
        for kind, step in steps_by_kind.items():
            row[f"stall_{kind}"], row[f"step_{kind}_s"] = stall_fraction(batches, step, steps)
        _close(batches)
        rows.append(row)
        print(
            f"{name:36s} {row['images_per_s']:8.0f} img/s   stall {100 * row['stall_compute']:5.1f}% "
            f"(CPU step {1e3 * row['step_compute_s']:.0f} ms)  {100 * row['stall_sleep']:5.1f}% "
            f"(sleep step {1e3 * row['step_sleep_s']:.0f} ms)",
            flush=True,
        )
    return rows


def print_ratios(rows: list[dict[str, Any]]) -> None:
    by_name = {r["name"]: r for r in rows}
    base = by_name["dataloader(num_workers=2)+Pillow"]["images_per_s"]
    best_pe = max(r["images_per_s"] for r in rows if r["name"].startswith("pe "))
    print(f"pe (best) / DataLoader+Pillow: {best_pe / base:.2f}x (target >= 3x)")
    # A loader keeps a 50 ms step fed (no stall) only up to rate * 50 ms images per batch.
    print(f"largest batch pe (best) feeds every 50 ms: {int(best_pe * 0.05)} images")
    for r in rows:
        if r["name"].startswith(("dali", "ffcv")):
            print(f"pe (best) / {r['name']}: {best_pe / r['images_per_s']:.2f}x (target >= 1x)")


def main(argv: Optional[Iterable[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000, help="JPEGs to generate (reused between runs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--measure", type=int, default=None, help="images timed per loader (default min(N, 3000))")
    parser.add_argument("--steps", type=int, default=40, help="training steps per stall measurement")
    parser.add_argument("--workdir", default=None, help="where the JPEGs and the dataset go (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="1000 images, 640 timed, 10 steps")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.quick:
        args.images, args.measure, args.steps = 1000, 640, 10
    print(f"threads: {os.cpu_count()} CPUs; torch {torch.__version__}; main thread {threading.current_thread().name}")
    print_ratios(run(args.images, args.batch_size, args.measure, args.steps, args.workdir))


if __name__ == "__main__":
    main()
