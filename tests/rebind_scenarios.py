"""Optimizers built before wrapping, rebound by pe.Trainer and pe.distributed.setup, under torchrun.

    python -m torch.distributed.run --nproc-per-node 2 tests/rebind_scenarios.py OUT

OUT/data is the data set the test wrote. Every scenario runs for each strategy name on every
rank, asserts, and writes its figures to OUT/rebind-rank<R>.json; a non-zero exit fails the
test. One launch runs them all: starting torch and the process group costs seconds.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pyengine as pe

STRATEGIES = ("ddp", "fsdp", "tensor", "local_sgd")
GLOBAL_BATCH = 16
# Two groups, the later layers first, each with its own lr and weight decay.
GROUPS = ({"layers": ("2", "3"), "lr": 3e-3, "weight_decay": 0.1}, {"layers": ("0",), "lr": 2e-2, "weight_decay": 0.0})
STATE_STEPS, MORE_STEPS = 3, 4
TOLERANCE = 1e-5  # sums in another order: the sharded and the single-process runs differ by rounding


def write_data(path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 8)).astype(np.float32)
    y = (x @ rng.standard_normal((8, 1)) + 0.1 * np.sin(3 * x[:, :1])).astype(np.float32)
    pe.data.write_dataset(path, {"x": x, "y": y})


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # "tensor" splits 0 column-wise and 2 row-wise and leaves 3 whole, so the optimizer mixes
    # DTensor shards, a replicated DTensor bias and plain tensors; FSDP shards every one.
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Linear(8, 1))


def groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    layers = pe.checkpoint.stateful.unwrap_module(model)
    return [{"params": [p for layer in g["layers"] for p in layers[int(layer)].parameters()], "lr": g["lr"],
             "weight_decay": g["weight_decay"]} for g in GROUPS]


def group_summary(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[list[Any]]:
    """Each group's lr, weight decay and parameter names, read through the model that trains."""
    names = {id(p): n for n, p in pe.checkpoint.stateful.unwrap_module(model).named_parameters()}
    return [[g["lr"], g["weight_decay"], [names.get(id(p), "NOT IN MODEL") for p in g["params"]]]
            for g in optimizer.param_groups]


def expected_groups() -> list[list[Any]]:
    names = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"], "3": ["3.weight", "3.bias"]}
    return [[g["lr"], g["weight_decay"], [n for layer in g["layers"] for n in names[layer]]] for g in GROUPS]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: full(v) for k, v in pe.checkpoint.stateful.unwrap_module(model).state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def loader(out: Path, name: str) -> pe.data.Loader:
    shard = ({"rank": 0, "world_size": 1} if name == "tensor" else
             {"rank": pe.distributed.rank(), "world_size": pe.distributed.world_size()})
    return pe.data.Loader(pe.data.Dataset(out / "data"), GLOBAL_BATCH // shard["world_size"], shuffle=True, seed=1,
                          drop_last=True, **shard)


def batch_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: Any, out: Path, name: str,
        checkpoint_dir: Path | None = None) -> pe.Trainer:
    trainer = pe.Trainer(model, optimizer, batch_loss, loader(out, name), progress=False, strategy=strategy,
                         checkpoint_dir=checkpoint_dir)
    trainer.fit(pe.VirtualEpochs(num_training_examples=128, stop_point=1, batch_size=GLOBAL_BATCH, num_checkpoints=2))
    return trainer


def optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [full(v) for s in optimizer.state.values() for v in s.values()]


def scenario_trainer(out: Path, name: str) -> dict:
    """pe.Trainer(strategy=name) with AdamW built before wrapping, in two groups, ends where the
    same Trainer with the optimizer built after wrapping ends, bit for bit."""
    strategy = pe.distributed.make_strategy(name)
    after = strategy.wrap(make_model())
    fit(after, torch.optim.AdamW(groups(after)), strategy, out, name)
    reference = full_weights(after)

    model = make_model()
    opt = torch.optim.AdamW(groups(model))
    checkpoints = out / f"trainer-{name}"
    trainer = fit(model, opt, name, out, name, checkpoints)
    assert trainer.optimizer is opt
    report = {"vs_after_wrap": max_diff(full_weights(trainer.model), reference),
              "groups": group_summary(opt, trainer.model)}
    assert report["vs_after_wrap"] == 0.0, report
    assert report["groups"] == expected_groups(), report
    if name in ("fsdp", "tensor"):
        # A rebound optimizer's checkpoint resumes into another one rebound the same way.
        again = make_model()
        again_opt = torch.optim.AdamW(groups(again))
        resumed = fit(again, again_opt, name, out, name, checkpoints)
        assert resumed.step == trainer.step
        report["resumed_vs_saved"] = max_diff(full_weights(resumed.model), reference)
        report["resumed_state_equal"] = all(
            torch.equal(a, b) for a, b in zip(optimizer_state(again_opt), optimizer_state(opt), strict=True))
        assert report["resumed_vs_saved"] == 0.0 and report["resumed_state_equal"], report
        # An object the user applied after building the optimizer.
        model = make_model()
        opt = torch.optim.AdamW(groups(model))
        strategy = pe.distributed.make_strategy(name)
        strategy.wrap(model)
        trainer = fit(model, opt, strategy, out, name)
        report["applied_object_vs_after_wrap"] = max_diff(full_weights(trainer.model), reference)
        assert report["applied_object_vs_after_wrap"] == 0.0, report
    return report


def global_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n * GLOBAL_BATCH, 8, generator=g)
    y = x.sum(dim=1, keepdim=True).sin()
    return [(x[i:i + GLOBAL_BATCH], y[i:i + GLOBAL_BATCH]) for i in range(0, len(x), GLOBAL_BATCH)]


def this_ranks_part(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "tensor":
        return x  # model parallel: every rank the same batch
    per_rank = len(x) // pe.distributed.world_size()
    return x[pe.distributed.rank() * per_rank:(pe.distributed.rank() + 1) * per_rank]


def adam_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list, name: str | None = None,
               strategy: Any = None) -> None:
    for x, y in batches:
        if name is not None:
            x, y = this_ranks_part(x, name), this_ranks_part(y, name)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if strategy is not None:
            strategy.after_optimizer_step()


def scenario_setup_with_state(name: str) -> dict:
    """pe.distributed.setup moves Adam state from earlier steps onto the wrapped parameters, and
    training goes on as the single-process run with that state does."""
    batches = global_batches(STATE_STEPS + MORE_STEPS)
    model = make_model()
    opt = torch.optim.Adam(groups(model))
    adam_steps(model, opt, batches[:STATE_STEPS])  # in one process, the same on every rank
    names = {id(p): n for n, p in model.named_parameters()}
    before = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    single = make_model()
    single.load_state_dict(model.state_dict())
    single_opt = torch.optim.Adam(groups(single))
    single_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # else both step the same state tensors

    wrapped, opt_out, strategy = pe.distributed.setup(model, opt, name)
    assert opt_out is opt
    after_names = {id(p): n for n, p in pe.checkpoint.stateful.unwrap_module(wrapped).named_parameters()}
    moved = {after_names[id(p)]: s for p, s in opt.state.items()}
    assert moved.keys() == before.keys(), (sorted(moved), sorted(before))
    kinds = set()
    for n, s in moved.items():
        assert s.keys() == before[n].keys()
        for k, v in s.items():
            kinds.add(f"{k}:{type(v).__name__}")
            assert torch.equal(full(v), before[n][k]), (name, n, k)
    report: dict[str, Any] = {"state_kinds": sorted(kinds), "groups": group_summary(opt, wrapped)}
    assert report["groups"] == expected_groups(), report

    adam_steps(wrapped, opt, batches[STATE_STEPS:], name, strategy)
    adam_steps(single, single_opt, batches[STATE_STEPS:])
    steps = {float(s["step"]) for s in opt.state.values()}
    assert steps == {STATE_STEPS + MORE_STEPS}, steps
    if name != "local_sgd":  # local SGD promises averaged replicas, not the single-process result
        report["vs_single_process"] = max_diff(full_weights(wrapped), full_weights(single))
        assert report["vs_single_process"] <= TOLERANCE, report
    return report


def expect_rebind_error(make: Any, name: str) -> str:
    try:
        make()
    except pe.distributed.OptimizerRebindError as e:
        return str(e)
    raise AssertionError(f"{name}: an optimizer that cannot be rebound was accepted")


def scenario_impossible() -> dict:
    """Every rank raises the same clear error, and none waits for the others forever."""
    report = {}

    def foreign() -> None:
        model = make_model()
        opt = torch.optim.SGD([*model.parameters(), torch.nn.Parameter(torch.zeros(3))], lr=0.1)
        pe.distributed.setup(model, opt, "fsdp")
    report["foreign"] = expect_rebind_error(foreign, "a parameter outside the model")

    def adafactor(name: str) -> None:
        model = make_model()
        opt = torch.optim.Adafactor(model.parameters())
        adam_steps(model, opt, global_batches(1))
        pe.distributed.setup(model, opt, name)
    report["adafactor_fsdp"] = expect_rebind_error(lambda: adafactor("fsdp"), "Adafactor under FSDP")
    adafactor("ddp")  # DDP keeps the parameters: nothing to shard, so nothing refused

    def one_rank_stepped() -> None:
        model = make_model()
        opt = torch.optim.Adam(model.parameters())
        if pe.distributed.rank() == 0:
            adam_steps(model, opt, global_batches(1))
        pe.distributed.setup(model, opt, "tensor")
    report["ranks_differ"] = expect_rebind_error(one_rank_stepped, "optimizer state on one rank only")
    return report


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    pe.distributed.init()
    report: dict[str, Any] = {}
    for name in STRATEGIES:
        report[f"trainer_{name}"] = scenario_trainer(out, name)
        report[f"setup_{name}"] = scenario_setup_with_state(name)
    report["impossible"] = scenario_impossible()
    (out / f"rebind-rank{pe.distributed.rank()}.json").write_text(json.dumps(report, indent=1))
    pe.distributed.barrier()
    pe.distributed.destroy()


if __name__ == "__main__":
    main()
