"""The benchmark suite behind `pyengine bench`: runs its parts, prints their tables and writes
every result into one folder.

Parts: `checkpoint` (bench/bench_checkpoint.py), `loader` (bench/bench_loader.py), `tuning`
(bench/bench_tuning.py) and `checkpoint-frequency` (pyengine.benchmarks.frequency). The
frequency study ships with the package; the other parts are scripts of the source repository,
run each in its own process (they set process-wide state: torch threads, process groups) with
their own command-line options, their output kept as <part>.txt (and <part>.json where the
script writes one). A part whose script is missing is reported as not available.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pyengine
from pyengine.benchmarks.frequency import QUICK, FrequencyConfig, run_study
from pyengine.benchmarks.plots import matplotlib_missing, plot_frequency
from pyengine.benchmarks.tradeoff import analyse, table, write_csv

PARTS = ("checkpoint", "loader", "checkpoint-frequency", "tuning")
# Each script's own options for a short run (bench_tuning.py has no --quick: one problem, two seeds).
QUICK_ARGS = {"loader": ["--quick"],
              "tuning": ["--problems", "branin", "--methods", "random,pyengine-bayes", "--seeds", "2", "--evals", "25"]}


@dataclass
class PartResult:
    """One part's outcome: status is "ok", "failed" or "not available"; files are in the output folder."""

    name: str
    status: str
    seconds: float = 0.0
    table: str = ""
    files: list[str] = field(default_factory=list)
    note: str = ""


def find_bench_dir(explicit: Path | None = None) -> Path | None:
    """The repository's bench/ folder: `explicit`, else the one beside an editable or source-tree
    pyengine package; None for an installed wheel, which has no bench/."""
    # pyengine.__file__ is <checkout>/src/pyengine/__init__.py in an editable install.
    candidates = [explicit] if explicit else [Path(pyengine.__file__).resolve().parents[2] / "bench"]
    for c in candidates:
        if c is not None and (c / "bench_checkpoint.py").is_file():
            return c.resolve()
    return None


def script_part(name: str, script: str, args: list[str], bench_dir: Path | None, outdir: Path,
                timeout_s: float, log: Callable[[str], None] = print) -> PartResult:
    """Runs bench/<script> with `args` in its own process; keeps its stdout as <name>.txt."""
    if bench_dir is None:
        return PartResult(name, "not available", note=f"bench/{script} lives in the source repository; run "
                                                      "`pyengine bench` from a checkout or pass --bench-dir")
    path = bench_dir / script
    if not path.is_file():
        return PartResult(name, "not available", note=f"not available yet: {path} does not exist")
    log(f"[{name}] {sys.executable} {path} {' '.join(args)}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(path), *args], cwd=bench_dir.parent, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return PartResult(name, "failed", time.perf_counter() - t0, note=f"timed out after {timeout_s:.0f} s")
    seconds = time.perf_counter() - t0
    (outdir / f"{name}.txt").write_text(proc.stdout)
    files = [f"{name}.txt"] + [p.name for p in outdir.glob(f"{name}.json")]
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return PartResult(name, "failed", seconds, proc.stdout, files, f"exit status {proc.returncode}:\n{tail}")
    return PartResult(name, "ok", seconds, proc.stdout.rstrip(), files)


def frequency_part(config: FrequencyConfig, outdir: Path, workdir: Path,
                   log: Callable[[str], None] = print) -> PartResult:
    """Runs the checkpoint-frequency study; writes frequency.json/.csv/.txt and the PNG plots."""
    t0 = time.perf_counter()
    results = analyse(run_study(config, workdir, log))
    text = table(results)
    (outdir / "frequency.json").write_text(json.dumps(results, indent=1))
    write_csv(results, outdir / "frequency.csv")
    (outdir / "frequency.txt").write_text(text)
    files = ["frequency.json", "frequency.csv", "frequency.txt"]
    note = matplotlib_missing()
    if note is None:
        files += [p.name for p in plot_frequency(results, outdir)]
    return PartResult("checkpoint-frequency", "ok", time.perf_counter() - t0, text, files, note or "")


def run_suite(parts: tuple[str, ...], quick: bool, outdir: Path, workdir: Path, bench_dir: Path | None,
              frequency: FrequencyConfig | None = None, log: Callable[[str], None] = print) -> list[PartResult]:
    """Runs `parts` in order, writing into `outdir` (checkpoints and data go to `workdir`).

    A part that fails is reported and the next one still runs; summary.txt and results.json
    list every part's status.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    timeout = 600.0 if quick else 3 * 3600.0
    results = []
    for part in parts:
        if part == "checkpoint":
            args = ["--params-millions", "8", "--repeats", "1"] if quick else []
            r = script_part(part, "bench_checkpoint.py", [*args, "--dir", str(workdir), "--json",
                                                          str(outdir / "checkpoint.json")],
                            bench_dir, outdir, timeout, log)
        elif part in ("loader", "tuning"):
            args = QUICK_ARGS[part] if quick else []
            r = script_part(part, f"bench_{part}.py", args, bench_dir, outdir, timeout, log)
        elif part == "checkpoint-frequency":
            r = frequency_part(frequency or (QUICK if quick else FrequencyConfig()), outdir, workdir, log)
        else:
            raise ValueError(f"unknown part {part!r}; choose from {PARTS}")
        log(_section(r))
        results.append(r)
    summary = "\n\n".join(_section(r) for r in results)
    (outdir / "summary.txt").write_text(summary + "\n")
    (outdir / "results.json").write_text(json.dumps({"quick": quick, "parts": [asdict(r) for r in results]},
                                                    indent=1))
    return results


def _section(r: PartResult) -> str:
    head = f"== {r.name}: {r.status}" + (f" ({r.seconds:.0f} s)" if r.seconds else "")
    return "\n".join(x for x in (head, r.table, r.note) if x)
