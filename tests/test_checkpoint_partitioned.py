"""Partitioned (pipeline-stage) state without a distributed job: the renumbering between a
stage optimizer's ids and the full model's, the merge of the stages, and the refusals.

The 2-rank launches in test_model_parallel.py check the same code end to end under torchrun.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import pyengine as pe
from pyengine.checkpoint import partitioned
from pyengine.checkpoint.state_codec import StateEncoder, decode


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5), torch.nn.Linear(5, 1))


def _stage(full: torch.nn.Module, names: list[str]) -> torch.nn.Sequential:
    """A stage as PipelineParallel builds it (children under their names), marked."""
    children = dict(full.named_children())
    stage = torch.nn.Sequential(OrderedDict((n, children[n]) for n in names))
    partitioned.mark(stage, partitioned.Partition(full, stage))
    return stage


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()


def _plain_checkpoint(directory: Path, steps: list[int]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A trained plain model with Adam over model.parameters(), saved at each of `steps`."""
    full = _model()
    opt = torch.optim.Adam(full.parameters(), lr=0.1)
    _step(full, opt)
    with pe.Checkpointer(directory) as ckpt:
        for step in steps:
            ckpt.save(step, {"model": full, "optimizer": opt}).wait()
    return full, opt


def test_a_stage_optimizer_in_its_own_order_round_trips_through_global_ids() -> None:
    full = _model()
    stage = _stage(full, ["0", "1", "2"])
    params = dict(stage.named_parameters())
    order = ["2.weight", "0.weight", "0.bias", "2.bias"]  # not the model's order
    opt = torch.optim.Adam([params[n] for n in order], lr=0.1)
    full(torch.randn(3, 4)).sum().backward()
    opt.step()
    encoder = StateEncoder()
    saved = encoder.encode(partitioned.globalize_optimizer(opt.state_dict(), opt, stage._pyengine_partition),
                           ("optimizer",), all_stable=True)
    merged = partitioned.merge("optimizer", partitioned.OPTIMIZER, [saved])
    assert [k for k, _ in merged["state"]["__dict__"]] == [0, 1, 2, 3]  # model order: 0.w 0.b 2.w 2.b
    # The last layer's parameter (id 4, 5) is another stage's: pretend it saved too.
    merged["param_groups"][0]["params"] += [4, 5]
    fresh = torch.optim.Adam([params[n] for n in order], lr=0.1)
    local = partitioned.localize(partitioned.OPTIMIZER, merged, stage._pyengine_partition, fresh, "optimizer")
    tensors = {t.name: t.tensor for t in encoder.tensors}
    fresh.load_state_dict(decode(local, tensors))
    for name in order:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[params[name]][key], opt.state[params[name]][key]), (name, key)


def test_a_plain_checkpoint_restores_into_a_stage(tmp_path: Path) -> None:
    full, opt = _plain_checkpoint(tmp_path, [1])
    target = _model()
    stage = _stage(target, ["2", "3"])
    stage_opt = torch.optim.Adam(stage.parameters(), lr=0.1)
    with pe.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore({"model": stage, "optimizer": stage_opt}) == 1
    for name, p in stage.named_parameters():
        original = dict(full.named_parameters())[name]
        assert torch.equal(p, original)
        assert torch.equal(stage_opt.state[p]["exp_avg"], opt.state[original]["exp_avg"])


def test_a_stage_optimizer_that_does_not_fit_is_refused_and_nothing_is_quarantined(tmp_path: Path) -> None:
    _plain_checkpoint(tmp_path, [1, 2])
    stage = _stage(_model(), ["0", "1", "2"])
    p = dict(stage.named_parameters())
    two_groups = torch.optim.Adam([{"params": [p["0.weight"], p["0.bias"]]}, {"params": [p["2.weight"], p["2.bias"]]}])
    with pe.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="param groups"):
            ckpt.restore({"model": stage, "optimizer": two_groups})
        assert ckpt.steps() == [1, 2]  # a mismatch is not corruption: nothing moved aside
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_a_plain_optimizer_over_part_of_the_model_cannot_be_mapped_to_stages(tmp_path: Path) -> None:
    full = _model()
    for q in full[0].parameters():
        q.requires_grad_(False)
    opt = torch.optim.Adam([q for q in full.parameters() if q.requires_grad], lr=0.1)  # ids 0.. are not positions
    _step(full, opt)
    with pe.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"model": full, "optimizer": opt}).wait()
    stage = _stage(_model(), ["0", "1", "2"])
    with pe.Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="cannot be mapped"):
        ckpt.restore({"model": stage, "optimizer": torch.optim.Adam(stage.parameters())})


def test_merging_stages_refuses_shared_modules_and_differing_hyperparameters() -> None:
    from pyengine.checkpoint import partitioned

    a = {"0.weight": {"__tensor__": "model/0.weight"}}
    with pytest.raises(pe.CheckpointError, match="must not share modules"):
        partitioned.merge("model", partitioned.MODULE, [a, dict(a)])
    group = {"lr": 0.01, "betas": {"__tuple__": [0.9, 0.999]}, "params": [0]}
    opt0 = {"state": {"__dict__": [[0, {"step": 1}]]}, "param_groups": [group]}
    opt1 = {"state": {"__dict__": [[1, {"step": 1}]]}, "param_groups": [{**group, "params": [1]}]}
    merged = partitioned.merge("optimizer", partitioned.OPTIMIZER, [opt1, opt0])
    assert merged["param_groups"][0]["params"] == [0, 1]
    assert [k for k, _ in merged["state"]["__dict__"]] == [0, 1]
    with pytest.raises(pe.CheckpointError, match="hyperparameters differ"):
        partitioned.merge("optimizer", partitioned.OPTIMIZER, [opt0, {**opt1, "param_groups": [{**group, "lr": 1.0}]}])
