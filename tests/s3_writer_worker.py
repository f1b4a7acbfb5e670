"""The processes tests/test_checkpoint_s3.py starts. The server and its credentials come from
the environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), as a user's
job would find them.

    save_loop(conn, url, env)   (a child of tests/fork_server.py, so that each of the many
        processes the SIGKILL test starts is forked with torch already imported) runs
        fork_server.save_forever on a Checkpointer over URL: it restores the newest step and
        saves forever, one save in flight, sending ("durable", N-1) once save(N) returns.
    python -m torch.distributed.run --nproc-per-node 2 tests/s3_writer_worker.py two-rank URL OUT
        trains a FullyShard model on 2 gloo ranks, saves its model and Adam state at step 3 to
        URL, and rank 0 writes the full state it saved to OUT/expected.pt
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fork_server import save_forever  # tests/ is on sys.path, in pytest, its forked children and torchrun

import pyengine as pe

KEEP_LAST = 2
TRAINED_STEPS = 3


def make_state(step: int) -> dict:
    """A pure function of the step (~9.5 MB; the 8 MB tensor goes up in two multipart parts of
    5 MiB), so the parent can check any checkpoint it finds. Values stay exact in float32."""
    return {
        "weights": torch.arange(1 << 21, dtype=torch.float32) * 0.25 + step,
        "moments": torch.arange(1 << 17, dtype=torch.float64) - 3 * step,
        "ids": np.arange(1 << 14, dtype=np.int64) * (step + 7),
        "meta": {"step": step, "tag": f"step-{step}"},
    }


def empty_state() -> dict:
    return {"weights": torch.zeros(1 << 21, dtype=torch.float32), "moments": torch.zeros(1 << 17, dtype=torch.float64),
            "ids": np.zeros(1 << 14, dtype=np.int64), "meta": {}}


def open_checkpointer(url: str) -> pe.Checkpointer:
    return pe.Checkpointer(url, keep_last=KEEP_LAST, max_shards=2,
                           storage_options={"part_bytes": 5 << 20, "max_attempts": 3})


def save_loop(conn: Any, url: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    save_forever(conn, open_checkpointer(url), empty_state, make_state)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def two_rank(url: str, out: Path) -> None:
    torch.set_num_threads(1)
    pe.distributed.init()
    rank = pe.distributed.rank()
    model = pe.distributed.FullyShard().wrap(make_model())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(rank)
    for _ in range(TRAINED_STEPS):
        x = torch.randn(8, 8, generator=data)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x[:, :1]).backward()
        opt.step()
    with pe.Checkpointer(url) as ckpt:  # every rank uploads its part; rank 0 holds the lease
        ckpt.save(TRAINED_STEPS, {"model": model, "optimizer": opt}).wait()
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}  # a collective: every rank calls it
    if rank == 0:
        torch.save(full, out / "expected.pt")
    pe.distributed.barrier()
    pe.distributed.destroy()


if __name__ == "__main__":
    if sys.argv[1] == "two-rank":
        two_rank(sys.argv[2], Path(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
