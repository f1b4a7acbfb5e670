"""The benchmark workload: a full training state (model + Adam) of a chosen size, and the
baselines users would otherwise pick, each timed the same way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from pyengine.benchmarks.dcp_baselines import DcpSaver


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


def dcp_durable_seconds(saver: DcpSaver, model, opt, path: Path) -> dict[str, float]:
    """One DCP save with nothing else running: block_s (get_state_dict and async_save until it
    returns), staged_s (until the copy is done; async staging only) and durable_s (until the
    upload is done: files fsynced, `.metadata` renamed), all from the start. `path` is removed."""
    pending = saver.save(model, opt, path)
    pending.wait_staged()
    staged = time.perf_counter()
    pending.wait()
    r = {"block_s": pending.stall_seconds, "durable_s": time.perf_counter() - pending.started}
    if pending.staged is not None:
        r["staged_s"] = staged - pending.started
    shutil.rmtree(path)
    return r


def dcp_overlapped_step_seconds(saver: DcpSaver, model, opt, batch: torch.Tensor, path: Path) -> tuple[float, float]:
    """What the training step right after a DCP save with async staging loses: returns (lost, plain),
    where lost is the time from the save's start to the end of that step, minus a plain step
    timed just before. The step waits for staging_completion before opt.step(), as torchtitan
    does; the upload is waited for afterwards and `path` removed."""
    plain = train_step_seconds(model, opt, batch)
    pending = saver.save(model, opt, path)
    train_step_seconds(model, opt, batch, before_step=pending.wait_staged)
    lost = time.perf_counter() - pending.started - plain
    pending.wait()
    shutil.rmtree(path)
    return lost, plain


def drop_page_cache() -> bool:
    """Evicts clean file pages so the next read comes from the disk (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def train_step_seconds(model, opt, batch: torch.Tensor, before_step: Callable[[], None] | None = None) -> float:
    """One forward/backward/optimizer step of the benchmark model; `before_step` runs between the
    backward and opt.step() (where a training loop waits for a snapshot's copy)."""
    t0 = time.perf_counter()
    model(batch).square().mean().backward()
    if before_step is not None:
        before_step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def print_and_save(report: str, figures: dict[str, float], json_path: Path | None) -> None:
    """A bench's end: its report printed, and its raw figures written to `json_path` when given."""
    print(report)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(figures, indent=2))
