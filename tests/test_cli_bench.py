"""`pyengine bench`: parts run, fail or are missing without stopping the others; the frequency
study writes its table, CSV, JSON and plots (or says why plots are skipped); the trade-off
analysis computes overhead, cost per save and Young/Daly from given measurements; bad options
are refused. Nothing here asserts a timing: the study runs a few steps only to check its output."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest

from pyengine.benchmarks.frequency import BUDGET, FrequencyConfig
from pyengine.benchmarks.suite import find_bench_dir, script_part
from pyengine.benchmarks.tradeoff import analyse, mean_ci95, table
from pyengine.checkpoint import daly_interval
from pyengine.cli import main


def fake_bench_dir(tmp_path: Path, loader_exit: int = 0) -> Path:
    """A bench/ folder whose checkpoint and loader scripts print a line (the loader may fail); no tuning."""
    bench = tmp_path / "repo" / "bench"
    bench.mkdir(parents=True)
    (bench / "bench_checkpoint.py").write_text("import sys\nprint('checkpoint table', sys.argv[1:])\n")
    (bench / "bench_loader.py").write_text(
        f"import sys\nprint('loader table', sys.argv[1:])\nprint('boom', file=sys.stderr)\nsys.exit({loader_exit})\n")
    return bench


def test_script_parts_run_in_their_own_process_and_a_missing_one_is_not_available(tmp_path, capsys) -> None:
    bench, out = fake_bench_dir(tmp_path), tmp_path / "out"
    code = main(["bench", "checkpoint", "loader", "tuning", "--quick", "--bench-dir", str(bench), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "checkpoint table" in printed and "'--quick'" in printed
    assert "not available yet" in printed and "bench_tuning.py" in printed
    status = {p["name"]: p["status"] for p in json.loads((out / "results.json").read_text())["parts"]}
    assert status == {"checkpoint": "ok", "loader": "ok", "tuning": "not available"}
    assert "--params-millions" in (out / "checkpoint.txt").read_text()
    assert "== tuning: not available" in (out / "summary.txt").read_text()


def test_a_failing_part_is_reported_and_the_next_part_still_runs(tmp_path, capsys) -> None:
    bench, out = fake_bench_dir(tmp_path, loader_exit=3), tmp_path / "out"
    assert main(["bench", "loader", "checkpoint", "--bench-dir", str(bench), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "== loader: failed" in printed and "exit status 3" in printed and "boom" in printed
    assert "== checkpoint: ok" in printed


def test_without_a_source_checkout_script_parts_say_where_they_live(tmp_path) -> None:
    r = script_part("loader", "bench_loader.py", [], None, tmp_path, 10.0, log=lambda _: None)
    assert r.status == "not available" and "source repository" in r.note
    assert find_bench_dir(tmp_path) is None


def run_tiny_study(out: Path, *extra: str) -> int:
    return main(["bench", "checkpoint-frequency", "--out", str(out), "--models", "3M", "--methods", "none", "pe",
                 "pe-overlap", "torch.save", "--intervals", "1", "2", "--repeats", "1", "--block-seconds", "0.01",
                 *extra])


def test_frequency_part_writes_table_csv_json_and_plots(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert run_tiny_study(out) == 0
    printed = capsys.readouterr().out
    assert "Young/Daly for pe" in printed and "pe-overlap+OverheadBudget(0.01)" in printed
    assert "A/A" in printed and "Young/Daly for none" not in printed
    rows = list(csv.DictReader((out / "frequency.csv").open()))
    assert {(r["method"], r["interval"]) for r in rows} >= {("pe", "1"), ("pe", "2"), ("pe-overlap", "2"),
                                                            ("torch.save", "1")}
    results = json.loads((out / "frequency.json").read_text())
    runs = results["models"]["3M"]["runs"]
    assert all(len(r["rounds"]) == 1 for r in runs)
    assert next(r for r in runs if (r["method"], r["interval"]) == ("pe", 2))["rounds"][0]["saves"] >= 1
    for png in ("frequency_overhead.png", "frequency_waste.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_skipped_with_a_message_without_matplotlib(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "out"
    assert run_tiny_study(out, "--methods", "pe") == 0
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().out
    assert (out / "frequency.csv").exists() and not list(out.glob("*.png"))


def test_no_budget_leaves_out_the_overhead_budget_run(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert run_tiny_study(out, "--methods", "pe", "--no-budget") == 0
    assert "OverheadBudget" not in capsys.readouterr().out
    runs = json.loads((out / "frequency.json").read_text())["models"]["3M"]["runs"]
    assert {r["method"] for r in runs} == {"pe"}


@pytest.mark.parametrize(("args", "message"), [
    (["nonsense"], "unknown part"),
    (["--budget", "0.02", "--no-budget"], "not both"),
    (["--intervals", "0"], "intervals must be integers >= 1"),
    (["--repeats", "0"], "repeats must be an integer >= 1"),
    (["--budget", "5"], "budget must be a fraction"),
    (["--mtbf", "-1"], "mtbf_seconds must be > 0"),
])
def test_bad_options_are_refused(tmp_path, capsys, args: list[str], message: str) -> None:
    assert main(["bench", *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_a_non_empty_results_folder_or_a_wrong_bench_dir_is_refused(tmp_path, capsys) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["bench", "tuning", "--out", str(tmp_path / "full")]) == 2
    assert main(["bench", "tuning", "--bench-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    printed = capsys.readouterr().out
    assert "not empty" in printed and "not pyengine's bench/ folder" in printed
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_the_study_config_refuses_unknown_models_and_methods() -> None:
    with pytest.raises(ValueError, match="unknown or no models"):
        FrequencyConfig(models=("7B",))
    with pytest.raises(ValueError, match="unknown or no methods"):
        FrequencyConfig(methods=())


def synthetic_results() -> dict:
    # 10 ms steps; pe saves cost 2 ms each and take 15 ms to persist; 100 steps measured.
    def rounds(k: int, cost: float, persist: float) -> list[dict]:
        saves = 100 // k
        return [{"seconds": 100 * 0.010 + saves * cost, "baseline_seconds": 100 * 0.010, "steps": 100,
                 "saves": saves, "stalls": [cost] * saves, "persists": [persist] * saves}]

    runs = [{"method": "pe", "interval": k, "rounds": rounds(k, 0.002, 0.015)} for k in (1, 2, 5, 10)]
    runs[0]["rounds"][0]["seconds"] += 100 * 0.005  # k = 1 queues saves: 5 ms more each
    budget = rounds(20, 0.002, 0.015)
    budget[0]["interval"] = 20
    runs.append({"method": "pe-overlap+OverheadBudget(0.01)", "interval": BUDGET, "rounds": budget})
    runs.append({"method": "none", "interval": 1, "rounds": rounds(1, 0.0, 0.0)})
    cfg = {"mtbf_seconds": 60.0, "restart_seconds": 1.0, "repeats": 1}
    return {"config": cfg, "models": {"3M": {"params": 3e6, "bytes": 3.6e7, "step_seconds": 0.01, "runs": runs}}}


def test_tradeoff_analysis_from_known_measurements() -> None:
    results = analyse(synthetic_results())
    model = results["models"]["3M"]
    by_k = {r["interval"]: r for r in model["rows"] if r["method"] != "none"}
    assert by_k[10]["overhead"] == pytest.approx(0.002 / (10 * 0.010))  # 2%
    assert by_k[10]["lost_per_failure_s"] == pytest.approx(10 * 0.010 / 2 + 0.015 + 1.0)
    assert by_k[10]["expected_waste"] == pytest.approx(0.02 + (0.05 + 0.015 + 1.0) / 60.0)
    assert by_k[BUDGET]["chosen_interval"] == 20 and by_k[BUDGET]["overhead"] == pytest.approx(0.01)
    pe = model["methods"]["pe"]
    assert pe["cost_s"] == pytest.approx(0.002)  # pooled over k >= 2 (k = 1 queues: 10 ms < 15 ms persist)
    assert "none" not in model["methods"] and by_k[1]["overhead"] == pytest.approx(0.7)
    assert pe["daly_s"] == pytest.approx(daly_interval(0.002, 60.0))
    assert pe["daly_steps"] == pytest.approx(daly_interval(0.002, 60.0) / 0.010)
    text = table(results)
    assert "20*" in text and "Young/Daly for pe" in text and "A/A" in text
    one_round_ci = by_k[10]["overhead_ci95"]
    assert by_k[10]["overhead_round_mean"] == pytest.approx(0.02) and one_round_ci != one_round_ci  # nan


def test_the_confidence_interval_of_the_round_mean() -> None:
    mean, half = mean_ci95([0.01, 0.03, 0.02, 0.04])  # mean 2.5%, sd 1.29%, t(3) = 3.182
    assert mean == pytest.approx(0.025)
    assert half == pytest.approx(3.182 * statistics.stdev([0.01, 0.03, 0.02, 0.04]) / 2)
    assert mean_ci95([0.02] * 50) == (pytest.approx(0.02), 0.0)
