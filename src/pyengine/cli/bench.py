"""`pyengine bench [PART ...] [--quick]`: the benchmark suite (checkpoint engine, loader,
checkpoint frequency, tuning), tables on stdout, JSON/CSV and PNG plots in one folder."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import tempfile
from pathlib import Path

from pyengine.benchmarks.frequency import QUICK, FrequencyConfig
from pyengine.benchmarks.savers import METHODS
from pyengine.benchmarks.suite import PARTS, find_bench_dir, run_suite
from pyengine.benchmarks.workload import MODEL_SIZES


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", help="run the benchmark suite; tables, JSON/CSV and PNG plots",
                            description=__doc__)
    p.add_argument("parts", nargs="*", metavar="PART", help=f"parts to run, from {', '.join(PARTS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="a short run of every part (about two minutes)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: ./pyengine-bench-<UTC time>)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where checkpoints are written (default: a temporary folder; choose the disk to measure)")
    p.add_argument("--bench-dir", type=Path, default=None, help="the repository's bench/ folder (default: found "
                                                                "beside a source checkout of pyengine)")
    f = p.add_argument_group("checkpoint-frequency options (defaults: the full study, or --quick's)")
    f.add_argument("--models", nargs="+", choices=sorted(MODEL_SIZES), default=None)
    f.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    f.add_argument("--intervals", nargs="+", type=int, default=None, help="checkpoint every k steps, for each k")
    f.add_argument("--repeats", type=int, default=None, help="rounds of every configuration")
    f.add_argument("--block-seconds", type=float, default=None, help="length of one measured block")
    f.add_argument("--budget", type=float, default=None, help="OverheadBudget fraction to run (default 0.01)")
    f.add_argument("--no-budget", action="store_true", help="do not run OverheadBudget (a large model's blocks "
                                                             "are long, and the budget run lasts three of them)")
    f.add_argument("--mtbf", type=float, default=None, help="assumed MTBF in seconds, for expected waste")
    f.add_argument("--restart", type=float, default=None, help="assumed restart time in seconds")
    f.add_argument("--torch-threads", type=int, default=None, help="threads of the training step (default 1)")
    p.set_defaults(run=run)


def frequency_config(args: argparse.Namespace) -> FrequencyConfig:
    """The study's configuration: --quick's or the full one, with the options given on top."""
    base = QUICK if args.quick else FrequencyConfig()
    overrides = {name: value for name, value in (
        ("models", args.models), ("methods", args.methods), ("intervals", args.intervals),
        ("repeats", args.repeats), ("block_seconds", args.block_seconds), ("budget", args.budget),
        ("mtbf_seconds", args.mtbf), ("restart_seconds", args.restart),
        ("torch_threads", args.torch_threads)) if value is not None}
    if args.no_budget:
        if args.budget is not None:
            raise ValueError("give --budget or --no-budget, not both")
        overrides["budget"] = None
    return dataclasses.replace(base, **overrides)


def run(args: argparse.Namespace) -> int:
    aliases = {"frequency": "checkpoint-frequency"}
    parts = tuple(dict.fromkeys(aliases.get(p, p) for p in args.parts)) or PARTS
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"pyengine bench: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
        return 2
    try:
        config = frequency_config(args)
    except (TypeError, ValueError) as e:
        print(f"pyengine bench: {e}")
        return 2
    if args.bench_dir is not None and find_bench_dir(args.bench_dir) is None:
        print(f"pyengine bench: {args.bench_dir} is not pyengine's bench/ folder (no bench_checkpoint.py there)")
        return 2
    out = args.out or Path(f"pyengine-bench-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}")
    if out.exists() and any(out.iterdir()):
        print(f"pyengine bench: {out} is not empty; give a new or empty folder with --out")
        return 2
    print(f"pyengine bench{' --quick' if args.quick else ''}: {', '.join(parts)}; results in {out.resolve()}\n")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = run_suite(parts, args.quick, out, Path(tmp), find_bench_dir(args.bench_dir), config)
    print(f"\nresults in {out.resolve()}: " + ", ".join(f"{r.name} {r.status}" for r in results))
    return 0 if all(r.status != "failed" for r in results) else 1
