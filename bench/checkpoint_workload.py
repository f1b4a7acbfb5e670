"""The benchmark workload: a full training state (model + Adam) of a chosen size, and the
baselines users would otherwise pick, each timed the same way."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import torch


def make_state(params_millions: float, width: int = 4096) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP of about `params_millions` parameters with Adam state (3x the weights in bytes)."""
    layers = max(1, round(params_millions * 1e6 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()  # creates exp_avg / exp_avg_sq
    opt.zero_grad(set_to_none=True)
    return model, opt


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = list(model.state_dict().values())
    for s in opt.state_dict()["state"].values():
        tensors.extend(v for v in s.values() if isinstance(v, torch.Tensor))
    return tensors


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in state_tensors(model, opt))


def memcpy_seconds(tensors: list[torch.Tensor], dst: list[torch.Tensor]) -> float:
    """A plain copy of the same bytes into preallocated, already-touched buffers."""
    t0 = time.perf_counter()
    for d, s in zip(dst, tensors):
        d.copy_(s)
    return time.perf_counter() - t0


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save_fsync_seconds(model, opt, path: Path) -> float:
    t0 = time.perf_counter()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    fsync_path(path)
    return time.perf_counter() - t0


def torch_load_seconds(model, opt, path: Path) -> float:
    t0 = time.perf_counter()
    sd = torch.load(path, weights_only=True)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optimizer"])
    return time.perf_counter() - t0


def dd_fsync_bytes_per_second(directory: Path, nbytes: int, direct: bool = False) -> float:
    """The disk's fsync'd sequential write bandwidth, as `dd conv=fsync` measures it
    (with `oflag=direct` too when `direct`)."""
    target = directory / "dd.bin"
    block = 8 << 20
    count = max(1, nbytes // block)
    flags = ["conv=fsync", "oflag=direct"] if direct else ["conv=fsync"]
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", f"bs={block}", f"count={count}", *flags],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    target.unlink()
    return count * block / seconds


class DcpAsyncSave:
    """torch.distributed.checkpoint.async_save in one process (a gloo group of one)."""

    def __init__(self, tmp: Path) -> None:
        import torch.distributed as dist

        self._dist = dist
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)

    def blocking_and_total_seconds(self, model, opt, path: Path) -> tuple[float, float]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        t0 = time.perf_counter()
        model_sd, optim_sd = get_state_dict(model, opt)
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        blocked = time.perf_counter() - t0
        future.result()
        return blocked, time.perf_counter() - t0

    def close(self) -> None:
        self._dist.destroy_process_group()


def drop_page_cache() -> bool:
    """Evicts clean file pages so the next read comes from the disk (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def train_step_seconds(model, opt, batch: torch.Tensor) -> float:
    """One forward/backward/optimizer step of the benchmark model."""
    t0 = time.perf_counter()
    model(batch).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0
