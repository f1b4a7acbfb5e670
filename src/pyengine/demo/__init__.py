"""`pyengine demo`: every pattern of the book's training chapter (Machine Learning Design
Patterns, ch. 4: Useful Overfitting, Checkpoints, Transfer Learning, Distribution Strategy,
Hyperparameter Tuning), with measured numbers, on embedded data (nothing is downloaded)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pyengine.demo import (
    crash_resume,
    distribution,
    early_stopping,
    overfitting,
    transfer,
    tuning,
    virtual_epochs,
)
from pyengine.demo.report import write_report
from pyengine.demo.section import Section


def run_demo(out: Path, quick: bool = False) -> tuple[Path, list[Section]]:
    """Runs every section, writes out/report.md and plots; returns the report path and sections."""
    out = out.resolve()  # child processes run in other directories
    out.mkdir(parents=True, exist_ok=True)
    work = out / "runs"
    # The demo's models are small: one intra-op thread is fastest for them, and it keeps the
    # crash-and-resume section's child processes doing the same arithmetic as this one.
    torch.set_num_threads(1)
    started = time.perf_counter()
    steps = [
        ("Useful overfitting", lambda: overfitting.run(quick)),
        ("Checkpoints and virtual epochs", lambda: virtual_epochs.run(work / "virtual_epochs", quick)),
        ("Crash and exact resume", lambda: crash_resume.run(work / "crash_resume", quick)),
        ("Early stopping", lambda: early_stopping.run(work / "early_stopping", quick)),
        ("Transfer learning", lambda: transfer.run(work / "transfer", quick)),
        ("Distribution strategy", lambda: distribution.run(work / "distribution", quick)),
        ("Hyperparameter tuning", lambda: tuning.run(work / "tuning", quick)),
    ]
    sections = []
    for title, run in steps:
        print(f"== {title} ==", flush=True)
        t0 = time.perf_counter()
        section = run()
        section.seconds = time.perf_counter() - t0
        print(f"  ({section.seconds:.1f} s)\n", flush=True)
        sections.append(section)
    return write_report(out, sections, time.perf_counter() - started), sections


def unused_directory(base: Path) -> Path:
    """base, or base-2, base-3, ... : the first that does not exist or is empty."""
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
