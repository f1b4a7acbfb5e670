"""Scenarios the distributed tests launch under torchrun (`python -m torch.distributed.run`).

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_scenarios.py train OUT
    python -m torch.distributed.run --nproc-per-node 3 tests/distributed_scenarios.py reshard OUT
    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_scenarios.py kill OUT

Each scenario asserts on every rank and writes its figures to OUT/<scenario>-rank<R>.json; a
non-zero exit fails the test. Kept in one launch per world size: starting torch costs seconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import pyengine as pe

sys.path.insert(0, str(Path(__file__).parent))
from faulty_storage import FaultyStorage, StuckStorage, inject  # noqa: E402

STEPS = 12
PER_RANK_BATCH = 8


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 16 rows shard 8/8 over 2 ranks and 6/6/4 over 3; the 1-element bias leaves an empty shard.
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def write_data(path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    y = (x @ rng.standard_normal((8, 1)) + 0.1 * np.sin(3 * x[:, :1])).astype(np.float32)
    pe.data.write_dataset(path, {"x": x, "y": y})


def loader(out: Path) -> pe.data.Loader:
    return pe.data.Loader(pe.data.Dataset(out / "data"), PER_RANK_BATCH, shuffle=True, seed=1, drop_last=True,
                          rank=pe.distributed.rank(), world_size=pe.distributed.world_size())


def mse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Global tensors on every rank (full_tensor() is a collective: every rank calls it)."""
    out = {}
    for k, v in pe.checkpoint.stateful.unwrap_module(model).state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def gathered_batches(out: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's batches for STEPS steps, concatenated in rank order: the global batches."""
    batches = []
    for step, batch in enumerate(loader(out)):
        if step == STEPS:
            break
        xy = torch.cat([batch["x"], batch["y"]], dim=1)
        parts = [torch.empty_like(xy) for _ in range(pe.distributed.world_size())]
        dist.all_gather(parts, xy)
        both = torch.cat(parts)
        batches.append((both[:, :8], both[:, 8:]))
    return batches


def train(model: torch.nn.Module, strategy, out: Path, steps: int = STEPS) -> tuple:
    model = strategy.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step, batch in enumerate(loader(out)):
        if step == steps:
            break
        opt.zero_grad()
        loss = mse(model, batch["x"], batch["y"])
        loss.backward()
        opt.step()
        strategy.after_optimizer_step()
        losses.append(float(loss.detach()))
    return model, opt, losses


def scenario_train(out: Path) -> dict:
    rank = pe.distributed.rank()
    report: dict = {}
    # Reference: one process, the same global batches.
    ref = make_model()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for x, y in gathered_batches(out):
        ref_opt.zero_grad()
        mse(ref, x, y).backward()
        ref_opt.step()
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}

    ddp, ddp_opt, _ = train(make_model(), pe.distributed.DataParallel(), out)
    ddp_state = full_state(ddp)
    report["ddp_vs_single"] = max_diff(ddp_state, ref_state)
    assert report["ddp_vs_single"] <= 1e-6, report

    fsdp, fsdp_opt, _ = train(make_model(), pe.distributed.FullyShard(), out)
    fsdp_state = full_state(fsdp)
    report["fsdp_vs_ddp"] = max_diff(fsdp_state, ddp_state)
    assert report["fsdp_vs_ddp"] <= 1e-6, report

    strategy = pe.distributed.LocalSGD(period=4)
    local, _, losses = train(make_model(), strategy, out, steps=16)  # one epoch: 256 / 2 ranks / 8
    report["local_sgd_first_last"] = [float(np.mean(losses[:4])), float(np.mean(losses[-4:]))]
    report["local_sgd_averagings"] = strategy.averagings
    assert losses[-1] < losses[0] and strategy.averagings == 16 // 4, report

    # Rank-sharded checkpoints of both runs (model + optimizer + loader), and their global weights.
    for name, model, opt in (("ddp", ddp, ddp_opt), ("fsdp", fsdp, fsdp_opt)):
        with pe.Checkpointer(out / f"ckpt-{name}") as ckpt:
            ckpt.save(STEPS, {"model": model, "optimizer": opt, "loader": loader(out)}).wait()
        assert ckpt.steps() == [STEPS]
        part = out / f"ckpt-{name}" / f"step-{STEPS:08d}" / f"rank-{rank:05d}"
        report[f"{name}_bytes_rank"] = sum(f.stat().st_size for f in part.rglob("*.safetensors"))
    if rank == 0:
        torch.save(ddp_state, out / "ddp_state.pt")
        torch.save(fsdp_state, out / "fsdp_state.pt")

    # Restore at the same world size into a fresh FSDP model: identical global weights.
    again = pe.distributed.FullyShard().wrap(make_model())
    again_opt = torch.optim.Adam(again.parameters(), lr=1e-2)
    with pe.Checkpointer(out / "ckpt-fsdp") as ckpt:
        assert ckpt.restore({"model": again, "optimizer": again_opt}) == STEPS
    assert max_diff(full_state(again), fsdp_state) == 0.0
    report["shard_shaped_refused"] = scenario_shard_shaped_model(out, again)

    report["trainer"] = scenario_trainer(out)
    report["unfreeze"] = scenario_unfreeze(out)
    report["failed_save"] = scenario_failed_save(out)
    report["policy_steps"] = scenario_policy(out)
    report["staging"] = scenario_staging_reuse(out, fsdp, fsdp_opt)
    report["overlap"] = scenario_overlap(out)
    report["loaders_disagree"] = scenario_loaders_disagree(out)
    return report


def scenario_loaders_disagree(out: Path) -> dict:
    """pe.Trainer refuses, on every rank alike, loaders that the ranks built differently."""
    rank, data = pe.distributed.rank(), pe.data.Dataset(out / "data")
    cases = {
        # data parallel: another seed on rank 1 would overlap rank 0's samples and miss others
        "ddp_seed": ("ddp", pe.data.Loader(data, PER_RANK_BATCH, shuffle=True, seed=1 + rank, rank=rank,
                                           world_size=2)),
        "ddp_rank": ("ddp", pe.data.Loader(data, PER_RANK_BATCH, shuffle=True, seed=1, rank=0, world_size=2)),
        # model parallel: every rank must see the same batches
        "tensor_seed": ("tensor", pe.data.Loader(data, PER_RANK_BATCH, shuffle=True, seed=1 + rank)),
    }
    report = {}
    for name, (strategy, bad) in cases.items():
        model = make_model()
        try:
            pe.Trainer(model, torch.optim.Adam(model.parameters()), batch_loss, bad, strategy=strategy, progress=False)
        except ValueError as e:
            report[name] = str(e)[:300]
        else:
            raise AssertionError(f"{name}: loaders built differently by the ranks were accepted")
    # Built alike (rank 1 differing only in rank=), the same Trainer is accepted.
    model = make_model()
    pe.Trainer(model, torch.optim.Adam(model.parameters()), batch_loss, loader(out), strategy="ddp", progress=False)
    return report


def local_optimizer_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's optimizer tensors (a DTensor's local shard), copied, in a fixed order."""
    out = []
    for _, s in sorted(opt.state_dict()["state"].items()):
        for _, v in sorted(s.items()):
            if isinstance(v, torch.Tensor):
                out.append((v.to_local() if hasattr(v, "to_local") else v).detach().clone())
    return out


def overlap_model(strategy: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A 1.1M-parameter MLP (13 MB with Adam) wrapped by `strategy`, and Adam over it."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1024), torch.nn.Tanh(),
              torch.nn.Linear(1024, 1)]
    model = pe.distributed.make_strategy(strategy).wrap(torch.nn.Sequential(*layers))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def scenario_overlap(out: Path) -> dict:
    """save(overlap=True) under DDP and FSDP: the optimizer step right after save() returns must
    wait for the background copy, so the checkpoint holds the state at save() bit for bit."""
    report = {}
    for name in ("ddp", "fsdp"):
        model, opt = overlap_model(name)
        torch.manual_seed(1 + pe.distributed.rank())
        x, y = torch.randn(32, 64), torch.randn(32, 1)
        for _ in range(2):  # Adam's moments exist, and the next gradients are ready below
            opt.zero_grad()
            mse(model, x, y).backward()
            opt.step()
        opt.zero_grad()
        mse(model, x, y).backward()
        weights, moments = full_state(model), local_optimizer_state(opt)
        with pe.Checkpointer(out / f"ckpt-overlap-{name}", copy_threads=1) as ckpt:
            handle = ckpt.save(1, {"model": model, "optimizer": opt}, overlap=True)
            opt.step()  # changes every parameter and moment at once: the pre-step hook must wait
            handle.wait()
        changed = max_diff(full_state(model), weights)
        assert changed > 0, "the step after the save changed nothing; the test proves nothing"
        restored, restored_opt = overlap_model(name)
        with pe.Checkpointer(out / f"ckpt-overlap-{name}") as ckpt:
            assert ckpt.restore({"model": restored, "optimizer": restored_opt}) == 1
        report[f"{name}_weights"] = max_diff(full_state(restored), weights)
        restored_moments = local_optimizer_state(restored_opt)
        assert [m.shape for m in restored_moments] == [m.shape for m in moments]
        report[f"{name}_moments"] = max((float((a - b).abs().max()) for a, b in zip(restored_moments, moments)
                                         if a.numel()), default=0.0)  # an FSDP shard may be empty
        assert report[f"{name}_weights"] == 0.0 and report[f"{name}_moments"] == 0.0, report
        report[f"{name}_changed_by_step"] = changed
    return report


def scenario_shard_shaped_model(out: Path, fsdp_model: torch.nn.Module) -> str:
    """A checkpointed model is global: another model whose tensors happen to have the shapes of
    this rank's FSDP shards (half the rows of the first layer) must be refused, not loaded as shards."""
    other = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with pe.Checkpointer(out / "ckpt-shard-shaped") as ckpt:
        ckpt.save(1, {"model": other}).wait()
    before = full_state(fsdp_model)
    with pe.Checkpointer(out / "ckpt-shard-shaped") as ckpt:
        try:
            ckpt.restore({"model": fsdp_model})
        except (RuntimeError, ValueError) as e:
            message = f"{type(e).__name__}: {e}"
        else:
            raise AssertionError("a model shaped like this rank's shards was loaded into FSDP")
    assert max_diff(full_state(fsdp_model), before) == 0.0, "the refused restore changed the weights"
    return message[:300]


def scenario_staging_reuse(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Each rank allocates its snapshot memory once (here ahead, by reserve()) and every later
    save reuses it: the memory held does not grow, and each save still commits its own step."""
    with pe.Checkpointer(out / "ckpt-staging", keep_last=2) as ckpt:
        assert ckpt.staging_bytes == 0
        reserved = ckpt.reserve({"model": model, "optimizer": opt})
        assert reserved > 0 and ckpt.staging_bytes == reserved, (reserved, ckpt.staging_bytes)
        held = []
        for step in (1, 2, 3):
            ckpt.save(step, {"model": model, "optimizer": opt}).wait()
            held.append(ckpt.staging_bytes)
        assert held == [reserved] * 3, (reserved, held)
        steps = ckpt.steps()
    assert steps == [2, 3], steps
    fresh = pe.distributed.FullyShard().wrap(make_model())
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    with pe.Checkpointer(out / "ckpt-staging") as ckpt:
        assert ckpt.restore({"model": fresh, "optimizer": fresh_opt}) == 3
    assert max_diff(full_state(fresh), full_state(model)) == 0.0
    return {"reserved": reserved, "held": held}


def batch_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return mse(model, batch["x"], batch["y"])


def replicas_equal(model: torch.nn.Module) -> bool:
    flat = torch.cat([v.reshape(-1) for v in full_state(model).values()])
    others = [torch.empty_like(flat) for _ in range(pe.distributed.world_size())]
    dist.all_gather(others, flat)
    return all(torch.equal(o, others[0]) for o in others)


def scenario_trainer(out: Path) -> dict:
    """pe.Trainer(strategy=...): DDP with gradual unfreezing (re-wrapped), FSDP, local SGD; resume."""
    from pyengine.transfer import GradualUnfreezer

    report = {}
    sched = pe.VirtualEpochs(num_training_examples=256, stop_point=2, batch_size=16, num_checkpoints=2)
    model = make_model()
    pe.transfer.freeze(model[0])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    unfreezer = GradualUnfreezer(opt, [model[0]], at_epochs=[1], lr=1e-3)
    trainer = pe.Trainer(model, opt, batch_loss, loader(out), checkpoint_dir=out / "trainer-ddp", progress=False,
                         unfreezer=unfreezer, strategy="ddp")
    history = trainer.fit(sched)
    assert trainer.step == sched.total_steps and isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    assert all(p.requires_grad for p in model.parameters()) and replicas_equal(model)
    report["ddp_losses"] = [h["train_loss"] for h in history]
    with pe.Checkpointer(out / "trainer-ddp") as ckpt:
        assert ckpt.latest_step() == sched.total_steps

    for name in ("fsdp", "local_sgd"):
        strategy = pe.distributed.make_strategy(name)
        model = strategy.wrap(make_model())
        trainer = pe.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), batch_loss, loader(out),
                             checkpoint_dir=out / f"trainer-{name}", progress=False, strategy=strategy)
        history = trainer.fit(sched)
        assert history[-1]["train_loss"] < history[0]["train_loss"], history
        report[f"{name}_losses"] = [h["train_loss"] for h in history]
        if name == "fsdp":
            assert replicas_equal(model)
    # Resume: a new Trainer on the finished run restores the last step and trains no further.
    model = make_model()
    trainer = pe.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), batch_loss, loader(out),
                         checkpoint_dir=out / "trainer-local_sgd", progress=False, strategy="local_sgd")
    trainer.fit(sched)
    assert trainer.step == sched.total_steps
    return report


def scenario_unfreeze(out: Path) -> str:
    model = make_model()
    pe.transfer.freeze(model[0])
    strategy = pe.distributed.DataParallel()
    wrapped = strategy.wrap(model)
    pe.transfer.unfreeze(model[0])
    batch = next(iter(loader(out)))
    try:
        mse(wrapped, batch["x"], batch["y"])
    except pe.distributed.TrainableSetChanged as e:
        message = str(e)
    else:
        raise AssertionError("unfreezing after DDP wrapping was not refused")
    wrapped = strategy.rewrap()
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    for batch in loader(out):
        opt.zero_grad()
        mse(wrapped, batch["x"], batch["y"]).backward()
        opt.step()
    w = model[0].weight.detach().clone()
    others = [torch.empty_like(w) for _ in range(pe.distributed.world_size())]
    dist.all_gather(others, w)
    assert all(torch.equal(o, others[0]) for o in others), "replicas diverged after rewrap"
    return message


def scenario_failed_save(out: Path) -> str:
    model = pe.distributed.DataParallel().wrap(make_model())
    with pe.Checkpointer(out / "ckpt-fail") as ckpt:
        ckpt.save(1, {"model": model}).wait()
        if pe.distributed.rank() == 1:  # its part never becomes durable (a full or broken disk)
            inject(ckpt, FaultyStorage(ckpt.directory, "finish_part"))
        try:
            ckpt.save(2, {"model": model}).wait()
        except pe.CheckpointError as e:
            message = str(e)
        else:
            raise AssertionError("a save that failed on rank 1 did not raise on every rank")
        assert "rank 1" in message and "injected" in message, message
        pe.distributed.barrier()
        assert ckpt.steps() == [1], ckpt.steps()
        leftovers = [p.name for p in (out / "ckpt-fail").iterdir() if ".tmp-" in p.name]
        assert not leftovers, leftovers
    return message


def scenario_policy(out: Path) -> list[int]:
    """Ranks whose policies disagree still save together: rank 0 decides for all."""
    model = pe.distributed.DataParallel().wrap(make_model())
    every = 2 if pe.distributed.rank() == 0 else 3
    with pe.Checkpointer(out / "ckpt-policy", keep_last=0, policy=pe.checkpoint.Every(steps=every)) as ckpt:
        for step in range(1, 7):
            handle = ckpt.maybe_save(step, {"model": model})
            if handle is not None:
                handle.wait()
                assert handle.stats["persist_seconds"] > 0
        steps = ckpt.steps()
    assert steps == [2, 4, 6], steps
    return steps


def scenario_reshard(out: Path) -> dict:
    """Loads the 2-rank checkpoints into this world's DDP, FSDP and plain replicas."""
    report = {}
    for name in ("ddp", "fsdp"):
        expected = torch.load(out / f"{name}_state.pt")
        for strategy in (pe.distributed.DataParallel(), pe.distributed.FullyShard()):
            model = strategy.wrap(make_model())
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            with pe.Checkpointer(out / f"ckpt-{name}") as ckpt:
                assert ckpt.restore({"model": model, "optimizer": opt}) == STEPS
            diff = max_diff(full_state(model), expected)
            assert diff == 0.0, (name, strategy.name, diff)
            report[f"{name}->{strategy.name}"] = diff
            # The restored optimizer state keeps training: one more step runs everywhere.
            batch = next(iter(loader(out)))
            opt.zero_grad()
            mse(model, batch["x"], batch["y"]).backward()
            opt.step()
        # A loader saved by a 2-rank world refuses a different world size, with a message.
        with pe.Checkpointer(out / f"ckpt-{name}") as ckpt:
            try:
                ckpt.restore({"loader": loader(out)})
            except ValueError as e:
                report[f"{name}_loader"] = str(e)[:200]
            else:
                raise AssertionError("a 2-rank loader state was accepted by a 3-rank world")
    return report


def scenario_kill(out: Path) -> dict:
    """Rank 1 dies by SIGKILL while its part of step 2 is being written: step 2 never commits."""
    model = pe.distributed.DataParallel().wrap(torch.nn.Linear(256, 1024))
    with pe.Checkpointer(out / "ckpt-kill") as ckpt:
        ckpt.save(1, {"model": model}).wait()
        pe.distributed.barrier()
        if pe.distributed.rank() == 1:
            inject(ckpt, StuckStorage(ckpt.directory))
        ckpt.save(2, {"model": model})
        if pe.distributed.rank() == 1:
            time.sleep(0.2)  # its shards are on their way to disk, the commit gather not reached
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            ckpt.wait()
        except pe.CheckpointError as e:
            return {"error": str(e)[:300]}
    raise AssertionError("rank 0 committed although rank 1 died")


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    pe.distributed.init()
    if scenario == "train" and pe.distributed.rank() == 0:
        write_data(out / "data")
    pe.distributed.barrier()
    report = {"train": scenario_train, "reshard": scenario_reshard, "kill": scenario_kill}[scenario](out)
    (out / f"{scenario}-rank{pe.distributed.rank()}.json").write_text(json.dumps(report, indent=1))
    pe.distributed.barrier()
    pe.distributed.destroy()


if __name__ == "__main__":
    main()
