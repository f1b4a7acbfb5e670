"""Saving and restoring full training state is exact: weights, buffers, optimizer,
schedule, GradScaler, RNG, numpy arrays and JSON values, and a resumed run equals an
uninterrupted one bit for bit."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import pyengine as pe


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))


class _Training:
    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.model = _model()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=0.05, total_steps=100)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def state(self) -> dict:
        return {"model": self.model, "optimizer": self.opt, "scheduler": self.sched, "scaler": self.scaler}

    def step(self) -> None:
        # Draws from every RNG the checkpoint must capture.
        x = torch.randn(32, 6) + float(np.random.rand()) + random.random()
        loss = self.model(x).pow(2).mean()
        self.opt.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()


def _assert_state_equal(a, b):
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_state_equal(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_restore_reproduces_every_state_dict_exactly(tmp_path):
    run = _Training()
    for _ in range(5):
        run.step()
    with pe.Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, run.state()).wait()
        fresh = _Training(seed=99)
        assert ckpt.restore(fresh.state()) == 5
    for key, obj in run.state().items():
        _assert_state_equal(obj.state_dict(), fresh.state()[key].state_dict())


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
    reference = _Training()
    for _ in range(20):
        reference.step()

    first = _Training()
    with pe.Checkpointer(tmp_path) as ckpt:
        for step in range(1, 13):
            first.step()
            if step % 4 == 0:
                ckpt.save(step, first.state())
    # Scramble the global RNGs, as a new process would have them.
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)
    second = _Training(seed=7)
    with pe.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(second.state()) == 12
    for _ in range(8):
        second.step()
    for a, b in zip(reference.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_values_arrays_and_tensors_round_trip(tmp_path):
    extra = {
        "best_loss": 0.25, "history": [1, 2.5, None, True, "x"], "pair": (1, (2, 3)),
        "by_int": {0: "a", 7: [1.5]}, "inf": float("inf"), "nan": float("nan"), "big": 2**70,
        "np_scalar": np.float32(1.25), "dtype": torch.bfloat16, "marker_like": {"__tensor__": "not a tensor"},
        "array": np.arange(12, dtype=np.int16).reshape(3, 4), "t": torch.arange(5, dtype=torch.float64),
        "empty": torch.zeros(0, 3), "scalar": torch.tensor(3, dtype=torch.int64),
        "bf16": torch.randn(4, 4).to(torch.bfloat16), "bools": torch.tensor([True, False]),
        "strided": torch.arange(20.0).reshape(4, 5).t(),
    }
    with pe.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"extra": extra}).wait()
        loaded = ckpt.load()["extra"]
    expected = dict(extra, strided=extra["strided"].contiguous())
    assert isinstance(loaded["array"], np.ndarray) and loaded["array"].dtype == np.int16
    np.testing.assert_array_equal(loaded.pop("array"), expected.pop("array"))
    assert isinstance(loaded["np_scalar"], np.float32)
    _assert_state_equal(loaded, expected)


def test_restore_into_plain_values_and_tensors_in_place(tmp_path):
    weights = torch.randn(3, 3)
    counts = np.arange(4)
    extra = {"epoch": 3}
    with pe.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": weights, "counts": counts, "extra": extra}).wait()
        w2, c2, e2 = torch.zeros(3, 3), np.zeros(4, dtype=counts.dtype), {"stale": True}
        ckpt.restore({"w": w2, "counts": c2, "extra": e2})
    assert torch.equal(w2, weights)
    np.testing.assert_array_equal(c2, counts)
    assert e2 == {"epoch": 3}


def test_rng_capture_can_be_turned_off(tmp_path):
    with pe.Checkpointer(tmp_path, capture_rng=False) as ckpt:
        ckpt.save(1, {"x": torch.ones(1)}).wait()
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        ckpt.restore({"x": torch.zeros(1)})
        assert torch.equal(torch.rand(3), expected)  # the RNG was left alone


def test_keep_last_prunes_only_older_checkpoints(tmp_path):
    with pe.Checkpointer(tmp_path, keep_last=2) as ckpt:
        for step in (10, 20, 30, 40):
            ckpt.save(step, {"x": torch.full((4,), float(step))})
        ckpt.wait()
        assert ckpt.steps() == [30, 40]
        assert ckpt.latest_step() == 40
        assert float(ckpt.load(30)["x"][0]) == 30.0


def test_overlapping_saves_are_bounded_and_all_commit(tmp_path):
    with pe.Checkpointer(tmp_path, keep_last=0, max_in_flight=2, capture_rng=False) as ckpt:
        handles = [ckpt.save(s, {"x": torch.full((1 << 18,), float(s))}) for s in range(1, 7)]
        for h in handles:
            h.wait()
            assert h.done() and h.stats["bytes"] == 4 << 18
        assert ckpt.steps() == list(range(1, 7))
        assert all(float(ckpt.load(s)["x"][-1]) == s for s in range(1, 7))


def _init_single_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    return dist


def test_ddp_wrapped_module_saves_inner_keys_and_restores_both_ways(tmp_path):
    dist = _init_single_process_group(tmp_path)
    try:
        torch.manual_seed(0)
        plain = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        with pe.Checkpointer(tmp_path / "a") as ckpt:
            ckpt.save(1, {"model": ddp}).wait()
            assert not any(k.startswith("module.") for k in ckpt.load()["model"])
            ckpt.restore({"model": plain})
        _assert_state_equal(plain.state_dict(), ddp.module.state_dict())
        with pe.Checkpointer(tmp_path / "b") as ckpt:
            torch.nn.init.constant_(plain[0].weight, 0.5)
            ckpt.save(1, {"model": plain}).wait()
            ckpt.restore({"model": ddp})
        assert torch.equal(ddp.module[0].weight, plain[0].weight)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.bool,
                                   torch.complex64])
def test_every_supported_dtype_round_trips(tmp_path, dtype):
    t = (torch.randn(7, 3) * 10).to(dtype) if dtype != torch.complex64 else torch.randn(7, 3, dtype=dtype)
    with pe.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"t": t}).wait()
        assert torch.equal(ckpt.load()["t"], t)
