"""CUDA state is staged device-to-host through pinned buffers and restores exactly
(skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import pyengine as pe

pytestmark = pytest.mark.gpu


def _cuda_training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.BatchNorm1d(512), torch.nn.Linear(512, 8)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt


def _step(model, opt):
    loss = model(torch.randn(32, 256, device="cuda")).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_cuda_state_round_trips_and_resume_is_exact(tmp_path):
    model, opt = _cuda_training()
    for _ in range(3):
        _step(model, opt)
    with pe.Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, {"model": model, "optimizer": opt}).wait()
        for _ in range(4):
            _step(model, opt)
        expected = [p.detach().clone() for p in model.parameters()]
        model2, opt2 = _cuda_training()
        assert ckpt.restore({"model": model2, "optimizer": opt2}) == 3
    for _ in range(4):
        _step(model2, opt2)
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b)


def test_cuda_overlapped_save_equals_blocking_save(tmp_path):
    model, opt = _cuda_training()
    _step(model, opt)
    state = {"model": model, "optimizer": opt}
    with pe.Checkpointer(tmp_path / "a", capture_rng=False) as a, \
            pe.Checkpointer(tmp_path / "b", capture_rng=False) as b:
        a.save(1, state).wait()
        handle = b.save(1, state, overlap=True)
        _step(model, opt)
        handle.wait()
        la, lb = a.load()["model"], b.load()["model"]
    assert la.keys() == lb.keys()
    assert all(torch.equal(la[k], lb[k]) for k in la)
