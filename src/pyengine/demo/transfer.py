"""Demo section: transfer learning. A backbone trained on a large source set is frozen; its
bottleneck features for a small, domain-shifted target set (same labels) are cached once,
and a new head is trained on them. Compared with training from scratch on the target set."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import pyengine as pe
from pyengine.demo import synthetic
from pyengine.demo.section import Section

SHIFT = 0.3  # strength of the target domain's input shift
TARGET_TRAIN = 256  # labelled target examples: too few to learn the task from scratch


def _train(
    model: torch.nn.Module, dataset: pe.data.Dataset, loss_fn, steps: int, lr: float, workdir: Path
) -> None:
    schedule = pe.VirtualEpochs.of_steps(steps_per_epoch=steps // 4, num_checkpoints=4)
    loader = pe.data.Loader(dataset, batch_size=64, shuffle=True, seed=0, drop_last=True)
    params = [p for p in model.parameters() if p.requires_grad]
    pe.Trainer(model, torch.optim.Adam(params, lr=lr), loss_fn, loader, checkpoint_dir=workdir, progress=False).fit(
        schedule
    )


def run(workdir: Path, quick: bool) -> Section:
    section = Section("Transfer learning")
    source = synthetic.write(workdir / "source", *synthetic.teacher_task(16384, seed=10))
    tx, ty = synthetic.teacher_task(TARGET_TRAIN, seed=11, shift=SHIFT)
    target = synthetic.write(workdir / "target", tx, ty)
    test_x, test_y = synthetic.teacher_task(4096, seed=12, shift=SHIFT)

    torch.manual_seed(0)
    model = synthetic.mlp(dropout=0.0)
    _train(model, source, synthetic.cross_entropy, 1200 if quick else 2000, 3e-3, workdir / "pretrain")
    source_acc = synthetic.accuracy(model, *synthetic.teacher_task(4096, seed=13))
    shifted_acc = synthetic.accuracy(model, test_x, test_y)

    torch.manual_seed(1)
    scratch = synthetic.mlp(dropout=0.0)
    _train(scratch, target, synthetic.cross_entropy, 400, 3e-3, workdir / "scratch")
    scratch_acc = synthetic.accuracy(scratch, test_x, test_y)

    backbone = model[:-1]  # everything up to the bottleneck
    pe.transfer.freeze(backbone, bn="frozen")
    t0 = time.perf_counter()
    feats = pe.transfer.cache_features(
        backbone, pe.data.Loader(target, batch_size=256, shuffle=False), workdir / "features"
    )
    cache_s = time.perf_counter() - t0
    torch.manual_seed(2)
    head = torch.nn.Linear(128, 8)
    _train(
        head,
        feats,
        lambda m, b: torch.nn.functional.cross_entropy(m(b["features"]), b["y"]),
        400,
        1e-2,
        workdir / "head",
    )
    pe.transfer.replace_head(model, head, attr="6")
    transfer_acc = synthetic.accuracy(model, test_x, test_y)

    section.say(
        f"source model: accuracy {source_acc:.3f} on its own domain, {shifted_acc:.3f} on the shifted "
        f"target domain (same labels, inputs moved)"
    )
    section.say(
        f"{TARGET_TRAIN} labelled target examples. From scratch: target accuracy {scratch_acc:.3f}. "
        f"Frozen backbone + head trained on cached bottleneck features: {transfer_acc:.3f} "
        f"(features cached once in {cache_s * 1e3:.0f} ms)"
    )
    section.ok = transfer_acc > scratch_acc

    def draw(ax) -> None:
        names = ["source model\n(no adaptation)", "from scratch\n(target only)", "frozen backbone\n+ new head"]
        values = [shifted_acc, scratch_acc, transfer_acc]
        ax.bar(names, values, color=["#999999", "#cc6666", "#6699cc"])
        for i, v in enumerate(values):
            ax.text(i, v + 0.01, f"{v:.3f}", ha="center")
        ax.set_ylabel(f"accuracy on the target domain ({len(test_y)} test examples)")
        ax.set_ylim(0, 1)

    section.figures.append(("transfer.png", draw))
    return section
