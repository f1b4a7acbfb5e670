"""pytest-benchmark view of the tuner (run with `pytest bench/test_bench_tuning.py`).

The side-by-side table against Optuna is bench/bench_tuning.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tuning import hartmann6  # noqa: E402

import pyengine as pe  # noqa: E402
from pyengine.tune.samplers import History  # noqa: E402
from pyengine.tune.space import Space  # noqa: E402


@pytest.fixture(scope="module")
def hartmann_history():
    """100 completed Hartmann6 trials, as a Bayesian run has them when it asks for trial 100."""
    torch.set_num_threads(1)
    space = Space({f"x{i}": pe.tune.Uniform(0.0, 1.0) for i in range(6)})
    rng = np.random.default_rng(0)
    complete = []
    for _ in range(100):
        p = space.decode(rng.random(6))
        complete.append((p, hartmann6(np.array(list(p.values())))))
    return space, complete


@pytest.mark.parametrize("n_pending", [0, 4])
def test_bayes_suggestion_at_100_trials_6d(benchmark, hartmann_history, n_pending):
    space, complete = hartmann_history
    sampler = pe.tune.BayesSampler()
    pending = [space.decode(np.full(6, 0.1 * (i + 1))) for i in range(n_pending)]
    seen = {space.key(p) for p, _ in complete}
    result = benchmark.pedantic(
        lambda: sampler.suggest(space, History(complete, pending, seen, 100 + n_pending, 0)), rounds=5
    )
    assert space.key(result) not in seen


def test_random_suggestion(benchmark, hartmann_history):
    space, complete = hartmann_history
    sampler = pe.tune.RandomSampler()
    benchmark(lambda: sampler.suggest(space, History(complete, [], set(), 100, 0)))


def test_study_overhead_per_trial_sqlite(benchmark, tmp_path):
    study = pe.tune.Study({"x": pe.tune.Uniform(0.0, 1.0)}, sampler="random", storage=tmp_path / "s.db")
    benchmark.pedantic(lambda: study.optimize(lambda t: t.params["x"], n_trials=1), rounds=20)


@pytest.fixture(scope="module")
def lcbench():
    pytest.importorskip("onnxruntime")
    from pyengine.benchmarks import yahpo_lcbench

    if not (yahpo_lcbench.DEFAULT_DATA_DIR / "model.onnx").is_file():
        pytest.skip(f"no LCBench surrogate at {yahpo_lcbench.DEFAULT_DATA_DIR} (set PYENGINE_LCBENCH_DIR)")
    return yahpo_lcbench.LCBench(yahpo_lcbench.tasks()[0])


def test_lcbench_curve(benchmark, lcbench):
    from pyengine.benchmarks import yahpo_lcbench

    space = Space(yahpo_lcbench.search_space())
    config = space.decode(np.full(space.dim, 0.5))
    curve = benchmark(lambda: lcbench.curve(config))
    assert curve.shape == (yahpo_lcbench.MAX_EPOCH,) and np.isfinite(curve).all()
    assert 0.0 <= curve[-1] <= 100.0 and curve[-1] < curve[0]  # training helps: error falls over the epochs


def test_lcbench_runs_end_to_end_with_asha(lcbench):
    from bench_tuning import run_lcbench

    curve, _ = run_lcbench("pyengine-bayes-asha", lcbench.task, 0, 12)
    assert len(curve) == 12 and all(a >= b for a, b in zip(curve, curve[1:]))  # best so far never rises
    assert np.isfinite(curve[-1])
