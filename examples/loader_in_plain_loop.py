"""pe.data.Loader in a plain PyTorch loop, with per-batch augmentation and exact resume.

Run: python examples/loader_in_plain_loop.py [--dir DIR]

1. Writes a small image dataset (uint8 32x32 RGB, int64 labels) once.
2. Trains a tiny CNN. Augmentation (random crop + horizontal flip) runs per batch with torch
   ops in the loader's `transform` hook, on whatever device the batch is on; the loader's
   C++ threads only read and gather bytes.
3. Saves the loader's position mid-epoch (its state_dict is plain JSON) and shows that a
   fresh loader restored from it yields exactly the batches that were still to come.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

import pyengine as pe


def make_dataset(path: str, n: int = 4096) -> pe.data.Dataset:
    if os.path.exists(path):
        return pe.data.Dataset(path)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    # Class-dependent brightness so the model has something to learn.
    images = (rng.integers(0, 128, (n, 3, 32, 32)) + labels[:, None, None, None] * 12).astype(np.uint8)
    return pe.data.write_dataset(path, {"image": images, "label": labels.astype(np.int64)})


def augment(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random 28x28 crop (one offset per batch) and per-sample horizontal flip, then scale to [0, 1]."""
    x = batch["image"]
    top, left = torch.randint(0, 5, (2,)).tolist()
    x = x[:, :, top : top + 28, left : left + 28].float().div_(255)
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return {"image": x, "label": batch["label"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "pyengine-example"))
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = make_dataset(os.path.join(args.dir, "images"))

    loader = pe.data.Loader(
        ds, batch_size=128, shuffle=True, seed=0, drop_last=True,
        device=device if device.type == "cuda" else None,  # side-stream copy from pinned buffers
        transform=augment,
    )  # fmt: skip
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(), torch.nn.Linear(256, 10),
    ).to(device)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    for epoch in range(args.epochs):  # the loader moves to the next epoch (new order) by itself
        total, correct, seen = 0.0, 0, 0
        for batch in loader:
            logits = model(batch["image"])
            loss = F.cross_entropy(logits, batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(logits)
            correct += int((logits.argmax(1) == batch["label"]).sum())
            seen += len(logits)
        print(f"epoch {epoch}: loss {total / seen:.3f}, train accuracy {correct / seen:.1%}")

    # Exact mid-epoch resume: stop after 5 batches, save the position, continue elsewhere.
    it = iter(loader)
    for _ in range(5):
        next(it)
    saved = json.dumps(loader.state_dict())  # what pe.Checkpointer stores for {"loader": loader}
    still_to_come = [b["label"].tolist() for b in it]
    fresh = pe.data.Loader(ds, batch_size=128, shuffle=True, seed=0, drop_last=True)
    fresh.load_state_dict(json.loads(saved))
    resumed = [b["label"].tolist() for b in fresh]
    print(
        f"resume from {saved}: {len(resumed)} batches, identical to the uninterrupted run: {resumed == still_to_come}"
    )


if __name__ == "__main__":
    main()
