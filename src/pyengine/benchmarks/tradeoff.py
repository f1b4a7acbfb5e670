"""From the frequency study's measurements to the trade-off: overhead against interval, expected
work lost per failure, total expected waste, the Young/Daly optimum and OverheadBudget's choice.

Model (reference notes, section 6): with interval T = k * step, a failure loses on average
T/2 of work plus the persist latency (the newest durable checkpoint is older than the newest
started one) plus the restart time R. With failures every M seconds on average, the expected
waste as a fraction of training time is overhead(k) + (T/2 + persist + R) / M. The cost C of
one checkpoint in Young/Daly is the training time it takes (its stall and its interference),
measured here as the extra time of the checkpointed blocks per save.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from pyengine.benchmarks.frequency import BUDGET, overlap_vs_dcp
from pyengine.benchmarks.savers import CONTROL
from pyengine.checkpoint.policies import daly_interval, young_interval

CSV_FIELDS = ["model", "method", "interval", "steps_measured", "saves", "overhead_pct", "overhead_pct_min_round",
              "overhead_pct_max_round", "overhead_pct_round_mean", "overhead_pct_ci95", "stall_ms", "persist_ms",
              "lost_per_failure_s", "expected_waste_pct"]

# Student's t, two-sided 95%, by degrees of freedom (1..30); 1.96 beyond.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95% confidence interval (t distribution; nan for one value).

    Rounds are the independent samples: within a round, cycles share the machine's state.
    """
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    t = _T95[len(values) - 2] if len(values) - 1 <= len(_T95) else 1.96
    return mean, t * statistics.stdev(values) / len(values) ** 0.5


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    """Adds `rows` (one per method and interval) and `methods` (cost and Young/Daly) to each model."""
    cfg = results["config"]
    for model in results["models"].values():
        step = statistics.median(s["baseline_seconds"] / s["steps"] for run in model["runs"] for s in run["rounds"]
                                 if s["steps"])
        model["baseline_step_seconds"] = step
        model["rows"] = [_row(run, step, cfg) for run in model["runs"]]
        model["methods"] = {}
        for method in dict.fromkeys(r["method"] for r in model["runs"] if r["interval"] != BUDGET
                                    and r["method"] != CONTROL):
            model["methods"][method] = _optimum(model, method, step, cfg)
    return results


def _ratio(seconds: float, baseline: float) -> float:
    return seconds / baseline - 1 if baseline > 0 else float("nan")


def _row(run: dict[str, Any], step: float, cfg: dict[str, Any]) -> dict[str, Any]:
    rounds = run["rounds"]
    per_round = [_ratio(s["seconds"], s["baseline_seconds"]) for s in rounds]
    stalls = [x for s in rounds for x in s["stalls"]]
    persists = [x for s in rounds for x in s["persists"]]
    persist = statistics.median(persists) if persists else 0.0
    interval = rounds[-1].get("interval") if run["interval"] == BUDGET else run["interval"]
    overhead = _ratio(sum(s["seconds"] for s in rounds), sum(s["baseline_seconds"] for s in rounds))
    round_mean, ci95 = mean_ci95(per_round)
    row = {"method": run["method"], "interval": run["interval"], "chosen_interval": interval,
           "steps": sum(s["steps"] for s in rounds), "saves": sum(s["saves"] for s in rounds),
           "overhead": overhead, "overhead_min": min(per_round), "overhead_max": max(per_round),
           "overhead_round_mean": round_mean, "overhead_ci95": ci95,
           "stall_s": statistics.median(stalls) if stalls else 0.0, "persist_s": persist}
    if interval and run["method"] != CONTROL:
        lost = interval * step / 2 + persist + cfg["restart_seconds"]
        row.update(lost_per_failure_s=lost, expected_waste=max(overhead, 0.0) + lost / cfg["mtbf_seconds"])
    return row


def _optimum(model: dict[str, Any], method: str, step: float, cfg: dict[str, Any]) -> dict[str, Any]:
    """Pools the extra seconds per save over the intervals whose saves do not queue (k * step >=
    persist), at least the median stall, then applies Young and Daly to that cost."""
    rows = [r for r in model["rows"] if r["method"] == method]
    persist = statistics.median(r["persist_s"] for r in rows)
    runs = [r for r in model["runs"] if r["method"] == method]
    eligible = [r for r in runs if r["interval"] * step >= persist] or runs
    extra = sum(s["seconds"] - s["baseline_seconds"] for r in eligible for s in r["rounds"])
    saves = sum(s["saves"] for r in eligible for s in r["rounds"])
    stall = statistics.median(r["stall_s"] for r in rows)
    cost = max(extra / saves if saves else 0.0, stall)  # noise can hide the cost, never below the stall
    mtbf = cfg["mtbf_seconds"]
    daly = max(daly_interval(cost, mtbf), persist)
    return {"cost_s": cost, "persist_s": persist, "young_s": young_interval(cost, mtbf), "daly_s": daly,
            "daly_steps": daly / step,
            "daly_expected_waste": expected_waste(cost, daly, persist, mtbf, cfg["restart_seconds"])}


def expected_waste(cost: float, interval_s: float, persist: float, mtbf: float, restart: float) -> float:
    """The model's waste fraction at an interval: C/T + (T/2 + persist + R)/M."""
    return cost / interval_s + (interval_s / 2 + persist + restart) / mtbf


def table(results: dict[str, Any]) -> str:
    cfg = results["config"]
    out = []
    for name, m in results["models"].items():
        out.append(f"model {name}: {m['params'] / 1e6:.1f}M params + Adam = {m['bytes'] / 1e6:.0f} MB, "
                   f"{m['baseline_step_seconds'] * 1e3:.1f} ms a step without checkpoints; "
                   f"{cfg.get('torch_threads', 1)} torch thread(s); assumed MTBF {cfg['mtbf_seconds']:g} s, "
                   f"restart {cfg['restart_seconds']:g} s; {cfg['repeats']} round(s)")
        out.append(f"  {'method':<32}{'every':>6}{'overhead % [round min, max]':>32}{'round mean ± 95% CI':>22}"
                   f"{'stall ms':>10}{'persist ms':>12}{'lost/fail s':>13}{'exp. waste %':>14}")
        for r in m["rows"]:
            every = f"{r['chosen_interval']}*" if r["interval"] == BUDGET else str(r["interval"])
            every = "A/A" if r["method"] == CONTROL else every
            spread = f"{r['overhead'] * 100:7.2f} [{r['overhead_min'] * 100:6.2f}, {r['overhead_max'] * 100:6.2f}]"
            waste = f"{r['expected_waste'] * 100:14.2f}" if "expected_waste" in r else f"{'-':>14}"
            lost = f"{r['lost_per_failure_s']:13.2f}" if "lost_per_failure_s" in r else f"{'-':>13}"
            ci = (f"{r['overhead_round_mean'] * 100:7.2f} ± {r['overhead_ci95'] * 100:.2f}"
                  if r["overhead_ci95"] == r["overhead_ci95"] else "-")  # nan with one round
            out.append(f"  {r['method']:<32}{every:>6}{spread:>32}{ci:>22}{r['stall_s'] * 1e3:10.1f}"
                       f"{r['persist_s'] * 1e3:12.1f}{lost}{waste}")
        for method, o in m["methods"].items():
            out.append(f"  Young/Daly for {method:<17} cost per save {o['cost_s'] * 1e3:7.1f} ms -> every "
                       f"{o['daly_s']:6.2f} s = {o['daly_steps']:7.1f} steps (Young {o['young_s']:.2f} s), "
                       f"model waste {o['daly_expected_waste'] * 100:.2f}%")
        out.extend(f"  {line}" for line in overlap_vs_dcp(m))
        if any(r["method"] == CONTROL for r in m["rows"]):
            out.append("  A/A: cycles that save nothing, measured like the others: the noise of this measurement")
        if any(r["interval"] == BUDGET for r in m["rows"]):
            out.append("  * the interval OverheadBudget had chosen by the end of the run (it adapts online)")
        out.append("")
    return "\n".join(out)


def write_csv(results: dict[str, Any], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for name, m in results["models"].items():
            for r in m["rows"]:
                writer.writerow({
                    "model": name, "method": r["method"], "interval": r["chosen_interval"],
                    "steps_measured": r["steps"], "saves": r["saves"],
                    "overhead_pct": round(r["overhead"] * 100, 3),
                    "overhead_pct_min_round": round(r["overhead_min"] * 100, 3),
                    "overhead_pct_max_round": round(r["overhead_max"] * 100, 3),
                    "overhead_pct_round_mean": round(r["overhead_round_mean"] * 100, 3),
                    "overhead_pct_ci95": round(r["overhead_ci95"] * 100, 3),
                    "stall_ms": round(r["stall_s"] * 1e3, 3), "persist_ms": round(r["persist_s"] * 1e3, 3),
                    "lost_per_failure_s": round(r.get("lost_per_failure_s", float("nan")), 4),
                    "expected_waste_pct": round(r.get("expected_waste", float("nan")) * 100, 3),
                })
