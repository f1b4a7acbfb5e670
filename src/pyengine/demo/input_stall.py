"""The input bottleneck: how much of each training step waits for its batch.

Every sample is a JPEG that is decoded, randomly cropped, resized and flipped
(pe.data.RandomResizedCrop) before a small CNN trains on it. Through a plain torch DataLoader
with num_workers=0 (what a first script does) that work runs in the training thread, between
steps; through pe.data.Loader it runs in transform threads ahead of the consumer, so the
decode of the next batches overlaps the current step. The same transform, the same model and
the same number of steps in both; stall = time spent in next(batches) / wall time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import torch

import pyengine as pe

IMAGE = 112  # stored JPEGs: IMAGE x IMAGE pixels, quality 90
CROP = 64  # what the model sees
BATCH = 32
IMAGES = 256  # cycled through: the decode is the cost, not the reading


@dataclass
class Stall:
    stall: float  # fraction of the wall time spent waiting for a batch
    step_ms: float  # wall time per step, waiting included
    wait_ms: float  # of which waiting for the batch


def write_images(path: Path, n: int, seed: int = 0) -> pe.data.Dataset:
    """n JPEGs of horizontal (label 0) or vertical (label 1) stripes in random colours, plus noise."""
    if path.exists():
        return pe.data.Dataset(path)
    rng = np.random.default_rng(seed)
    coords = np.arange(IMAGE, dtype=np.float32)
    images, labels = [], rng.integers(0, 2, n)
    for label in labels:
        wave = np.sin(2 * np.pi * coords / rng.uniform(8, 24) + rng.uniform(0, 2 * np.pi)) > 0
        mask = np.broadcast_to(wave[:, None] if label == 0 else wave[None, :], (IMAGE, IMAGE))
        ink, paper = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        pixels = np.where(mask[..., None], ink, paper) + rng.normal(0, 16, (IMAGE, IMAGE, 3))
        jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(np.clip(pixels, 0, 255).astype(np.uint8)), quality=90)
        images.append(np.frombuffer(jpeg, dtype=np.uint8))
    return pe.data.write_dataset(path, {"image": images, "label": labels.astype(np.int64)}, durable=False)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 2),
    )  # fmt: skip


class _DecodedPlain(torch.utils.data.Dataset):
    """The plain-PyTorch way: decode in __getitem__, with the same transform and seeds."""

    def __init__(self, dataset: pe.data.Dataset, transform: pe.data.RandomResizedCrop) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.transform(self.dataset[i], np.random.default_rng(i))
        return {"image": torch.from_numpy(sample["image"]), "label": torch.as_tensor(sample["label"]).reshape(())}


def _forever(loader: torch.utils.data.DataLoader):
    while True:
        yield from loader


def _train(batches, steps: int) -> Stall:
    """`steps` steps after one warm-up step (torch's first backward and the loader's start)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    it = iter(batches)
    waited = 0.0
    for step in range(steps + 1):
        if step == 1:
            started, waited = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - t0
        x = batch["image"].float().div_(127.5).sub_(1.0)
        loss = torch.nn.functional.cross_entropy(model(x), batch["label"].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    wall = time.perf_counter() - started
    return Stall(stall=waited / wall, step_ms=1e3 * wall / steps, wait_ms=1e3 * waited / steps)


def measure(workdir: Path, steps: int) -> tuple[Stall, Stall, dict]:
    """(plain DataLoader, pe.data.Loader, details) over the same `steps` steps."""
    dataset = write_images(workdir / "images", IMAGES)
    transform = pe.data.RandomResizedCrop(size=CROP, scale=(0.25, 1.0), layout="CHW")
    plain = torch.utils.data.DataLoader(_DecodedPlain(dataset, transform), batch_size=BATCH, shuffle=True,
                                        num_workers=0, drop_last=True)
    plain_stall = _train(_forever(plain), steps)
    loader = pe.data.Loader(dataset, BATCH, shuffle=True, seed=0, drop_last=True, infinite=True,
                            sample_transform=transform, prefetch=4)
    pe_stall = _train(loader, steps)
    details = {"transform_threads": loader.threads, "prefetch": loader.prefetch,  # threads: the default
               "jpeg_bytes": float(np.mean([dataset[i]["image"].nbytes for i in range(len(dataset))]))}
    loader.close()
    return plain_stall, pe_stall, details
