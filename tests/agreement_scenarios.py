"""2-rank scenarios for the single checkpoint engine, launched by tests/test_checkpoint_agreement.py:

    python -m torch.distributed.run --nproc-per-node 2 tests/agreement_scenarios.py agree OUT
    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/agreement_scenarios.py die-in-restore OUT
                  (started without torchrun, which would stop rank 0 as soon as rank 1 dies)

Each rank writes OUT/<scenario>-rank<R>.json; a failed assertion exits non-zero.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import pyengine as pe

sys.path.insert(0, str(Path(__file__).parent))
from faulty_storage import OPERATIONS, FaultyStorage, SlowStorage, inject  # noqa: E402

from pyengine.checkpoint.storage import FileSystemStorage  # noqa: E402

DAMAGES = ("per_rank_entry", "shared_piece", "part_manifest")


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def state(model: torch.nn.Module, step: int) -> dict:
    rank = pe.distributed.rank()
    return {"model": model, "extra": {"rank": rank, "t": torch.arange(64, dtype=torch.float32) + 100 * rank + step}}


def gather(value):
    out = [None] * pe.distributed.world_size()
    dist.all_gather_object(out, value)
    return out


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def damage(step_dir: Path, kind: str) -> str:
    """Flips one byte of rank 1's part of a committed step."""
    part = step_dir / "rank-00001" / step_dir.name
    manifest = pe.checkpoint.manifest.read_manifest(part)
    if kind == "part_manifest":
        raw = (part / "manifest.json").read_bytes()
        flip(part / "manifest.json", raw.index(b'"state"') + 3)
        return "manifest.json"
    top = pe.checkpoint.sharded.read_sharded_manifest(step_dir)
    if kind == "per_rank_entry":  # only rank 1 reads it
        name = "extra/t" if "extra/t" in manifest.tensors else next(n for n in manifest.tensors
                                                                    if n not in top["tensors"])
    else:  # a tensor rank 1 wrote for everyone
        name = next(n for n, e in top["tensors"].items() if any(p["part"] == 1 for p in e["pieces"]))
    info = manifest.tensors[name]
    flip(part / manifest.shards[info.shard].file, info.offset + info.nbytes // 2)
    return name


def scenario_damage(out: Path, kind: str) -> dict:
    model = pe.distributed.DataParallel().wrap(make_model())
    root = out / f"damage-{kind}"
    with pe.Checkpointer(root, capture_rng=False) as ckpt:
        ckpt.save(10, state(model, 10)).wait()
        ckpt.save(20, state(model, 20)).wait()
    dist.barrier()
    if pe.distributed.rank() == 0:
        damage(root / "step-00000020", kind)
    dist.barrier()
    target_model = pe.distributed.DataParallel().wrap(make_model())
    extra: dict = {}
    with warnings.catch_warnings(record=True) as caught, pe.Checkpointer(root, capture_rng=False) as ckpt:
        warnings.simplefilter("always")
        step = ckpt.restore({"model": target_model, "extra": extra})
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, pe.checkpoint.CheckpointFallbackWarning)]
    steps = gather(step)
    assert steps == [10, 10], (kind, steps)
    assert len(fallbacks) == 1 and "step 20" in fallbacks[0] and "rank 1" in fallbacks[0], (kind, fallbacks)
    assert gather(fallbacks[0]) == [fallbacks[0]] * 2, "the ranks warned differently"
    assert extra["rank"] == pe.distributed.rank() and float(extra["t"][0]) == 100 * pe.distributed.rank() + 10
    dist.barrier()
    quarantined = [p.name for p in root.iterdir() if ".corrupt-" in p.name]
    assert len(quarantined) == 1 and quarantined[0].startswith("step-00000020"), quarantined
    return {"steps": steps, "warning": fallbacks[0][:300]}


def batch_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def trainer_run(out: Path, directory: str, stop_at: int | None = None) -> dict[str, torch.Tensor]:
    sched = pe.VirtualEpochs(num_training_examples=256, stop_point=3, batch_size=16, num_checkpoints=6)
    loader = pe.data.Loader(pe.data.Dataset(out / "data"), 8, shuffle=True, seed=1, drop_last=True,
                            rank=pe.distributed.rank(), world_size=pe.distributed.world_size())
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = pe.Trainer(model, opt, batch_loss, loader, checkpoint_dir=out / directory, progress=False,
                         strategy="ddp")
    trainer.fit(sched, resume=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def scenario_trainer_after_damage(out: Path) -> dict:
    """A run, its newest checkpoint damaged on rank 1's part, resumed: every rank finishes with
    the weights of an uninterrupted run."""
    import numpy as np

    if pe.distributed.rank() == 0:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((256, 8)).astype(np.float32)
        pe.data.write_dataset(out / "data", {"x": x, "y": (x[:, :2] * 0.5).astype(np.float32)})
    dist.barrier()
    uninterrupted = trainer_run(out, "trainer-whole")
    trainer_run(out, "trainer-damaged")
    root = out / "trainer-damaged"
    steps = pe.Checkpointer(root).steps()
    # The run is over; to make it resume, the newest checkpoint goes and the one before is damaged.
    dist.barrier()
    if pe.distributed.rank() == 0:
        import shutil

        shutil.rmtree(root / f"step-{steps[-1]:08d}")
        damage(root / f"step-{steps[-2]:08d}", "per_rank_entry")
    dist.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = trainer_run(out, "trainer-damaged")
    fell_back = [w for w in caught if issubclass(w.category, pe.checkpoint.CheckpointFallbackWarning)]
    assert len(fell_back) == 1, [str(w.message) for w in caught]
    diff = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in resumed)
    assert diff == 0.0, diff
    return {"steps": steps, "diff": diff}


def scenario_faults(out: Path) -> dict:
    """The faulty-storage matrix on 2 ranks: part operations fail on rank 1, commit ones on rank 0."""
    rank = pe.distributed.rank()
    report = {}
    model = pe.distributed.DataParallel().wrap(make_model())
    # (operation, rank, calls let through first): rank 0's first two directory syncs are its own
    # part's; the third follows the top manifest, the fourth the rename (which is then undone).
    plans = [(op, 1, 0) for op in ("write_part", "finish_part", "sync_dir")] + \
            [(op, 0, 0) for op in ("write_manifest", "rename", "prune")] + \
            [("sync_dir", 0, skip) for skip in (0, 2, 3)]
    assert {op for op, _, _ in plans} == set(OPERATIONS)
    for op, faulty_rank, skip in plans:
        root = out / f"faults-{op}-{faulty_rank}-{skip}"
        with pe.Checkpointer(root, keep_last=2, capture_rng=False) as ckpt:
            ckpt.save(1, state(model, 1)).wait()
            ckpt.save(2, state(model, 2)).wait()
            if rank == faulty_rank:
                inject(ckpt, FaultyStorage(root, op, skip=skip))
            outcome = "committed"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    ckpt.save(3, state(model, 3)).wait()
                except pe.CheckpointError as e:
                    outcome = str(e)
            prune_warnings = [w for w in caught if issubclass(w.category, pe.checkpoint.CheckpointPruneWarning)]
            outcomes = gather(outcome)
            assert outcomes[0] == outcomes[1], (op, outcomes)  # the same error on every rank, or none
            dist.barrier()
            steps = ckpt.steps()
            if op == "prune":
                assert outcome == "committed" and steps == [1, 2, 3], (op, outcome, steps)
                assert len(prune_warnings) == 1  # on every rank, not only on rank 0 that pruned
            else:
                assert "injected failure" in outcome and f"rank {faulty_rank}" in outcome, (op, outcome)
                assert steps == [1, 2], (op, steps)
                assert not [p for p in root.iterdir() if ".tmp-" in p.name]
                extra: dict = {}
                assert ckpt.restore({"extra": extra}) == 2 and float(extra["t"][0]) == 100 * rank + 2
            ckpt.save(4, state(model, 4)).wait()
            assert ckpt.steps()[-1] == 4
        report[f"{op}@rank{faulty_rank}+{skip}"] = outcome[:200]
    return report


def scenario_sigint(out: Path) -> dict:
    """Ctrl-C on both ranks while they wait for a save that a stalled file system holds up."""
    model = pe.distributed.DataParallel().wrap(make_model())
    root = out / "sigint"
    ckpt = pe.Checkpointer(root, capture_rng=False)
    ckpt.save(1, state(model, 1)).wait()
    inject(ckpt, SlowStorage(root, seconds=4.0))
    handle = ckpt.save(2, state(model, 2))
    sent = []

    def interrupt() -> None:
        time.sleep(0.5)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt).start()
    try:
        handle.wait()
        raise AssertionError("no KeyboardInterrupt")
    except KeyboardInterrupt:
        latency = time.monotonic() - sent[0]
    assert latency < 1.0, latency
    ckpt.wait()  # the save in flight is committed or not, never torn
    ckpt.close()
    dist.barrier()
    steps = pe.Checkpointer(root).steps()
    assert steps == [1, 2], steps
    assert all(i.ok for i in pe.checkpoint.inspect_directory(root))
    return {"latency": latency, "steps": steps}


def scenario_in_flight(out: Path) -> dict:
    """max_in_flight=3 on 2 ranks, overlapped saves on a slow file system: up to three saves are
    unfinished at once (never more), they commit in order, and the newest restores exactly."""
    model = pe.distributed.DataParallel().wrap(make_model())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(pe.distributed.rank())), torch.zeros(16, 2)
    root = out / "in-flight"
    unfinished = []
    # A second Checkpointer saves at the same time: its commit thread's collectives must not
    # interleave with the first one's.
    with pe.Checkpointer(root, keep_last=2, max_in_flight=3, capture_rng=False) as ckpt, \
            pe.Checkpointer(out / "in-flight-other", keep_last=0, max_in_flight=2, capture_rng=False) as other:
        inject(ckpt, SlowStorage(root, seconds=0.3))
        inject(other, SlowStorage(out / "in-flight-other", seconds=0.2))
        handles = []
        for step in range(1, 9):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()  # waits for the previous overlapped copy
            handles.append(ckpt.save(step, {"model": model, "optimizer": opt}, overlap=True))
            other.save(step, {"model": model})
            unfinished.append(sum(not h.done() for h in handles))
        expected = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        ckpt.wait()
        other.wait()
        assert ckpt.steps() == [7, 8], ckpt.steps()
        assert other.steps() == list(range(1, 9)), other.steps()
    assert max(unfinished) == 3, unfinished
    fresh = make_model()
    with pe.Checkpointer(root) as ckpt:
        assert ckpt.restore({"model": fresh}) == 8
    assert all(torch.equal(v, expected[k]) for k, v in fresh.state_dict().items())
    return {"unfinished": unfinished}


class DyingStorage(FileSystemStorage):
    """Rank 1 dies (SIGKILL) while it reads its part during a restore."""

    def open_step(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)


def scenario_die_in_restore(out: Path) -> dict:
    model = pe.distributed.DataParallel().wrap(make_model())
    root = out / "die"
    with pe.Checkpointer(root, capture_rng=False) as ckpt:
        ckpt.save(1, state(model, 1)).wait()
    dist.barrier()
    ckpt = pe.Checkpointer(root, capture_rng=False)
    if pe.distributed.rank() == 1:
        inject(ckpt, DyingStorage(root))
    started = time.monotonic()
    try:
        ckpt.restore({"model": model})
    except pe.CheckpointError as e:
        report = {"error": str(e)[:300], "seconds": time.monotonic() - started}
        (out / "die-in-restore-rank0.json").write_text(json.dumps(report))
        os._exit(0)  # the process group is broken: leave without its teardown
    raise AssertionError("rank 0 restored although rank 1 died")


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    pe.distributed.init()
    if scenario == "die-in-restore":
        scenario_die_in_restore(out)
        return
    report = {kind: scenario_damage(out, kind) for kind in DAMAGES}
    report["faults"] = scenario_faults(out)
    report["sigint"] = scenario_sigint(out)
    report["in_flight"] = scenario_in_flight(out)
    report["trainer"] = scenario_trainer_after_damage(out)
    (out / f"{scenario}-rank{pe.distributed.rank()}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    pe.distributed.destroy()


if __name__ == "__main__":
    main()
