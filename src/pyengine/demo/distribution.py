"""Demo section: Distribution Strategy.

The demo forks a 2-process world itself (gloo on 127.0.0.1, a free port; distribution_worker
is what each rank runs) in which one model trains on one data set with synchronous data
parallelism (DDP), sharded data parallelism (FSDP2) and local SGD, and then with tensor and
pipeline parallelism against the same model trained in one process. Hogwild runs here, in
worker processes forked from this one. Then the input bottleneck (input_stall) and the FSDP
run's rank-sharded checkpoint, restored into a plain model in this process: a world of one.

Bytes communicated are counted by the kernel on each rank's TCP sockets (wire_bytes), which
carry every gloo collective whoever issues it; they include gloo's framing.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

import pyengine as pe
from pyengine.demo import distribution_task as task
from pyengine.demo import input_stall
from pyengine.demo.section import Section
from pyengine.demo.wire_bytes import tcp_bytes

STEPS = 256  # Adam steps of each data-parallel strategy; a multiple of the local SGD period
QUICK_STEPS = 64
WORLD_SIZE = 2
TOLERANCE = 1e-5  # model parallelism must end with the single-process weights, up to float rounding
NAMES = {"ddp": "DDP (synchronous)", "fsdp": "FSDP2 (sharded)",
         "local_sgd": f"local SGD (every {task.LOCAL_SGD_PERIOD})", "hogwild": "Hogwild (shared memory)"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out: Path, steps: int) -> None:
    # Imported here, not with the demo: `python -m pyengine.demo.distribution_worker` (torchrun)
    # would otherwise find the module imported already by pyengine.demo, and runpy warns.
    from pyengine.demo import distribution_worker

    # What torchrun would set; pe.distributed.init() reads it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distribution_worker.run_world(out, steps)


def launch_world(out: Path, steps: int) -> tuple[dict, int]:
    """Runs the world to its end; returns rank 0's measurements and the port it used."""
    port = _free_port()
    # Forked, not spawned: the ranks start with torch and pyengine already imported (a fresh
    # interpreter spends seconds on that). This process never joins a process group itself.
    mp.start_processes(_rank_main, args=(WORLD_SIZE, port, out, steps), nprocs=WORLD_SIZE, start_method="fork")
    return json.loads((out / "world.json").read_text()), port


def _hogwild_train(rank: int, world_size: int, model: torch.nn.Module, data: Path, steps: int,
                   losses: torch.Tensor, seconds: torch.Tensor, adam_bytes: torch.Tensor) -> None:
    """One Hogwild worker: its own Adam state and its half of the data, on the shared weights."""
    opt = torch.optim.Adam(model.parameters(), lr=task.LR)
    loader = pe.data.Loader(pe.data.Dataset(data), task.PER_RANK_BATCH, shuffle=True, seed=0, drop_last=True,
                            infinite=True, rank=rank, world_size=world_size)
    batches = iter(loader)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        loss.backward()
        opt.step()  # straight into the shared weights, without a lock
        losses[rank, step] = loss.item()
    seconds[rank] = time.perf_counter() - t0
    adam_bytes[rank] = sum(t.nbytes for state in opt.state.values() for t in state.values() if t.dim() > 0)
    loader.close()


def run_hogwild(data: Path, steps: int) -> dict:
    model = task.make_model()
    losses = torch.zeros(WORLD_SIZE, steps).share_memory_()
    seconds, adam_bytes = torch.zeros(WORLD_SIZE).share_memory_(), torch.zeros(WORLD_SIZE).share_memory_()
    before = tcp_bytes()
    pe.distributed.Hogwild(num_processes=WORLD_SIZE).run(_hogwild_train, model,
                                                         args=(data, steps, losses, seconds, adam_bytes))
    after = tcp_bytes()
    val_loss, val_acc = task.evaluate(model.state_dict())
    return {"seconds": float(seconds.max()), "sent_bytes": [None if before is None else after[0] - before[0]],
            "val_loss": val_loss, "val_accuracy": val_acc, "losses": losses.mean(0).tolist(),
            # Each worker holds its own Adam state; the one copy of the weights is shared.
            "held_bytes": (adam_bytes + sum(p.nbytes for p in model.parameters())).tolist()}


def restore_at_world_size_one(out: Path, steps: int) -> dict:
    """The FSDP run's rank-sharded checkpoint into a plain model and Adam, in this process."""
    model = task.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=task.LR)
    with pe.Checkpointer(out / "ckpt-fsdp") as ckpt:
        step = ckpt.restore({"model": model, "optimizer": opt}, rng=False)
    expected = torch.load(out / "fsdp_weights.pt")
    step_dir = out / "ckpt-fsdp" / f"step-{steps:08d}"
    return {
        "step": step,
        "max_abs_diff": max(float((v - expected[k]).abs().max()) for k, v in model.state_dict().items()),
        "val_loss": task.evaluate(model.state_dict())[0],
        "rank_bytes": [sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                       for d in sorted(step_dir.glob("rank-*"))],
        "adam_full_shapes": all(opt.state[p]["exp_avg"].shape == p.shape for p in model.parameters()),
        "adam_steps": sorted({int(opt.state[p]["step"]) for p in model.parameters()}),
    }


def _kb(n: float | None) -> str:
    return "not measured (needs Linux)" if n is None else f"{n / 1e3:,.1f} KB"


def run(workdir: Path, quick: bool) -> Section:
    section = Section("Distribution strategy")
    workdir.mkdir(parents=True, exist_ok=True)
    steps = QUICK_STEPS if quick else STEPS
    data = task.write_data(workdir)
    world, port = launch_world(workdir, steps)
    results = {**world["strategies"], "hogwild": run_hogwild(data, steps)}
    params = world["model_parallel"]["params"]
    grad_bytes = 4 * params

    section.say(
        f"a {world['world_size']}-process world (gloo on 127.0.0.1:{port}, forked by the demo); one model "
        f"({params:,} parameters) and data set ({len(pe.data.Dataset(data)):,} examples), {steps} Adam steps "
        f"of a global batch of {world['world_size'] * task.PER_RANK_BATCH} for each strategy, the same initial "
        f"weights. Bytes: what each rank's TCP sockets sent, counted by the kernel (TCP_INFO)"
    )
    rows = []
    for name, r in results.items():
        sent = r["sent_bytes"][0]
        rows.append([NAMES[name], f"{r['val_loss']:.4f}", f"{r['val_accuracy']:.3f}", f"{r['seconds']:.2f}",
                     _kb(sent), _kb(None if sent is None else sent / steps), _kb(r["held_bytes"][0])])
    section.table(["strategy", "val loss", "val accuracy", "seconds", "sent per rank", "sent per step",
                   "weights + Adam state held per rank"], rows)
    ddp, fsdp, local = (results[k] for k in ("ddp", "fsdp", "local_sgd"))
    if ddp["sent_bytes"][0] is not None:
        section.say(
            f"DDP sends {ddp['sent_bytes'][0] / steps / grad_bytes:.2f}x the gradients' {_kb(grad_bytes)} a step "
            f"(a ring all-reduce on 2 ranks); FSDP2 {fsdp['sent_bytes'][0] / ddp['sent_bytes'][0]:.2f}x DDP's bytes "
            f"(weights all-gathered for forward and again for backward, gradients reduce-scattered) for "
            f"{fsdp['held_bytes'][0] / ddp['held_bytes'][0]:.2f}x the memory, and the same weights "
            f"(val loss {fsdp['val_loss']:.6f} vs {ddp['val_loss']:.6f}); local SGD "
            f"{local['sent_bytes'][0] / ddp['sent_bytes'][0]:.3f}x ({local['averagings']} averagings); Hogwild's "
            f"workers share the weights in memory on one host"
        )

    mp_report = world["model_parallel"]
    mp_rows = []
    for name, label, sees in (("ddp", "data parallel (DDP)", "half of each batch"),
                              ("tensor", "tensor parallel", "the whole batch"),
                              ("pipeline", "pipeline parallel (GPipe)", f"the whole batch, in "
                               f"{world['model_parallel']['microbatches']} micro-batches")):
        r = mp_report[name]
        held = " / ".join(f"{n:,}" for n in r["params_held"])
        if name == "pipeline":
            held += " (layers " + " / ".join(",".join(s) for s in r["stage_layers"]) + ")"
        mp_rows.append([label, held, sees, _kb(None if r["sent_bytes"][0] is None else
                                               r["sent_bytes"][0] / mp_report["steps"]), f"{r['max_abs_diff']:.1e}"])
    section.say(f"data vs model parallelism: {mp_report['steps']} SGD steps of the same global batches, compared with "
                "the same model trained in one process")
    section.table(["", "parameters held (rank 0 / rank 1)", "each rank sees", "sent per step",
                   "max abs diff from one process"], mp_rows)

    plain, loader, details = input_stall.measure(workdir / "input", 20 if quick else 40)
    section.say(
        f"input bottleneck: each sample a {details['jpeg_bytes'] / 1e3:.1f} KB JPEG decoded, randomly cropped and "
        f"resized to {input_stall.CROP}x{input_stall.CROP} (pe.data.RandomResizedCrop), batch {input_stall.BATCH}, a "
        f"small CNN. Plain torch DataLoader (num_workers=0): {100 * plain.stall:.0f}% of the step time waiting for "
        f"input ({plain.wait_ms:.1f} of {plain.step_ms:.1f} ms a step); pe.data.Loader "
        f"({details['transform_threads']} transform thread, {details['prefetch']} batches prefetched): "
        f"{100 * loader.stall:.0f}% ({loader.wait_ms:.1f} of {loader.step_ms:.1f} ms). The decode leaves the "
        f"training thread; the step itself gets shorter only where a core is free to decode on"
    )

    restored = restore_at_world_size_one(workdir, steps)
    section.say(
        f"the FSDP run's rank-sharded checkpoint (step {restored['step']}; rank 0 wrote "
        f"{_kb(restored['rank_bytes'][0])}, rank 1 {_kb(restored['rank_bytes'][1])}) restored at world size 1 into "
        f"a plain nn.Sequential and Adam: max abs diff from the FSDP model's global weights "
        f"{restored['max_abs_diff']:.1e}, val loss {restored['val_loss']:.6f} (FSDP's {fsdp['val_loss']:.6f}); "
        f"Adam moments whole-shaped: {restored['adam_full_shapes']}, at step {restored['adam_steps']}"
    )
    section.ok = (max(mp_report[k]["max_abs_diff"] for k in ("ddp", "tensor", "pipeline")) <= TOLERANCE
                  and restored["max_abs_diff"] == 0.0 and restored["step"] == steps)

    def draw_losses(ax) -> None:
        window = 16
        for name, r in results.items():
            smooth = np.convolve(r["losses"], np.ones(window) / window, mode="valid")
            ax.plot(np.arange(window, len(r["losses"]) + 1), smooth, label=NAMES[name],
                    linestyle="--" if name == "fsdp" else "-")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (mean of {window} steps)")
        ax.set_title("2 processes, one model and data set")
        ax.legend()

    def draw_cost(ax) -> None:
        names = list(results)
        sent = [(results[n]["sent_bytes"][0] or 0) / 1e6 for n in names]
        bars = ax.bar([NAMES[n].replace(" (", "\n(") for n in names], sent, color="#6699cc")
        for bar, n in zip(bars, names):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{results[n]['seconds']:.2f} s",
                    ha="center", va="bottom")
        ax.set_ylabel("MB sent per rank (TCP)")
        ax.set_title(f"communication for {steps} steps (labels: training time)")

    def draw_stall(ax) -> None:
        names = ["torch DataLoader\nnum_workers=0", "pe.data.Loader\nprefetching"]
        waits = [plain.wait_ms, loader.wait_ms]
        computes = [plain.step_ms - plain.wait_ms, loader.step_ms - loader.wait_ms]
        ax.bar(names, computes, label="training", color="#6699cc")
        ax.bar(names, waits, bottom=computes, label="waiting for input", color="#cc6666")
        for i, s in enumerate((plain, loader)):
            ax.text(i, s.step_ms, f"stall {100 * s.stall:.0f}%", ha="center", va="bottom")
        ax.set_ylabel("ms per step")
        ax.legend()

    section.figures += [("distribution_loss.png", draw_losses), ("distribution_bytes.png", draw_cost),
                        ("input_stall.png", draw_stall)]
    return section
