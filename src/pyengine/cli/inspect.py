"""`pyengine inspect DIR`: list checkpoints with step, size and time, verify every
checksum, and say which one restore() would use."""

from __future__ import annotations

import argparse
import datetime as dt

from pyengine.checkpoint.inspection import inspect_directory, restore_candidate


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("inspect", help="list and verify the checkpoints in a directory")
    p.add_argument("directory", help="a Checkpointer directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        infos = inspect_directory(args.directory)
    except FileNotFoundError as e:
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
