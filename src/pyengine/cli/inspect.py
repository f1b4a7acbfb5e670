"""`pyengine inspect DIR`: list checkpoints with step, size and time, verify every
checksum, and say which one restore() would use. DIR may be s3://bucket/prefix (credentials
from the environment or the AWS config, as for boto3; the server from --endpoint-url or
AWS_ENDPOINT_URL_S3)."""

from __future__ import annotations

import argparse
import datetime as dt

from pyengine.checkpoint.inspection import inspect_directory, restore_candidate
from pyengine.checkpoint.object_storage import is_object_url


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("inspect", help="list and verify the checkpoints in a directory")
    p.add_argument("directory", help="a Checkpointer directory, or s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None,
                   help="for s3:// only: an S3-compatible server, e.g. http://127.0.0.1:8333")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = None
    if args.endpoint_url is not None:
        if not is_object_url(args.directory):
            print("pyengine inspect: --endpoint-url applies to s3:// URLs only")
            return 2
        options = {"endpoint_url": args.endpoint_url}
    try:
        infos = inspect_directory(args.directory, storage_options=options)
    except (FileNotFoundError, PermissionError, ConnectionError, ImportError) as e:
        print(f"pyengine inspect: {e}")
        return 2
    if not infos:
        print(f"{args.directory}: no committed checkpoints")
        return 1
    print(f"{'step':>10}  {'size':>10}  {'tensors':>7}  {'saved (UTC)':<19}  status")
    for i in infos:
        when = dt.datetime.fromtimestamp(i.created_unix, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        status = "ok" if i.ok else f"CORRUPT: {i.error}"
        print(f"{i.step:>10}  {_size(i.bytes):>10}  {i.tensors:>7}  {when:<19}  {status}")
    chosen = restore_candidate(infos)
    if chosen is None:
        print("restore would fail: no checkpoint verifies")
        return 1
    print(f"restore would use step {chosen.step} ({chosen.path})")
    return 0 if all(i.ok for i in infos) else 1


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
