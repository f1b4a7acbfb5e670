"""An overlapped save (copy during the next forward/backward) stores exactly what a
blocking save of the same moment stores, and the next optimizer step waits for it."""

from __future__ import annotations

import torch

import pyengine as pe


def _big_model() -> torch.nn.Module:
    # ~64 MB of parameters, so the background copy is still running when step() is called.
    return torch.nn.Sequential(torch.nn.Linear(2048, 4096), torch.nn.BatchNorm1d(4096), torch.nn.Linear(4096, 2048))


def _train_step(model, opt):
    loss = model(torch.randn(8, 2048)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _all_tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _all_tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _all_tensors(v)]
    return []


def test_overlapped_snapshot_equals_blocking_snapshot_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = _big_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        _train_step(model, opt)
    state = {"model": model, "optimizer": opt}
    with pe.Checkpointer(tmp_path / "blocking", capture_rng=False) as blocking, \
            pe.Checkpointer(tmp_path / "overlap", capture_rng=False) as overlapped:
        blocking.save(2, state).wait()
        handle = overlapped.save(2, state, overlap=True)
        # The next forward/backward runs while parameters are being copied; BatchNorm's
        # running statistics change here, so they must have been copied before save() returned.
        _train_step(model, opt)  # opt.step() must wait for the copy
        handle.wait()
        a, b = blocking.load(), overlapped.load()
    names_a, names_b = sorted(a["model"]), sorted(b["model"])
    assert names_a == names_b
    for ta, tb in zip(_all_tensors(a), _all_tensors(b)):
        assert torch.equal(ta, tb)
    # The model really moved on after the save, so equality above is not trivial.
    assert not torch.equal(model[0].weight, a["model"]["0.weight"])
    assert not torch.equal(model[1].running_mean, a["model"]["1.running_mean"])


def test_optimizer_step_waits_for_an_unfinished_snapshot(tmp_path):
    torch.manual_seed(0)
    model = _big_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_step(model, opt)
    expected = model[0].weight.detach().clone()
    with pe.Checkpointer(tmp_path, capture_rng=False) as ckpt:
        handle = ckpt.save(1, {"model": model}, overlap=True)
        # step() comes at once (gradients are left from the last step), long before a 64 MB copy ends.
        opt.step()
        assert handle.stats["snapshot_done"]
        handle.wait()
        assert torch.equal(ckpt.load()["model"]["0.weight"], expected)


def test_blocking_save_copies_everything_before_returning(tmp_path):
    torch.manual_seed(0)
    model = _big_model()
    with pe.Checkpointer(tmp_path, capture_rng=False) as ckpt:
        handle = ckpt.save(1, {"model": model})
        assert handle.stats["snapshot_done"]
        expected = model[2].weight.detach().clone()
        with torch.no_grad():
            model[2].weight.add_(1.0)  # a change after save() returns is not in the checkpoint
        handle.wait()
        assert torch.equal(ckpt.load()["model"]["2.weight"], expected)
