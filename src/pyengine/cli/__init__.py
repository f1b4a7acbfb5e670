"""The `pyengine` command: `pyengine demo`, `pyengine inspect DIR`, `pyengine bench`."""

from __future__ import annotations

import argparse
import sys

from pyengine.cli import bench, demo, inspect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyengine", description="pyengine: a PyTorch training engine.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(commands)
    inspect.add_parser(commands)
    bench.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
