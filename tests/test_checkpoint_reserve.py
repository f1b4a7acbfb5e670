"""Checkpointer.reserve(state): the staging memory is allocated before the first save, which
then reuses it instead of allocating (and page-faulting) its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pyengine as pe


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 512)).sum().backward()
    opt.step()  # Adam's moments exist now: the state has its full size
    return model, opt


def test_the_first_save_after_reserve_allocates_nothing_more(tmp_path: Path) -> None:
    model, opt = _trained()
    state = {"model": model, "optimizer": opt, "step": 1}
    state_bytes = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(),
                                                               *opt.state[model.weight].values()])
    with pe.Checkpointer(tmp_path) as ckpt:
        assert ckpt.staging_bytes == 0
        held = ckpt.reserve(state)
        assert held == ckpt.staging_bytes >= state_bytes
        assert ckpt.steps() == []  # nothing written
        ckpt.save(1, state).wait()
        ckpt.save(2, state).wait()
        assert ckpt.staging_bytes == held
        restored = torch.nn.Linear(512, 512)
        ckpt.restore({"model": restored}, step=2)
    assert torch.equal(restored.weight, model.weight)


def test_reserve_refuses_what_save_refuses(tmp_path: Path) -> None:
    with pe.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="state must be a mapping"):
            ckpt.reserve([torch.zeros(3)])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="never pickles"):
            ckpt.reserve({"bad": object()})
        assert ckpt.staging_bytes == 0
