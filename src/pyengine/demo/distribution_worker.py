"""What each rank of the demo's 2-process world runs: `run_world(DIR, steps)`.

The demo forks the ranks itself; the same code runs under torchrun:

    torchrun --standalone --nproc-per-node 2 -m pyengine.demo.distribution_worker DIR --steps 256

It joins the job its environment describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), trains on
DIR/train (distribution_task.write_data), and rank 0 writes the measurements to DIR/world.json;
the world also leaves a rank-sharded checkpoint of its FSDP run in DIR/ckpt-fsdp and that
run's global weights in DIR/fsdp_weights.pt.

Every strategy trains the same model from the same initial weights on the same data, with
its optimizer built after wrapping (FSDP and tensor parallelism replace the parameters).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import pyengine as pe
from pyengine.demo.distribution_task import LOCAL_SGD_PERIOD, LR, PER_RANK_BATCH, evaluate, make_model, write_data
from pyengine.demo.wire_bytes import tcp_bytes

MODEL_PARALLEL_STEPS = 32
MICROBATCHES = 4


def global_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's weights on every rank; DTensor.full_tensor() is a collective."""
    module = pe.checkpoint.stateful.unwrap_module(model)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in module.state_dict().items()}


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a DTensor's local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def worst(value: float) -> float:
    """The largest value across the ranks (a collective)."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def per_rank(value: float) -> list[float]:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


class WireMeter:
    """Wall time and TCP bytes sent by this rank between start() and stop(), both after a barrier."""

    def start(self) -> None:
        dist.barrier()
        self._bytes, self._t0 = tcp_bytes(), time.perf_counter()

    def stop(self) -> tuple[float, int | None]:
        dist.barrier()
        seconds, after = time.perf_counter() - self._t0, tcp_bytes()
        return seconds, None if after is None or self._bytes is None else after[0] - self._bytes[0]


def train_data_parallel(name: str, data: Path, steps: int) -> tuple[dict, torch.nn.Module, torch.optim.Optimizer]:
    """`steps` Adam steps of `name` ("ddp", "fsdp", "local_sgd"), each rank on its half of the data."""
    rank, world = pe.distributed.rank(), pe.distributed.world_size()
    options = {"period": LOCAL_SGD_PERIOD} if name == "local_sgd" else {}
    strategy = pe.distributed.make_strategy(name, **options)
    model = strategy.wrap(make_model())
    opt = torch.optim.Adam(model.parameters(), lr=LR)  # after wrap: FSDP replaced the parameters by shards
    loader = pe.data.Loader(pe.data.Dataset(data / "train"), PER_RANK_BATCH, shuffle=True, seed=0, drop_last=True,
                            infinite=True, rank=rank, world_size=world)
    batches, losses, meter = iter(loader), [], WireMeter()
    meter.start()
    for _ in range(steps):
        batch = next(batches)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        loss.backward()
        opt.step()
        strategy.after_optimizer_step()
        losses.append(loss.item())
    seconds, sent = meter.stop()
    loader.close()
    weights = global_weights(model)
    val_loss, val_acc = evaluate(weights)
    rank_losses = per_rank(losses)
    held = local_bytes(model.parameters()) + local_bytes(
        t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    report = {
        "seconds": worst(seconds),
        "sent_bytes": per_rank(sent),
        "held_bytes": per_rank(held),
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "losses": np.mean(rank_losses, axis=0).tolist(),
    }
    if name == "local_sgd":
        report["averagings"] = strategy.averagings
    return report, model, opt


def fixed_batches(data: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """MODEL_PARALLEL_STEPS global batches, the same on every rank."""
    loader = pe.data.Loader(pe.data.Dataset(data / "train"), PER_RANK_BATCH * pe.distributed.world_size(),
                            shuffle=True, seed=1, drop_last=True)
    batches = [(b["x"].clone(), b["y"].clone()) for _, b in zip(range(MODEL_PARALLEL_STEPS), loader)]
    loader.close()
    return batches


def model_parallel(data: Path) -> dict:
    """DDP, tensor and pipeline parallel training against one process on the same global batches.

    SGD, not Adam: Adam divides by the root of the squared gradient, so float noise in a
    gradient near zero (any two summation orders differ by ~1e-7) becomes a step of size lr.
    """
    rank, world = pe.distributed.rank(), pe.distributed.world_size()
    batches = fixed_batches(data)
    loss_fn = torch.nn.functional.cross_entropy

    def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    reference = make_model()
    opt = sgd(reference)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(reference(x), y).backward()
        opt.step()
    expected = reference.state_dict()
    report = {"params": sum(p.numel() for p in reference.parameters())}

    def compare(name: str, weights: dict[str, torch.Tensor], held: int, seconds: float, sent: int | None) -> None:
        diff = max(float((v - expected[k]).abs().max()) for k, v in weights.items())
        report[name] = {"max_abs_diff": worst(diff), "params_held": per_rank(held), "seconds": worst(seconds),
                        "sent_bytes": per_rank(sent)}

    meter = WireMeter()
    ddp = pe.distributed.DataParallel().wrap(make_model())
    opt = sgd(ddp)
    meter.start()
    for x, y in batches:  # each rank takes its half of the global batch
        opt.zero_grad()
        loss_fn(ddp(x[rank::world]), y[rank::world]).backward()
        opt.step()
    compare("ddp", global_weights(ddp), sum(p.numel() for p in ddp.parameters()), *meter.stop())

    tensor = pe.distributed.TensorParallel().wrap(make_model())
    opt = sgd(tensor)
    meter.start()
    for x, y in batches:  # every rank sees the whole batch; each holds half of the paired layers
        opt.zero_grad()
        loss_fn(tensor(x), y).backward()
        opt.step()
    seconds, sent = meter.stop()
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in tensor.parameters())
    compare("tensor", global_weights(tensor), held, seconds, sent)

    strategy = pe.distributed.PipelineParallel(loss_fn, n_microbatches=MICROBATCHES)
    stage = strategy.wrap(make_model())  # this rank's stage: a run of the model's layers
    opt = sgd(stage)
    meter.start()
    for x, y in batches:
        opt.zero_grad()
        strategy.step(x, y)
        opt.step()
    seconds, sent = meter.stop()
    # Each rank compares its own stage: the stages' weights together are the model's.
    compare("pipeline", {k: v.detach() for k, v in stage.state_dict().items()},
            sum(p.numel() for p in stage.parameters()), seconds, sent)
    report["pipeline"]["stage_layers"] = per_rank(sorted({k.split(".")[0] for k in stage.state_dict()}))
    report["steps"], report["microbatches"] = len(batches), MICROBATCHES
    return report


def run_world(out: Path, steps: int) -> None:
    if steps % LOCAL_SGD_PERIOD:
        raise ValueError(f"steps={steps} must be a multiple of {LOCAL_SGD_PERIOD}: local SGD's replicas are equal "
                         "only right after an averaging")
    pe.distributed.init(backend="gloo", timeout_seconds=120)
    if pe.distributed.is_main():
        write_data(out)  # already there when the demo launched the world
    pe.distributed.barrier()
    report: dict = {"world_size": pe.distributed.world_size(), "steps": steps, "strategies": {}}
    for name in ("ddp", "fsdp", "local_sgd"):
        report["strategies"][name], model, opt = train_data_parallel(name, out, steps)
        if name == "fsdp":
            # Every rank writes its own shards; rank 0 commits the step once all are durable.
            with pe.Checkpointer(out / "ckpt-fsdp") as ckpt:
                ckpt.save(steps, {"model": model, "optimizer": opt}).wait()
            weights = global_weights(model)
            if pe.distributed.is_main():
                torch.save(weights, out / "fsdp_weights.pt")
    report["model_parallel"] = model_parallel(out)
    if pe.distributed.is_main():
        (out / "world.json").write_text(json.dumps(report))
    pe.distributed.barrier()
    pe.distributed.destroy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two processes on a laptop's cores; each step is small
    run_world(args.dir, args.steps)


if __name__ == "__main__":
    main()
