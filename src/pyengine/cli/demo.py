"""`pyengine demo`: each training pattern with measured numbers, a markdown report and plots."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help="every pattern on embedded data: a report with numbers and plots")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the report (default: ./pyengine-demo, or -2, -3, ... if that is not empty)",
    )
    p.add_argument("--quick", action="store_true", help="smaller problems, fewer steps and trials (what the tests run)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so `pyengine inspect` does not pay for the demo's imports.
    from pyengine.demo import run_demo, unused_directory

    out = args.out if args.out is not None else unused_directory(Path("pyengine-demo"))
    if out.exists() and any(out.iterdir()):
        print(f"pyengine demo: {out} is not empty; give an empty or new folder")
        return 2
    print(f"pyengine demo: the report goes to {out.resolve()}\n")
    report, sections = run_demo(out, quick=args.quick)
    failed = [s.title for s in sections if not s.ok]
    print(f"report: {report.resolve()}")
    if failed:
        print(f"these checks did not hold: {', '.join(failed)}")
        return 1
    return 0
