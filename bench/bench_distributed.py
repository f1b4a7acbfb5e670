"""Distribution strategy benchmark: the same model, data and step budget under one process,
DDP, FSDP2, local SGD and Hogwild; and rank-sharded checkpoint write time with 1 and 2 ranks.

    flock /tmp/pyengine-bench.lock python bench/bench_distributed.py [--ranks 2] [--steps 300] [--out DIR]

Each configuration runs in its own processes (torchrun for the torch.distributed ones), so
torch starts cold in each. Reported per strategy:
  - samples/s: global samples per second of training wall time (all ranks together);
  - final loss: MSE on the whole data set after the same number of global samples;
  - bytes/step: payload bytes one rank hands to collectives per optimizer step, counted by a
    DDP comm hook and in LocalSGD.average(); for FSDP2 it is derived from the parameter bytes
    (all-gather in forward and backward + reduce-scatter of gradients), marked "derived";
    Hogwild shares memory and sends nothing.
On a 2-core machine the ranks compete for the cores, so samples/s says more about overheads
than about scaling; read it as a comparison in one run, not as a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pyengine as pe

WIDTH = 256
BATCH = 64  # global batch


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, WIDTH),
                               torch.nn.Tanh(), torch.nn.Linear(WIDTH, 1))


def make_data(path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16384, 32)).astype(np.float32)
    y = np.tanh(x @ rng.standard_normal((32, 1)) / 4).astype(np.float32)
    pe.data.write_dataset(path, {"x": x, "y": y})


def full_loss(model: torch.nn.Module, data: Path) -> float:
    ds = pe.data.Dataset(data)
    batch = next(iter(pe.data.Loader(ds, len(ds), shuffle=False)))
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]))


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ------------------------------------------------------------------ worker (one rank)

def worker(strategy_name: str, steps: int, data: Path, out: Path) -> None:
    torch.set_num_threads(1)
    pe.distributed.init()
    rank, world = pe.distributed.rank(), pe.distributed.world_size()
    counted = [0]
    strategy = pe.distributed.make_strategy(strategy_name, **({"period": 8} if strategy_name == "local_sgd" else {}))
    model = strategy.wrap(make_model())
    full_param_bytes = param_bytes(make_model())
    if strategy_name == "ddp" and world > 1:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
            counted[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = pe.data.Loader(pe.data.Dataset(data), BATCH // world, shuffle=True, seed=0, drop_last=True,
                            infinite=True, rank=rank, world_size=world)
    batches = iter(loader)
    pe.distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]).backward()
        opt.step()
        strategy.after_optimizer_step()
    if strategy_name == "local_sgd":
        strategy.average()  # the final model is the average of the replicas
        counted[0] = strategy.averagings * strategy.bytes_per_averaging()
    pe.distributed.barrier()
    seconds = time.perf_counter() - start
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in
             pe.checkpoint.stateful.unwrap_module(model).state_dict().items()}
    if rank == 0:
        plain = make_model()
        plain.load_state_dict(state)
        bytes_per_step, how = counted[0] / steps, "counted"
        if strategy_name == "fsdp" and world > 1:
            bytes_per_step, how = 3 * full_param_bytes, "derived"
        (out / f"{strategy_name}-{world}.json").write_text(json.dumps({
            "strategy": strategy_name, "ranks": world, "samples_per_s": steps * BATCH / seconds,
            "final_loss": full_loss(plain, data), "bytes_per_step": bytes_per_step, "bytes_how": how}))
    pe.distributed.destroy()


def hogwild_train(rank: int, world: int, model: torch.nn.Module, steps: int, data: str, out: str) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = pe.data.Loader(pe.data.Dataset(data), BATCH // world, shuffle=True, seed=0, drop_last=True,
                            infinite=True, rank=rank, world_size=world)
    batches = iter(loader)
    # each worker takes `steps` steps of BATCH / world samples: as many samples in all as the others
    start = time.time()
    for _ in range(steps):
        batch = next(batches)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]).backward()
        opt.step()
    Path(out, f"hogwild-span-{rank}.json").write_text(json.dumps([start, time.time()]))


def run_hogwild(ranks: int, steps: int, data: Path, out: Path) -> None:
    model = make_model()
    pe.distributed.Hogwild(num_processes=ranks).run(hogwild_train, model, args=(steps, str(data), str(out)))
    spans = [json.loads((out / f"hogwild-span-{r}.json").read_text()) for r in range(ranks)]
    seconds = max(s[1] for s in spans) - min(s[0] for s in spans)  # training only, not process start
    steps *= ranks  # each worker took `steps` steps of BATCH / ranks samples
    (out / f"hogwild-{ranks}.json").write_text(json.dumps({
        "strategy": "hogwild", "ranks": ranks, "samples_per_s": steps * (BATCH // ranks) / seconds,
        "final_loss": full_loss(model, data), "bytes_per_step": 0, "bytes_how": "shared memory"}))


def checkpoint_worker(params_millions: float, directory: Path, out: Path) -> None:
    """Time from save() to durable commit of model + Adam state, on every rank at once."""
    torch.set_num_threads(1)
    pe.distributed.init()
    world = pe.distributed.world_size()
    n = int((params_millions * 1e6 / 3) ** 0.5)
    torch.manual_seed(0)
    model = pe.distributed.DataParallel().wrap(torch.nn.Sequential(*[torch.nn.Linear(n, n) for _ in range(3)]))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, n)).sum().backward()
    opt.step()
    times = []
    with pe.Checkpointer(directory, keep_last=1) as ckpt:
        for step in range(1, 4):
            pe.distributed.barrier()
            start = time.perf_counter()
            ckpt.save(step, {"model": model, "optimizer": opt}).wait()
            pe.distributed.barrier()
            times.append(time.perf_counter() - start)
        total = sum(f.stat().st_size for f in directory.rglob("*.safetensors"))
    if pe.distributed.rank() == 0:
        (out / f"checkpoint-{world}.json").write_text(json.dumps({
            "ranks": world, "bytes": total, "seconds_median": sorted(times)[1], "seconds": times}))
    pe.distributed.destroy()


# ------------------------------------------------------------------ driver

def launch(ranks: int, args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if ranks == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               __file__, *args]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ckpt-params-millions", type=float, default=12.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "train":
            worker(rest[0], int(rest[1]), Path(rest[2]), Path(rest[3]))
        else:
            checkpoint_worker(float(rest[0]), Path(rest[1]), Path(rest[2]))
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="pyengine-bench-dist-"))
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not data.exists():
        make_data(data)
    for name, ranks in (("ddp", 1), ("ddp", args.ranks), ("fsdp", args.ranks), ("local_sgd", args.ranks)):
        launch(ranks, ["--worker", "train", name, str(args.steps), str(data), str(out)])
    run_hogwild(args.ranks, args.steps, data, out)
    for ranks in (1, args.ranks):
        directory = Path(tempfile.mkdtemp(prefix="ckpt-", dir=out))
        launch(ranks, ["--worker", "checkpoint", str(args.ckpt_params_millions), str(directory), str(out)])
    rows = [json.loads((out / f).read_text()) for f in
            ("ddp-1.json", f"ddp-{args.ranks}.json", f"fsdp-{args.ranks}.json",
             f"local_sgd-{args.ranks}.json", f"hogwild-{args.ranks}.json")]
    print(f"same model ({param_bytes(make_model()) / 1e3:.0f} kB of parameters), global batch {BATCH}, "
          f"{args.steps * BATCH} samples each")
    print(f"{'strategy':<22}{'ranks':>6}{'samples/s':>12}{'final loss':>12}{'bytes/step':>14}")
    for r in rows:
        label = "one process" if r["ranks"] == 1 else r["strategy"]
        print(f"{label:<22}{r['ranks']:>6}{r['samples_per_s']:>12.0f}{r['final_loss']:>12.5f}"
              f"{r['bytes_per_step']:>14,.0f} {r['bytes_how'] if r['bytes_per_step'] else ''}")
    print("checkpoint: model + Adam, save() to durable commit on every rank (median of 3)")
    for ranks in (1, args.ranks):
        c = json.loads((out / f"checkpoint-{ranks}.json").read_text())
        print(f"  {ranks} rank(s): {c['bytes'] / 1e6:.0f} MB in {c['seconds_median']:.3f} s "
              f"({c['bytes'] / 1e6 / c['seconds_median']:.0f} MB/s)")
    (out / "summary.json").write_text(json.dumps({"strategies": rows}, indent=1))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
