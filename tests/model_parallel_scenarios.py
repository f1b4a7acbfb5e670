"""Scenarios the model-parallel tests launch under torchrun (`python -m torch.distributed.run`).

    python -m torch.distributed.run --nproc-per-node 2 tests/model_parallel_scenarios.py tensor OUT

Each scenario asserts on every rank and writes its figures to OUT/<scenario>-rank<R>.json; a
non-zero exit fails the test. The reference is the same model trained in this process alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import pyengine as pe

STEPS = 4
TOLERANCE = 1e-5


def make_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    # Two MLP blocks: the default plan shards 0 and 3 column-wise, 2 and 5 row-wise; the odd
    # last Linear stays whole, so a replicated layer trains beside the sharded ones.
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.GELU(),
        torch.nn.Linear(16, 8),
        torch.nn.Linear(8, 12),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 8),
        torch.nn.Linear(8, 1),
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same batches on every rank: tensor parallelism splits the model, not the data."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)) for _ in range(STEPS)]


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Global tensors on every rank (full_tensor() is a collective: every rank calls it)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()
    }


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def fit(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[float]]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for x, y in batches():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


def scenario_tensor(out: Path) -> dict:
    rank = pe.distributed.rank()
    ref, _, ref_losses = fit(make_mlp())
    ref_state = full_state(ref)

    strategy = pe.distributed.make_strategy("tensor")
    tp = strategy.wrap(make_mlp())
    weight = dict(tp.named_parameters())["0.weight"]
    # The test is only meaningful if the layers really are split: half the rows live here.
    assert type(weight).__name__ == "DTensor" and weight.to_local().shape == (8, 8), weight
    assert type(dict(tp.named_parameters())["6.weight"]).__name__ != "DTensor"
    tp, opt, losses = fit(tp)
    report = {
        "losses": losses,
        "ref_losses": ref_losses,
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "weight_diff": max_diff(full_state(tp), ref_state),
    }
    assert report["loss_diff"] <= TOLERANCE and report["weight_diff"] <= TOLERANCE, report

    with pe.Checkpointer(out / "ckpt-tensor") as ckpt:
        ckpt.save(STEPS, {"model": tp, "optimizer": opt}).wait()
    tp_state = full_state(tp)
    if rank == 0:
        torch.save(tp_state, out / "tensor_state.pt")

    # The same checkpoint restores into a fresh tensor-parallel model at this world size.
    again = pe.distributed.TensorParallel().wrap(make_mlp())
    again_opt = torch.optim.Adam(again.parameters(), lr=1e-2)
    with pe.Checkpointer(out / "ckpt-tensor") as ckpt:
        assert ckpt.restore({"model": again, "optimizer": again_opt}) == STEPS
    report["restore_tp_diff"] = max_diff(full_state(again), tp_state)
    assert report["restore_tp_diff"] == 0.0, report

    # A transformer block: its feed-forward pair sharded, attention replicated, equals one process.
    def block() -> torch.nn.Module:
        torch.manual_seed(2)
        return torch.nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)

    g = torch.Generator().manual_seed(3)
    seqs = [(torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 8, generator=g)) for _ in range(STEPS)]
    block_states = []
    for strategy in (None, pe.distributed.TensorParallel(plan={"linear1": "colwise", "linear2": "rowwise"})):
        model = strategy.wrap(block()) if strategy is not None else block()
        # SGD, not Adam: attention's key bias has an exactly-zero gradient, whose float noise
        # (1e-9, different in any two summation orders) Adam would normalise into lr-sized steps.
        block_opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in seqs:
            block_opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            block_opt.step()
        block_states.append(full_state(model))
    assert type(dict(model.named_parameters())["linear1.weight"]).__name__ == "DTensor"
    report["transformer_block_diff"] = max_diff(block_states[1], block_states[0])
    assert report["transformer_block_diff"] <= TOLERANCE, report

    # The other way round: a checkpoint a plain process wrote (the test, before the launch)
    # restores into the tensor-parallel model, each rank cutting out its own shard.
    plain = pe.distributed.TensorParallel().wrap(make_mlp())
    with pe.Checkpointer(out / "ckpt-plain") as ckpt:
        assert ckpt.restore({"model": plain}) == STEPS
    report["plain_to_tp_diff"] = max_diff(full_state(plain), torch.load(out / "plain_state.pt"))
    assert report["plain_to_tp_diff"] == 0.0, report
    return report


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output, target)


def worst_across_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def scenario_pipeline(out: Path) -> dict:
    """A 2-stage GPipe run (4 micro-batches) against the single-process model, batch by batch."""
    last = pe.distributed.rank() == pe.distributed.world_size() - 1
    ref = make_mlp()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    strategy = pe.distributed.make_strategy("pipeline", loss_fn=mse, n_microbatches=4)
    stage = strategy.wrap(make_mlp())
    opt = torch.optim.Adam(stage.parameters(), lr=1e-2)
    stage_names = [n for n, _ in stage.named_parameters()]
    # Split evenly by parameter count: each rank holds part of the model, and the parts cover it.
    assert 0 < len(stage_names) < len(list(ref.parameters())), stage_names
    report: dict = {"stage_params": stage_names, "loss_diff": 0.0, "grad_diff": 0.0}
    for x, y in batches():
        ref_opt.zero_grad()
        ref_loss = mse(ref(x), y)
        ref_loss.backward()
        opt.zero_grad()
        loss = strategy.step(x, y)
        if last:
            report["loss_diff"] = max(report["loss_diff"], abs(float(loss) - ref_loss.item()))
        else:
            assert loss is None
        ref_grads = dict(ref.named_parameters())
        for name, p in stage.named_parameters():
            diff = float((p.grad - ref_grads[name].grad).abs().max())
            report["grad_diff"] = max(report["grad_diff"], diff)
        ref_opt.step()
        opt.step()
    report["grad_diff"] = worst_across_ranks(report["grad_diff"])
    report["loss_diff"] = worst_across_ranks(report["loss_diff"])
    ref_state = ref.state_dict()
    report["weight_diff"] = worst_across_ranks(
        max(float((v - ref_state[k]).abs().max()) for k, v in stage.state_dict().items())
    )
    assert max(report["grad_diff"], report["loss_diff"], report["weight_diff"]) <= TOLERANCE, report

    # Each rank writes its own stage; rank 0 merges them into the plain model's checkpoint.
    rank = pe.distributed.rank()
    with pe.Checkpointer(out / "ckpt-pipeline") as ckpt:
        ckpt.save(STEPS, {"model": stage, "optimizer": opt}).wait()
        assert ckpt.steps() == [STEPS], ckpt.steps()
    torch.save({"model": stage.state_dict(), "optimizer": opt.state_dict(), "names": stage_names},
               out / f"pipeline_stage{rank}.pt")

    # It restores into fresh stages bit for bit: weights, Adam moments and step counts.
    again_strategy = pe.distributed.PipelineParallel(mse, n_microbatches=4)
    again = again_strategy.wrap(make_mlp())
    again_opt = torch.optim.Adam(again.parameters(), lr=1e-2)
    with pe.Checkpointer(out / "ckpt-pipeline") as ckpt:
        assert ckpt.restore({"model": again, "optimizer": again_opt}) == STEPS
    report["restore_pp_diff"] = worst_across_ranks(max(
        [max_diff(again.state_dict(), stage.state_dict())]
        + [float((a[k] - b[k]).abs().max()) for a, b in zip(again_opt.state.values(), opt.state.values())
           for k in ("exp_avg", "exp_avg_sq", "step")]))
    assert report["restore_pp_diff"] == 0.0, report
    # A pipeline split differently (stage 0 = children 0-4, stage 1 = 5-6) restores it too.
    gathered: list = [None] * pe.distributed.world_size()
    named_state = {name: [p.detach(), *(opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "step"))]
                   for name, p in stage.named_parameters()}
    dist.all_gather_object(gathered, named_state)
    full = {k: v for part in gathered for k, v in part.items()}
    resplit = pe.distributed.PipelineParallel(mse, split_points=["5"]).wrap(make_mlp())
    resplit_opt = torch.optim.Adam(resplit.parameters(), lr=1e-2)
    with pe.Checkpointer(out / "ckpt-pipeline") as ckpt:
        assert ckpt.restore({"model": resplit, "optimizer": resplit_opt}) == STEPS
    report["resplit_params"] = [n for n, _ in resplit.named_parameters()]
    report["resplit_diff"] = worst_across_ranks(max(
        float((a - b).abs().max()) for name, p in resplit.named_parameters()
        for a, b in zip([p.detach(), *(resplit_opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "step"))],
                        full[name])))
    assert report["resplit_diff"] == 0.0, report

    # ... and training goes on identically from there: one more step on both copies.
    x, y = batches()[0]
    for s_, o_ in ((strategy, opt), (again_strategy, again_opt)):
        o_.zero_grad()
        s_.step(x, y)
        o_.step()
    report["continue_diff"] = worst_across_ranks(max_diff(again.state_dict(), stage.state_dict()))
    assert report["continue_diff"] == 0.0, report

    # The other way round: a plain checkpoint (the test wrote it before the launch) restores
    # into the stages, each rank taking its own parameters and their optimizer state.
    plain = pe.distributed.PipelineParallel(mse).wrap(make_mlp())
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    with pe.Checkpointer(out / "ckpt-plain") as ckpt:
        assert ckpt.restore({"model": plain, "optimizer": plain_opt}) == STEPS
    expected = torch.load(out / "plain_state.pt")
    ids = {name: i for i, (name, _) in enumerate(make_mlp().named_parameters())}
    diffs = [max_diff(plain.state_dict(), {k: expected["model"][k] for k in plain.state_dict()})]
    for i, (name, _) in enumerate(plain.named_parameters()):
        want = expected["optimizer"]["state"][ids[name]]
        diffs += [float((plain_opt.state_dict()["state"][i][k] - want[k]).abs().max())
                  for k in ("exp_avg", "exp_avg_sq", "step")]
    report["plain_to_pp_diff"] = worst_across_ranks(max(diffs))
    assert report["plain_to_pp_diff"] == 0.0, report
    return report


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    pe.distributed.init()
    report = {"tensor": scenario_tensor, "pipeline": scenario_pipeline}[scenario](out)
    (out / f"{scenario}-rank{pe.distributed.rank()}.json").write_text(json.dumps(report, indent=1))
    pe.distributed.barrier()
    pe.distributed.destroy()


if __name__ == "__main__":
    main()
