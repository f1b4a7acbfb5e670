"""`pyengine demo --quick` runs end to end; its report has the seven sections, and the
numbers the new sections print are real: parsed back from the report and checked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SECTIONS = ("Useful overfitting", "Checkpoints and virtual epochs", "Crash and exact resume", "Early stopping",
            "Transfer learning", "Distribution strategy", "Hyperparameter tuning")
FIGURES = ("overfit_batch.png", "heat_equation.png", "virtual_epochs.png", "early_stopping.png", "transfer.png",
           "distribution_loss.png", "distribution_bytes.png", "input_stall.png", "tuning_grid_explosion.png",
           "tuning_best_per_trial.png", "tuning_asha.png")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One quick run for every test here (about a minute on 2 cores)."""
    cwd = tmp_path_factory.mktemp("demo")
    # From a directory other than the checkout, and with a relative --out, as `pyengine demo`
    # uses by default (./pyengine-demo).
    result = subprocess.run([sys.executable, "-m", "pyengine", "demo", "--quick", "--out", "demo"],
                            capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return cwd / "demo"


def _section(demo: Path, title: str) -> str:
    report = (demo / "report.md").read_text()
    return report.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table(text: str, first_header: str) -> dict[str, list[str]]:
    """The markdown table whose header row starts with `first_header`: first cell -> the other cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _kb(cell: str) -> float:
    return float(cell.replace(",", "").removesuffix(" KB"))


def test_the_report_has_the_seven_sections_in_order_and_every_figure(demo: Path) -> None:
    report = (demo / "report.md").read_text()
    assert re.findall(r"^## (.+)$", report, flags=re.M) == list(SECTIONS)
    assert "did not hold" not in report
    for png in FIGURES:
        assert (demo / png).stat().st_size > 1000
        assert f"![{png}]({png})" in report
    assert sorted(p.name for p in demo.glob("*.png")) == sorted(FIGURES)


def test_crash_and_resume_is_exact(demo: Path) -> None:
    assert "bit for bit, those of a run never interrupted: True" in _section(demo, "Crash and exact resume")


def test_transfer_beats_training_from_scratch_on_a_small_target_set(demo: Path) -> None:
    rows = _table(_section(demo, "Transfer learning"), "labelled target examples")
    scratch, transfer = (float(x) for x in rows["64"][:2])
    assert transfer > scratch + 0.05, rows


def test_model_and_data_parallelism_end_with_the_single_process_weights(demo: Path) -> None:
    rows = _table(_section(demo, "Distribution strategy"), "")
    assert set(rows) == {"data parallel (DDP)", "tensor parallel", "pipeline parallel (GPipe)"}
    for name, cells in rows.items():
        assert 0 <= float(cells[-1]) < 1e-5, (name, cells)
    tensor_held = [int(n.replace(",", "")) for n in rows["tensor parallel"][0].split(" / ")]
    ddp_held = [int(n.replace(",", "")) for n in rows["data parallel (DDP)"][0].split(" / ")]
    assert max(tensor_held) < ddp_held[0], "tensor parallelism splits the weights over the ranks"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bytes are read from Linux's TCP counters")
def test_bytes_communicated_follow_each_strategy(demo: Path) -> None:
    rows = _table(_section(demo, "Distribution strategy"), "strategy")
    per_step = {name: _kb(cells[4]) for name, cells in rows.items()}
    ddp, fsdp = per_step["DDP (synchronous)"], per_step["FSDP2 (sharded)"]
    local, hogwild = per_step["local SGD (every 8)"], per_step["Hogwild (shared memory)"]
    params = int(re.search(r"one model \(([\d,]+) parameters\)", _section(demo, "Distribution strategy"))[1]
                 .replace(",", ""))
    assert 1.0 <= ddp / (4e-3 * params) < 1.1  # a ring all-reduce of the float32 gradients, and framing
    assert 1.8 < fsdp / ddp < 2.2 and 0.1 < local / ddp < 0.15 and hogwild == 0.0
    held = {name: _kb(cells[5]) for name, cells in rows.items()}
    assert held["FSDP2 (sharded)"] == pytest.approx(held["DDP (synchronous)"] / 2, rel=0.01)


def test_the_rank_sharded_checkpoint_restores_into_a_plain_model(demo: Path) -> None:
    text = _section(demo, "Distribution strategy")
    line = next(line for line in text.splitlines() if "rank-sharded checkpoint" in line)
    assert "max abs diff from the FSDP model's global weights 0.0e+00" in line
    loss, fsdp_loss = re.search(r"val loss ([\d.]+) \(FSDP's ([\d.]+)\)", line).groups()
    assert loss == fsdp_loss and "whole-shaped: True" in line


def test_the_loader_cuts_the_input_stall(demo: Path) -> None:
    line = next(line for line in _section(demo, "Distribution strategy").splitlines() if "input bottleneck" in line)
    plain, loader = (int(s) for s in re.findall(r"(\d+)% ", line))
    assert loader < plain, line


def test_the_grid_grows_as_a_product_of_the_parameters(demo: Path) -> None:
    rows = _table(_section(demo, "Hyperparameter tuning"), "parameters")
    sizes = [int(cells[1].replace(",", "")) for cells in rows.values()]
    assert sizes[0] == 5 and all(b >= 2 * a for a, b in zip(sizes, sizes[1:])) and sizes[-1] > 10_000


def test_each_sampler_had_the_same_budget_and_bayes_tried_new_points(demo: Path) -> None:
    text = _section(demo, "Hyperparameter tuning")
    budget = int(re.search(r"(\d+) trials each", text)[1])
    rows = _table(text, "sampler")
    assert set(rows) == {"grid", "random", "Bayes (GP + LogEI)"}
    assert int(rows["grid"][3]) < int(rows["random"][3]) == int(rows["Bayes (GP + LogEI)"][3]) == budget
    assert all(0 <= int(cells[1]) < budget for cells in rows.values())


def test_pruning_stopped_trials_and_trained_fewer_epochs(demo: Path) -> None:
    line = next(line for line in _section(demo, "Hyperparameter tuning").splitlines() if line.startswith("- pruning"))
    stopped = int(re.search(r"(\d+) trials stopped at a rung", line)[1])
    trained, full = (int(n) for n in re.search(r"(\d+) of (\d+) virtual epochs trained", line).groups())
    assert stopped > 0 and trained < full
    assert "(0 epochs trained twice)" in line  # a promoted trial resumes after its last epoch


def test_the_killed_study_kept_its_trials_and_continued(demo: Path) -> None:
    line = next(line for line in _section(demo, "Hyperparameter tuning").splitlines() if "SIGKILLed" in line)
    killed = int(re.search(r"SIGKILLed in trial (\d+)", line)[1])
    kept = re.search(r"trials ([\d, -]+) COMPLETE with their values kept: True", line)
    assert kept and kept[1] in (f"0-{killed - 1}", ", ".join(map(str, range(killed))))
    assert f"trial {killed} RUNNING" in line
    resumed = int(re.search(r"newest committed checkpoint, epoch (\d+)", line)[1])
    assert resumed >= 1, "the re-queued trial resumed from its checkpoint, not from scratch"
    new = re.search(r"then ran new trials ([\d, -]+);", line)[1]
    assert new.startswith(str(killed + 1))
    done, total = (int(n) for n in re.search(r"(\d+) of (\d+) trials complete", line).groups())
    assert done == total
