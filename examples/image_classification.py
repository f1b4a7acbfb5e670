"""Image classification from a folder of JPEGs in a plain PyTorch loop (no Trainer).

Run: python examples/image_classification.py [--dir DIR] [--epochs 10]

1. Makes a small image folder (train/ and val/, one sub-folder per class) of generated JPEGs:
   discs, horizontal stripes and vertical stripes, in random colours, sizes and positions.
2. Converts each folder to a pyengine dataset with pe.data.write_image_folder: the JPEG bytes
   are stored as they are, the class names go into the dataset's metadata.
3. Trains a tiny CNN on RandomResizedCrop(layout="CHW") batches (decoded, cropped, resized and
   flipped per sample in the loader's transform threads, with randomness derived from
   (seed, epoch, sample), so a resumed run sees the same crops), checkpointing each epoch.
4. Evaluates on CenterCrop batches of the validation folder and prints accuracy. Run it again
   with more --epochs and it resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import pyengine as pe

CLASSES = ("discs", "horizontal_stripes", "vertical_stripes")
SIZE = 48  # training resolution: small, so a few epochs take seconds on 2 cores


def draw(kind: str, rng: np.random.Generator, height: int = 96, width: int = 128) -> np.ndarray:
    """One uint8 [height, width, 3] picture of the class `kind` on a noisy background."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    background, ink = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if kind == "discs":
        mask = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(2, 5))):
            cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(8, 24)
            mask |= (y - cy) ** 2 + (x - cx) ** 2 < r * r
    else:
        period = rng.uniform(10, 24)
        along = y if kind == "horizontal_stripes" else x
        mask = np.sin(2 * np.pi * along / period + rng.uniform(0, 2 * np.pi)) > 0
    img = np.where(mask[..., None], ink, background) + rng.normal(0, 12, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: str, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(draw(kind, rng)).save(buf, "JPEG", quality=90)
            with open(os.path.join(root, kind, f"{i:04d}.jpg"), "wb") as f:
                f.write(buf.getvalue())


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, len(CLASSES)),
    )  # fmt: skip


def as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in about [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def evaluate(model: torch.nn.Module, loader: pe.data.Loader) -> float:
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for batch in loader:
            correct += int((model(as_input(batch["image"])).argmax(1) == batch["label"]).sum())
            seen += len(batch["label"])
    model.train()
    return correct / seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "pyengine-image-example"))
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the loader's transform threads use the other core

    datasets = {}
    for split, per_class, seed in (("train", 120, 0), ("val", 30, 1)):
        folder, path = os.path.join(args.dir, split), os.path.join(args.dir, f"{split}.ds")
        if not os.path.exists(folder):
            make_image_folder(folder, per_class, seed)
        datasets[split] = pe.data.write_image_folder(folder, path, overwrite=True, durable=False)
    print(f"classes: {datasets['train'].metadata['classes']}; {len(datasets['train'])} train, "
          f"{len(datasets['val'])} val images")  # fmt: skip

    train = pe.data.Loader(
        datasets["train"], batch_size=32, shuffle=True, seed=0, drop_last=True, transform_threads=2,
        sample_transform=pe.data.RandomResizedCrop(size=SIZE, scale=(0.25, 1.0), layout="CHW"),
    )  # fmt: skip
    val = pe.data.Loader(
        datasets["val"], batch_size=64, shuffle=False,
        sample_transform=pe.data.CenterCrop(size=SIZE, resize=SIZE, layout="CHW"),
    )  # fmt: skip
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ckpt = pe.Checkpointer(os.path.join(args.dir, "checkpoints"), keep_last=2)

    state = {"model": model, "optimizer": opt, "loader": train}
    # A second run continues from the newest checkpoint: same weights, same next batch and crops.
    step = ckpt.restore(state) if ckpt.latest_step() is not None else 0
    if step:
        print(f"resumed at step {step}, epoch {train.epoch}")
    while train.epoch < args.epochs:
        epoch = train.epoch
        for batch in train:  # the loader moves to the next epoch (new order, new crops) by itself
            loss = F.cross_entropy(model(as_input(batch["image"])), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        # Returns once the state is copied; the files are written in the background.
        ckpt.save(step, state)
        print(f"epoch {epoch}: last loss {float(loss.detach()):.3f}, val accuracy {evaluate(model, val):.1%}")
    ckpt.wait()
    print(f"checkpoints: steps {ckpt.steps()} in {os.path.join(args.dir, 'checkpoints')}")
    train.close()
    val.close()


if __name__ == "__main__":
    main()
