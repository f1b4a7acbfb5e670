"""Checkpoint frequency policies: decisions on a fake clock, OverheadBudget's convergence to an
interval that respects its budget, the Young/Daly formula against Daly's published values, and
Checkpointer.maybe_save with real saves. No timing is asserted: every clock here is simulated."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import pyengine as pe
from pyengine.checkpoint import Every, OverheadBudget, PolicyFeed, SavePolicy, YoungDaly, daly_interval, young_interval


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class FakeHandle:
    """A save that becomes durable `persist` seconds after it starts, on the fake clock."""

    def __init__(self, clock: FakeClock, stall: float, persist: float) -> None:
        self._clock, self.stall_seconds, self._persist = clock, stall, persist
        self._done_at = clock.now - stall + persist

    def done(self) -> bool:
        return self._clock.now >= self._done_at

    @property
    def stats(self) -> dict:
        return {"persist_seconds": self._persist}


def simulate(policy: SavePolicy, steps: int, step_s, stall_s, persist_s: float, interference_s: float,
             first_step: int = 1) -> tuple[list[int], float, float]:
    """A training loop on a fake clock that saves through a PolicyFeed, as maybe_save does.

    A step during which a save is still persisting takes `interference_s` longer. step_s and
    stall_s may be callables of the step (to change them mid-run). Returns the saved steps,
    the total time, and the time the same steps take without saves.
    """
    clock = FakeClock()
    feed = PolicyFeed(policy, clock=clock)
    start, clean, saved, in_flight = clock.now, 0.0, [], None
    for step in range(first_step, first_step + steps):
        base = step_s(step) if callable(step_s) else step_s
        busy = in_flight is not None and not in_flight.done()
        clock.now += base + (interference_s if busy else 0.0)
        clean += base
        if feed.due(step):
            stall = stall_s(step) if callable(stall_s) else stall_s
            clock.now += stall
            in_flight = FakeHandle(clock, stall, persist_s)
            feed.saved(step, in_flight)
            saved.append(step)
    return saved, clock.now - start, clean


# ------------------------------------------------------------------------------------ Every


def test_every_steps_saves_at_multiples_only() -> None:
    policy = Every(steps=5)
    assert [s for s in range(0, 23) if policy.should_save(s, 0.0)] == [5, 10, 15, 20]


def test_every_steps_is_aligned_after_a_resume() -> None:
    saved, _, _ = simulate(Every(steps=10), 35, 0.03, 0.001, 0.01, 0.0, first_step=47)
    assert saved == [50, 60, 70, 80]


def test_every_seconds_follows_the_clock_from_the_first_call_and_each_save() -> None:
    policy = Every(seconds=10.0)
    assert not policy.should_save(1, 100.0)  # the clock starts here
    assert not policy.should_save(2, 109.9)
    assert policy.should_save(3, 110.0)
    policy.observe_save(3, 110.5, 0.1)
    assert not policy.should_save(4, 120.0)
    assert policy.should_save(5, 120.5)


def test_every_steps_or_seconds_whichever_comes_first() -> None:
    saved, _, _ = simulate(Every(steps=100, seconds=1.0), 250, 0.3, 0.0, 0.05, 0.0)
    # 0.3 s steps; the clock starts at the first call (after step 1) and triggers 4 steps
    # (1.2 s) later; the step count triggers at 100 and 200 and restarts the clock.
    assert saved[:3] == [5, 9, 13]
    assert 100 in saved and 200 in saved
    gaps = [b - a for a, b in zip(saved, saved[1:])]
    assert max(gaps) <= 4


# --------------------------------------------------------------------------- Young / Daly


@pytest.mark.parametrize(("mtbf_min", "daly_min", "young_min"),
                         [(24 * 60, 117, 120), (6 * 60, 57, 60), (15, 9.1, 12.2)])
def test_young_and_daly_match_dalys_published_checks(mtbf_min: float, daly_min: float, young_min: float) -> None:
    # Daly (FGCS 2006), checkpoint cost C = 5 minutes; the paper rounds to the digits given.
    c, m = 5 * 60.0, mtbf_min * 60.0
    digits = 1 if daly_min < 10 else 0
    assert round(daly_interval(c, m) / 60, digits) == daly_min
    assert round(young_interval(c, m) / 60, 1) == pytest.approx(young_min, abs=0.05)


def test_daly_is_the_mtbf_when_a_checkpoint_costs_two_mtbfs_or_more() -> None:
    assert daly_interval(20.0, 10.0) == 10.0
    assert daly_interval(0.0, 10.0) == 0.0


def test_daly_interval_minimises_the_expected_waste_it_models() -> None:
    # Young's first-order waste C/T + T/2M is minimal near the formula's T.
    c, m = 2.0, 3600.0
    t_opt = young_interval(c, m)
    waste = [c / t + t / (2 * m) for t in (t_opt * 0.5, t_opt, t_opt * 2)]
    assert waste[1] < waste[0] and waste[1] < waste[2]
    assert waste[1] == pytest.approx(math.sqrt(2 * c / m))


# ------------------------------------------------------------------------- OverheadBudget


def test_overhead_budget_converges_to_the_shortest_interval_within_budget() -> None:
    # 30 ms steps; a save stalls 5 ms and slows the steps that run while it persists by 3 ms.
    # The first save stalls 50 ms (it allocates staging memory) and must not set the interval.
    policy = OverheadBudget(0.01)
    first_stall = {11: 0.05}
    saved, total, clean = simulate(policy, 3000, 0.030, lambda s: first_stall.get(s, 0.005), 0.020, 0.003)
    cost = 0.005 + 0.003  # the 20 ms persist overlaps exactly one step
    assert policy.interval == math.ceil(cost / (0.01 * 0.030))  # 27
    assert saved[0] == 11  # after warmup_steps=10
    steady = saved[4:]
    assert all(b - a == policy.interval for a, b in zip(steady, steady[1:]))
    assert len(saved) > 100  # it still saves
    # The budget holds in steady state: cost per save over the time between saves.
    assert cost / (policy.interval * 0.030) <= 0.01
    assert (total - clean) / clean <= 0.012  # including the costly first saves of the run


def test_overhead_budget_adapts_when_the_step_time_changes() -> None:
    policy = OverheadBudget(0.02, window=3)
    simulate(policy, 2000, lambda s: 0.030 if s < 1000 else 0.060, 0.006, 0.010, 0.0)
    assert policy.interval == math.ceil(0.006 / (0.02 * 0.060))  # 5: slower steps, relatively cheaper saves


def test_overhead_budget_never_queues_saves_behind_a_slow_persist() -> None:
    policy = OverheadBudget(0.5)  # a loose budget would allow every step...
    simulate(policy, 500, 0.010, 0.001, 0.095, 0.0)
    assert policy.interval == 10  # ...but each save takes 95 ms to become durable


def test_overhead_budget_respects_min_and_max_steps() -> None:
    loose, tight = OverheadBudget(0.9, min_steps=4), OverheadBudget(0.0001, max_steps=50)
    simulate(loose, 300, 0.03, 0.001, 0.001, 0.0)
    simulate(tight, 300, 0.03, 0.005, 0.001, 0.0)
    assert loose.interval == 4 and tight.interval == 50


def test_overhead_budget_does_not_save_again_before_the_first_save_is_measured() -> None:
    policy = OverheadBudget(0.01, warmup_steps=2)
    assert [policy.should_save(s, 0.0) for s in (1, 2, 3)] == [False, False, True]
    policy.observe_save(3, 0.0, 0.01)
    assert not any(policy.should_save(s, 0.0) for s in range(4, 1000))


# ------------------------------------------------------------------------------ YoungDaly


def test_young_daly_saves_every_daly_interval_of_the_measured_cost() -> None:
    policy = YoungDaly(mtbf_seconds=600.0)
    saved, _, _ = simulate(policy, 5000, 0.030, 0.004, 0.010, 0.002)
    expected = daly_interval(0.004 + 0.002, 600.0)  # ~2.7 s
    assert policy.interval_seconds == pytest.approx(expected)
    gaps = [(b - a) * 0.030 for a, b in zip(saved[3:], saved[4:])]
    assert all(expected <= g <= expected + 0.04 for g in gaps)


# ------------------------------------------------------------------------------ PolicyFeed


class Recorder(SavePolicy):
    def __init__(self) -> None:
        self.steps: list[float] = []
        self.persists: list[float] = []

    def should_save(self, step: int, now: float) -> bool:
        return step == 2

    def observe_step(self, seconds: float) -> None:
        self.steps.append(round(seconds, 6))

    def observe_persist(self, persist_seconds: float) -> None:
        self.persists.append(persist_seconds)


def test_feed_pause_reports_finished_saves_and_skips_the_paused_time() -> None:
    clock, rec = FakeClock(), Recorder()
    feed = PolicyFeed(rec, clock=clock)
    for step in (1, 2):
        clock.now += 0.5
        if feed.due(step):
            feed.saved(step, FakeHandle(clock, 0.0, 0.1))
    clock.now += 0.2  # the save is durable now
    feed.pause()
    assert rec.persists == [0.1]
    clock.now += 60.0  # an evaluation
    feed.due(3)
    clock.now += 0.5
    feed.due(4)
    assert rec.steps == [0.5, 0.5]  # step 2 -> (paused) -> 3 is not a step


def test_feed_times_steps_without_the_save_stall_and_reports_persists() -> None:
    rec = Recorder()
    saved, _, _ = simulate(rec, 5, 0.5, 0.25, 0.6, 0.0)
    assert saved == [2]
    assert rec.steps == [0.5, 0.5, 0.5, 0.5]  # the 0.25 s stall after step 2 is not in any step
    assert rec.persists == [0.6]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Every(), "steps=N and/or seconds=T"),
    (lambda: Every(steps=0), "integer >= 1"),
    (lambda: Every(steps=2.5), "integer >= 1"),
    (lambda: Every(steps=True), "integer >= 1"),
    (lambda: Every(seconds=0), "number > 0"),
    (lambda: Every(seconds=float("inf")), "number > 0"),
    (lambda: OverheadBudget(0), "in \\(0, 1\\)"),
    (lambda: OverheadBudget(1.0), "in \\(0, 1\\)"),
    (lambda: OverheadBudget("1%"), "in \\(0, 1\\)"),
    (lambda: OverheadBudget(0.01, min_steps=10, max_steps=5), "max_steps must be an integer >= 10"),
    (lambda: OverheadBudget(0.01, window=0), "window"),
    (lambda: YoungDaly(0), "MTBF"),
    (lambda: YoungDaly(-3600), "MTBF"),
    (lambda: daly_interval(-1.0, 10.0), "cost"),
    (lambda: young_interval(1.0, float("nan")), "MTBF"),
])
def test_bad_configuration_is_refused_with_the_reason(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_a_policy_must_be_a_save_policy(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="SavePolicy"):
        pe.Checkpointer(tmp_path / "ck", policy=10)
    assert not (tmp_path / "ck").exists()  # refused before anything was written
    with pytest.raises(TypeError, match="SavePolicy"):
        PolicyFeed(lambda step, now: True)


# ---------------------------------------------------------------------- Checkpointer.maybe_save


def state() -> dict:
    return {"weights": torch.arange(100, dtype=torch.float32)}


def test_maybe_save_saves_when_the_policy_says_so(tmp_path: Path) -> None:
    with pe.Checkpointer(tmp_path, keep_last=0, policy=Every(steps=3), capture_rng=False) as ck:
        handles = {step: ck.maybe_save(step, state()) for step in range(1, 11)}
        assert [s for s, h in handles.items() if h is not None] == [3, 6, 9]
        ck.wait()
        assert ck.steps() == [3, 6, 9]


def test_maybe_save_passes_save_options_and_feeds_a_measuring_policy(tmp_path: Path) -> None:
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(model.parameters())
    policy = OverheadBudget(0.5, warmup_steps=2, max_steps=3)
    with pe.Checkpointer(tmp_path, keep_last=0, policy=policy, capture_rng=False) as ck:
        for step in range(1, 40):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            handle = ck.maybe_save(step, {"model": model, "optimizer": opt}, overlap=True)
            if handle is not None:
                handle.wait()  # durable before the next step, so every save is measured
        ck.wait()
        assert ck.steps()[0] == 3
        assert policy.interval is not None and 1 <= policy.interval <= 3
        assert len(ck.steps()) >= 10


def test_maybe_save_needs_a_policy_and_a_valid_step(tmp_path: Path) -> None:
    with pe.Checkpointer(tmp_path, capture_rng=False) as ck, pytest.raises(ValueError, match="needs a policy"):
        ck.maybe_save(1, state())
    with pe.Checkpointer(tmp_path, policy=Every(steps=1), capture_rng=False) as ck:
        for bad in (-1, "3", 2.0, True):
            with pytest.raises(ValueError, match="step must be an integer"):
                ck.maybe_save(bad, state())
        assert ck.steps() == []
