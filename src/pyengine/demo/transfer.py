"""Demo section: transfer learning. A backbone trained on a large source task (16 classes) is
frozen; a new task on the same inputs (8 other classes, read from the same hidden features of
the teacher network) has only a few labelled examples. The backbone's bottleneck features
for them are cached once and a new head is trained on them; compared with training the
whole model from scratch on those examples, for several sizes of the target set."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import pyengine as pe
from pyengine.demo import synthetic
from pyengine.demo.section import Section

HIDDEN = 8  # the teacher's hidden features, which both tasks read
SOURCE = {"classes": 16, "readout_seed": 1}
TARGET = {"classes": 8, "readout_seed": 2}
TARGET_SIZES = {False: [64, 128, 256, 512, 1024], True: [64, 128, 512]}  # --quick: True
HEADLINE = 128  # the target size the summary line quotes


def _task(n: int, seed: int, task: dict) -> tuple[np.ndarray, np.ndarray]:
    return synthetic.teacher_task(n, seed=seed, hidden=HIDDEN, **task)


def _train(
    model: torch.nn.Module, dataset: pe.data.Dataset, loss_fn, steps: int, lr: float, workdir: Path
) -> None:
    schedule = pe.VirtualEpochs.of_steps(steps_per_epoch=steps // 4, num_checkpoints=4)
    loader = pe.data.Loader(dataset, batch_size=64, shuffle=True, seed=0, drop_last=True)
    params = [p for p in model.parameters() if p.requires_grad]
    pe.Trainer(model, torch.optim.Adam(params, lr=lr), loss_fn, loader, checkpoint_dir=workdir, progress=False).fit(
        schedule
    )


def _head_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch["features"]), batch["y"])


def run(workdir: Path, quick: bool) -> Section:
    section = Section("Transfer learning")
    source = synthetic.write(workdir / "source", *_task(16384, 10, SOURCE))
    test_x, test_y = _task(4096, 12, TARGET)
    pool_x, pool_y = _task(max(TARGET_SIZES[quick]), 11, TARGET)  # each target set is a prefix of this pool

    torch.manual_seed(0)
    model = synthetic.mlp(classes=SOURCE["classes"], dropout=0.0)
    _train(model, source, synthetic.cross_entropy, 1200 if quick else 2000, 3e-3, workdir / "pretrain")
    source_acc = synthetic.accuracy(model, *_task(4096, 13, SOURCE))
    backbone = model[:-1]  # everything up to the bottleneck
    pe.transfer.freeze(backbone, bn="frozen")

    scratch_acc, transfer_acc, cache_ms = {}, {}, []
    for n in TARGET_SIZES[quick]:
        target = synthetic.write(workdir / f"target-{n}", pool_x[:n], pool_y[:n])
        torch.manual_seed(1)
        scratch = synthetic.mlp(classes=TARGET["classes"], dropout=0.0)
        _train(scratch, target, synthetic.cross_entropy, 400, 3e-3, workdir / f"scratch-{n}")
        scratch_acc[n] = synthetic.accuracy(scratch, test_x, test_y)

        t0 = time.perf_counter()
        feats = pe.transfer.cache_features(
            backbone, pe.data.Loader(target, batch_size=256, shuffle=False), workdir / f"features-{n}"
        )
        cache_ms.append(1e3 * (time.perf_counter() - t0))
        torch.manual_seed(2)
        head = torch.nn.Linear(model[-1].in_features, TARGET["classes"])
        _train(head, feats, _head_loss, 400, 1e-2, workdir / f"head-{n}")
        transfer_acc[n] = synthetic.accuracy(torch.nn.Sequential(backbone, head), test_x, test_y)

    majority = float(np.bincount(test_y).max() / len(test_y))
    section.say(
        f"source task: {len(source)} examples, {SOURCE['classes']} classes; the source model reaches accuracy "
        f"{source_acc:.3f} on it. Target task: {TARGET['classes']} other classes of the same inputs (another readout "
        f"of the same hidden features), {len(test_y)} test examples (the most frequent class: {majority:.3f})"
    )
    section.say(
        f"{HEADLINE} labelled target examples. From scratch: target accuracy {scratch_acc[HEADLINE]:.3f}. Frozen "
        f"backbone + new head trained on cached bottleneck features: {transfer_acc[HEADLINE]:.3f} (features cached "
        f"once in {np.median(cache_ms):.0f} ms)"
    )
    section.table(["labelled target examples", "from scratch", "frozen backbone + new head", "gain"],
                  [[str(n), f"{scratch_acc[n]:.3f}", f"{transfer_acc[n]:.3f}",
                    f"{transfer_acc[n] - scratch_acc[n]:+.3f}"] for n in TARGET_SIZES[quick]])
    section.ok = transfer_acc[HEADLINE] > scratch_acc[HEADLINE]

    def draw(ax) -> None:
        sizes = TARGET_SIZES[quick]
        ax.semilogx(sizes, [scratch_acc[n] for n in sizes], marker="o", color="#cc6666", label="from scratch")
        ax.semilogx(sizes, [transfer_acc[n] for n in sizes], marker="o", color="#6699cc",
                    label="frozen backbone + new head")
        ax.axhline(majority, color="#999999", linestyle=":", label="most frequent class")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("labelled target examples")
        ax.set_ylabel("target accuracy (test set)")
        ax.set_ylim(0, 1)
        ax.legend()

    section.figures.append(("transfer.png", draw))
    return section
