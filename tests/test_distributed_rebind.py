"""An optimizer built before wrapping just works with every strategy name.

One 2-rank gloo launch (tests/rebind_scenarios.py) runs, for "ddp", "fsdp", "tensor" and
"local_sgd": the Trainer with AdamW in two groups built before wrapping against the same
Trainer with the optimizer built after; pe.distributed.setup with Adam state from earlier
steps against the single-process run continuing from that state; and the cases that cannot
work. The in-process tests cover the rebind's own rules in a world of one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import pyengine as pe
from pyengine.distributed.optimizer_rebind import ParametersBeforeWrap

sys.path.insert(0, str(Path(__file__).parent))
import rebind_scenarios as scen  # noqa: E402
from torchrun_launch import torchrun  # noqa: E402

NAMES = scen.STRATEGIES


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("rebind")
    scen.write_data(out / "data")
    torchrun(Path(scen.__file__), 2, str(out))
    return [json.loads((out / f"rebind-rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.distributed
@pytest.mark.parametrize("name", NAMES)
def test_trainer_with_an_optimizer_built_before_wrapping_ends_as_one_built_after(reports: list[dict],
                                                                                 name: str) -> None:
    for report in reports:
        r = report[f"trainer_{name}"]
        assert r["vs_after_wrap"] == 0.0
        assert r["groups"] == scen.expected_groups()  # order, members, lr and weight decay kept
        if name in ("fsdp", "tensor"):
            assert r["applied_object_vs_after_wrap"] == 0.0
            assert r["resumed_vs_saved"] == 0.0 and r["resumed_state_equal"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", NAMES)
def test_setup_carries_adam_state_onto_the_wrapped_parameters(reports: list[dict], name: str) -> None:
    for report in reports:
        r = report[f"setup_{name}"]
        assert r["groups"] == scen.expected_groups()
        if name == "fsdp":
            assert {"exp_avg:DTensor", "exp_avg_sq:DTensor"} <= set(r["state_kinds"])
        if name == "tensor":  # split layers' state sharded, the whole last layer's plain
            assert {"exp_avg:DTensor", "exp_avg:Tensor"} <= set(r["state_kinds"])
        if name != "local_sgd":
            assert r["vs_single_process"] <= scen.TOLERANCE


@pytest.mark.distributed
def test_what_cannot_be_rebound_raises_the_same_clear_error_on_every_rank(reports: list[dict]) -> None:
    first, second = (r["impossible"] for r in reports)
    assert first == second
    assert "shape (3,) that is not a parameter of the model" in first["foreign"]
    assert "Adafactor keeps state 'row_var' of '0.weight'" in first["adafactor_fsdp"]
    assert "build the optimizer after wrap()" in first["adafactor_fsdp"]
    assert "rank 0: 4, rank 1: 0" in first["ranks_differ"]


# ------------------------------------------------------------------- in one process


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


class ReplacingStrategy:
    """Replaces every parameter by a copy, as FSDP2 does by a shard, in a world of one."""

    name = "replacing"

    def __init__(self, change: Any = None) -> None:
        self.change = change
        self.module = self.wrapped = None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        self.parameters_before_wrap = ParametersBeforeWrap(model)
        for module in model.modules():
            for key, p in list(module._parameters.items()):
                module._parameters[key] = torch.nn.Parameter(p.detach().clone())
        if self.change is not None:
            self.change(model)
        self.module = self.wrapped = model
        return model


def stepped_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([{"params": model[2].parameters(), "lr": 0.1},
                             {"params": model[0].parameters(), "lr": 0.01, "weight_decay": 0.5}])
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return opt


def test_rebind_swaps_in_the_replacements_with_their_groups_and_state() -> None:
    model = make_model()
    opt = stepped_adamw(model)
    old = {n: p for n, p in model.named_parameters()}
    state = {n: opt.state[p] for n, p in old.items()}
    strategy = ReplacingStrategy()
    strategy.wrap(model)
    assert pe.distributed.rebind_optimizer(opt, strategy) is opt
    new = dict(model.named_parameters())
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(new["2.weight"]), id(new["2.bias"])], [id(new["0.weight"]), id(new["0.bias"])]]
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.01), (0.01, 0.5)]
    assert len(opt.state) == 4 and all(old[n] not in opt.state for n in old)
    for n, p in new.items():
        assert opt.state[p].keys() == state[n].keys()
        assert all(torch.equal(opt.state[p][k], state[n][k]) for k in state[n])
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # the rebound optimizer trains the new parameters
    assert not torch.equal(new["0.weight"], old["0.weight"])


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.__delitem__(2), "trains '2.weight', which the 'replacing'-wrapped model no longer has"),
    (lambda m: m.__setitem__(2, torch.nn.Linear(6, 3)), r"'2.weight' has shape \(2, 6\) in the optimizer but \(3, 6\)"),
])
def test_rebind_refuses_a_parameter_the_wrapped_model_lost(change: Any, message: str) -> None:
    model = make_model()
    opt = stepped_adamw(model)
    strategy = ReplacingStrategy(change)
    strategy.wrap(model)
    groups_before = [[id(p) for p in g["params"]] for g in opt.param_groups]
    with pytest.raises(pe.distributed.OptimizerRebindError, match=message):
        pe.distributed.rebind_optimizer(opt, strategy)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == groups_before  # nothing half-done


def test_setup_in_a_world_of_one_returns_the_model_and_the_same_optimizer() -> None:
    for name in NAMES:
        model = make_model()
        opt = torch.optim.Adam(model.parameters())
        run = pe.distributed.setup(model, opt, name)
        wrapped, optimizer, strategy = run
        assert wrapped is model and optimizer is opt and strategy.name == name
        assert run.data_shard == {"rank": 0, "world_size": 1}
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    assert pe.distributed.setup(model, opt, "local_sgd", period=3).strategy.period == 3


def test_setup_refuses_hogwild_and_options_beside_a_strategy_object() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NotImplementedError, match=r"Hogwild\(num_processes\).run"):
        pe.distributed.setup(model, opt, "hogwild")
    with pytest.raises(ValueError, match=r"pass them to LocalSGD\(...\)"):
        pe.distributed.setup(model, opt, pe.distributed.LocalSGD(), period=2)
