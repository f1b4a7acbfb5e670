"""Distribution strategy benchmark: the same model, data and sample budget under one process,
DDP, FSDP2, local SGD, Hogwild, tensor parallel and pipeline parallel (GPipe); and
rank-sharded checkpoint write time with 1 and 2 ranks.

    flock /tmp/pyengine-bench.lock python bench/bench_distributed.py [--ranks 2] [--steps 300] [--out DIR]

Each configuration runs in its own processes (torchrun for the torch.distributed ones), so
torch starts cold in each. Every row trains on `steps * BATCH` samples. The data-parallel
rows split each global batch of BATCH over the ranks (BATCH / ranks each); the tensor- and
pipeline-parallel ranks split the model instead, so every rank sees the same whole batch of
BATCH and the global batch is BATCH, not BATCH * ranks; a sample counts once however many
ranks work on it. Reported per strategy:
  - samples/s: global samples per second of training wall time (all ranks together);
  - final loss: MSE of the whole (plain) model on the whole data set after the same number
    of samples: FSDP and tensor-parallel shards are gathered (full_tensor()), pipeline stages'
    state_dicts are gathered to rank 0 into a plain model;
  - bytes/step: payload bytes one rank (the busiest) hands to collectives per optimizer step.
    Counted by a DDP comm hook, in LocalSGD.average(), and, for tensor and pipeline
    parallel, by a dispatch mode that sees every collective and send of one steady-state
    step (an all-reduce's input, a send's tensor). For FSDP2 it is derived from the
    parameter bytes (two all-gathers of the full parameters, forward and backward, plus a
    reduce-scatter of the full gradients), marked "derived". Hogwild shares memory and sends
    nothing;
  - state/rank: bytes of parameters + gradients + Adam state one rank holds, measured on
    the rank's own tensors (the local shards of DTensors; a pipeline rank's stage only; DDP
    also keeps its gradient buckets, a second copy of the gradients); min-max over ranks.
    Activations and FSDP's transiently gathered parameters are not in it;
  - peak RSS: ru_maxrss of the largest rank. With a 0.3 MB model it is the torch runtime
    (~300 MiB) and tells the strategies apart by nothing; it matters once the state does.

When each pays off, as the numbers show with 2 ranks (WIDTH 256, batch 64):
  - data parallel (DDP, local SGD, Hogwild): the model and its optimizer state fit on one
    device. DDP all-reduces the whole gradient every step (bytes/step = parameter bytes,
    whatever the batch) and holds the full state on every rank, plus its buckets; local SGD
    divides the traffic by its period (averaged replicas are not the synchronous model, so
    its loss differs, here not for the worse); Hogwild sends nothing but needs one host.
  - FSDP2: the state does not fit but each layer does; state/rank falls by the rank count
    for ~3x the parameter bytes per step, which overlap with compute on a fast network. On
    gloo with this small model it is the slowest row: the per-step gathers dominate.
  - tensor parallel: a single layer (or its activations) is too large for one device. It
    halves the state like FSDP, but communicates activations: an all-reduce of the block
    output (batch x width) every forward, and one of the input gradient every backward when
    the block's input needs one (not here: the block is the model's first layer, so one
    64x256 fp32 all-reduce, 65,536 B, per step; a block deeper in a network pays two). The
    traffic grows with batch x width x layers and sits on the critical path of every layer,
    so it needs a fast interconnect (NVLink, within a node); here it is below DDP's only
    because batch x width < the parameter count.
  - pipeline parallel: the model is too large for one device and the network is slow
    (across nodes): only the boundary activations go forward and their gradients come back,
    per micro-batch (4 x 16x256 fp32 = 65,536 B each way per step). Stages split at whole
    modules, so the state can be uneven (the 256x256 layer cannot be halved), each stage
    keeps the activations of all its micro-batches until their backward, and GPipe idles
    in the bubble, (stages-1) / (microbatches+stages-1) = 1/5 of each step here.
Tensor and pipeline parallel compute the same arithmetic as one process on the same batches,
so their final loss matches it; on a 2-core machine their many small messages per step cost
more than this small model's compute, which is why their samples/s trails one process:
they pay off only when the model does not fit, not to go faster.
On a 2-core machine the ranks compete for the cores, so samples/s says more about overheads
than about scaling; read it as a comparison in one run, not as a speed-up.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pyengine as pe

WIDTH = 256  # tensor parallel splits it across the ranks: keep it divisible by --ranks
BATCH = 64  # global batch
MICROBATCHES = 4  # pipeline micro-batches per step (GPipe)
MODEL_PARALLEL = ("tensor", "pipeline")  # every rank sees the whole global batch


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


# ------------------------------------------------------------------ measuring one rank

class CollectiveBytes(TorchDispatchMode):
    """Counts, while active, the payload bytes this rank hands to collectives and sends.

    Sees the functional collectives that DTensor (tensor parallel) issues in forward and
    backward, and the c10d ops that pipelining's point-to-point sends go through. The count is
    what this rank puts in: an all-reduce's input, an all-gather's local shard, a
    reduce-scatter's full input, a send's tensor; receives are the peers' sends.
    """

    PAYLOAD_ARG = {"all_reduce": 0, "all_reduce_coalesced": 0, "allreduce_": 0, "all_gather_into_tensor": 0,
                   "all_gather_into_tensor_coalesced": 0, "allgather_": 1, "_allgather_base_": 1,
                   "reduce_scatter_tensor": 0, "reduce_scatter_tensor_coalesced": 0, "reduce_scatter_": 1,
                   "_reduce_scatter_base_": 1, "all_to_all_single": 0, "alltoall_base_": 1, "send": 0}

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        arg = self.PAYLOAD_ARG.get(func._opname) if "c10d" in func.namespace else None
        if arg is not None:
            self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(args[arg])
                              if isinstance(t, torch.Tensor))
        return func(*args, **(kwargs or {}))


def local_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes this rank holds of `tensors`: a DTensor counts its local shard only."""
    total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def rank_state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters + gradients + optimizer state held by this rank (activations and DDP buckets aside)."""
    params = list(model.parameters())
    return (local_bytes(params) + local_bytes(p.grad for p in params)
            + local_bytes(v for state in opt.state.values() for v in state.values()))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def gather(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (a collective; just [obj] outside a job)."""
    if not pe.distributed.is_distributed():
        return [obj]
    objs: list[Any] = [None] * pe.distributed.world_size()
    dist.all_gather_object(objs, obj)
    return objs


def full_state_dict(strategy_name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict, on every rank (a collective): pipeline stages are merged,
    DTensor shards (FSDP2, tensor parallel) gathered."""
    if strategy_name == "pipeline":
        return {k: v for stage in gather(model.state_dict()) for k, v in stage.items()}
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in
            pe.checkpoint.stateful.unwrap_module(model).state_dict().items()}


# ------------------------------------------------------------------ worker (one rank)

def build(strategy_name: str) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer]:
    """The strategy, what this rank trains (the wrapped model, or its pipeline stage) and its optimizer."""
    options: dict[str, dict[str, Any]] = {
        "local_sgd": {"period": 8},
        "pipeline": {"loss_fn": torch.nn.functional.mse_loss, "n_microbatches": MICROBATCHES}}
    strategy = pe.distributed.make_strategy(strategy_name, **options.get(strategy_name, {}))
    model = strategy.wrap(make_model())
    return strategy, model, torch.optim.Adam(model.parameters(), lr=3e-3)


def count_ddp_bytes(model: torch.nn.Module, counted: list[int], buckets: dict[int, int]) -> None:
    """Counts the all-reduced bytes into counted[0], and records each gradient bucket's size:
    DDP's buckets are a second copy of the gradients that the rank holds."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
        size = bucket.buffer().numel() * bucket.buffer().element_size()
        counted[0] += size
        buckets[bucket.index()] = size
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)


def train_step(strategy: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> None:
    opt.zero_grad()
    if strategy.name == "pipeline":
        strategy.step(batch["x"], batch["y"])  # every rank passes the same batch; the last computes the loss
    else:
        torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]).backward()
    opt.step()
    strategy.after_optimizer_step()


def worker(strategy_name: str, steps: int, data: Path, out: Path) -> None:
    torch.set_num_threads(1)
    pe.distributed.init()
    rank, world = pe.distributed.rank(), pe.distributed.world_size()
    strategy, model, opt = build(strategy_name)
    counted, ddp_buckets = [0], {}
    if strategy_name == "ddp" and world > 1:
        count_ddp_bytes(model, counted, ddp_buckets)
    # the model-parallel ranks split the model, not the data: each sees the whole global batch
    split_data = strategy_name not in MODEL_PARALLEL
    loader = pe.data.Loader(pe.data.Dataset(data), BATCH // world if split_data else BATCH, shuffle=True, seed=0,
                            drop_last=True, infinite=True, rank=rank if split_data else 0,
                            world_size=world if split_data else 1)
    batches = iter(loader)
    pe.distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps - 1):
        train_step(strategy, model, opt, next(batches))
    last_step = CollectiveBytes()  # counts a steady-state step: the pipeline's first also sends shapes
    with last_step if strategy_name in MODEL_PARALLEL else contextlib.nullcontext():
        train_step(strategy, model, opt, next(batches))
    if strategy_name == "local_sgd":
        strategy.average()  # the final model is the average of the replicas
        counted[0] = strategy.averagings * strategy.bytes_per_averaging()
    pe.distributed.barrier()
    seconds = time.perf_counter() - start
    sent = counted[0] / steps if strategy_name in ("ddp", "local_sgd") else last_step.bytes
    held = rank_state_bytes(model, opt) + sum(ddp_buckets.values())
    ranks = gather({"state_bytes": held, "peak_rss": peak_rss(), "bytes_per_step": sent})
    state = full_state_dict(strategy_name, model)
    if rank == 0:
        plain = make_model()
        plain.load_state_dict(state)
        bytes_per_step, how = max(r["bytes_per_step"] for r in ranks), "counted"
        if strategy_name == "fsdp" and world > 1:
            bytes_per_step, how = 3 * param_bytes(plain), "derived"
        (out / f"{strategy_name}-{world}.json").write_text(json.dumps({
            "strategy": strategy_name, "ranks": world, "samples_per_s": steps * BATCH / seconds,
            "final_loss": full_loss(plain, data), "bytes_per_step": bytes_per_step, "bytes_how": how,
            "state_bytes": [r["state_bytes"] for r in ranks], "peak_rss": max(r["peak_rss"] for r in ranks),
            "per_rank": ranks}))
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
    Path(out, f"hogwild-span-{rank}.json").write_text(json.dumps({
        "span": [start, time.time()], "state_bytes": rank_state_bytes(model, opt), "peak_rss": peak_rss()}))


def run_hogwild(ranks: int, steps: int, data: Path, out: Path) -> None:
    model = make_model()
    pe.distributed.Hogwild(num_processes=ranks).run(hogwild_train, model, args=(steps, str(data), str(out)))
    spans = [json.loads((out / f"hogwild-span-{r}.json").read_text()) for r in range(ranks)]
    seconds = max(s["span"][1] for s in spans) - min(s["span"][0] for s in spans)  # training only
    steps *= ranks  # each worker took `steps` steps of BATCH / ranks samples
    (out / f"hogwild-{ranks}.json").write_text(json.dumps({
        "strategy": "hogwild", "ranks": ranks, "samples_per_s": steps * (BATCH // ranks) / seconds,
        "final_loss": full_loss(model, data), "bytes_per_step": 0, "bytes_how": "shared memory",
        "state_bytes": [s["state_bytes"] for s in spans], "peak_rss": max(s["peak_rss"] for s in spans),
        "per_rank": spans}))


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
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}:\n{done.stderr[-4000:]}")


def unfit_model_parallel(ranks: int, skip: bool) -> Any:
    """The model-parallel strategies this model fits with `ranks` ranks (skip=False), or those
    it does not, with the reason (skip=True)."""
    why = {}
    if WIDTH % ranks:
        why["tensor"] = f"WIDTH {WIDTH} is not divisible by {ranks} ranks"
    if ranks > len(make_model()):
        why["pipeline"] = f"{len(make_model())} top-level modules cannot fill {ranks} stages"
    return why if skip else [name for name in MODEL_PARALLEL if name not in why]


def print_table(rows: list[dict], steps: int) -> None:
    print(f"same model ({param_bytes(make_model()) / 1e3:.0f} kB of parameters), global batch {BATCH}, "
          f"{steps * BATCH} samples each")
    print(f"{'strategy':<18}{'ranks':>6}{'samples/s':>11}{'final loss':>12}{'bytes/step':>12}{'':<14}"
          f"{'state/rank':>14}{'peak RSS':>10}")
    labels = {"tensor": "tensor parallel", "pipeline": "pipeline (GPipe)"}
    for r in rows:
        label = "one process" if r["ranks"] == 1 else labels.get(r["strategy"], r["strategy"])
        how = r["bytes_how"] if r["bytes_per_step"] else ""
        low, high = min(r["state_bytes"]) / 1e3, max(r["state_bytes"]) / 1e3
        held = f"{high:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"
        print(f"{label:<18}{r['ranks']:>6}{r['samples_per_s']:>11.0f}{r['final_loss']:>12.5f}"
              f"{r['bytes_per_step']:>12,.0f} {how:<13}{held:>11} kB{r['peak_rss'] / 2**20:>6.0f} MiB")
    print("state/rank: parameters + gradients (+ DDP's buckets) + Adam state held by one rank (min-max over "
          "ranks); peak RSS: the largest rank's, mostly the torch runtime")


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
    runs = [("ddp", 1), ("ddp", args.ranks), ("fsdp", args.ranks), ("local_sgd", args.ranks)]
    runs += [(name, args.ranks) for name in unfit_model_parallel(args.ranks, skip=False)]
    for name, ranks in runs:
        launch(ranks, ["--worker", "train", name, str(args.steps), str(data), str(out)])
    run_hogwild(args.ranks, args.steps, data, out)
    rows = [json.loads((out / f"{name}-{ranks}.json").read_text()) for name, ranks in runs[:4]]
    rows.append(json.loads((out / f"hogwild-{args.ranks}.json").read_text()))
    rows += [json.loads((out / f"{name}-{ranks}.json").read_text()) for name, ranks in runs[4:]]
    print_table(rows, args.steps)
    for name, why in unfit_model_parallel(args.ranks, skip=True).items():
        print(f"  ({name} skipped: {why})")
    (out / "summary.json").write_text(json.dumps({"strategies": rows}, indent=1))
    for ranks in (1, args.ranks):
        directory = Path(tempfile.mkdtemp(prefix="ckpt-", dir=out))
        launch(ranks, ["--worker", "checkpoint", str(args.ckpt_params_millions), str(directory), str(out)])
    print("checkpoint: model + Adam, save() to durable commit on every rank (median of 3)")
    for ranks in (1, args.ranks):
        c = json.loads((out / f"checkpoint-{ranks}.json").read_text())
        print(f"  {ranks} rank(s): {c['bytes'] / 1e6:.0f} MB in {c['seconds_median']:.3f} s "
              f"({c['bytes'] / 1e6 / c['seconds_median']:.0f} MB/s)")
    print(f"results in {out}")


if __name__ == "__main__":
    main()
