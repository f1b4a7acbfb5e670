"""Are parallel workers on one study serialised? 4 worker PROCESSES against 1, on SQLite and PostgreSQL.

40 trials of a 1 s objective (time.sleep) with Bayesian suggestions after 20 trials
(`BayesSampler(n_startup_trials=20)`), run by 1 worker process and by 4 (10 trials each) on
one study; the wall time runs from a common start signal (after imports and connecting) to
the last worker's end. Each configuration runs twice: with suggestions outside the write lock
(today's `Study`) and inside it (the previous behaviour, `Study._suggest_in_lock = True`), and
prints how long each process held the write lock per claimed suggestion.

    python bench/bench_tuning_workers.py                      # SQLite + a throwaway PostgreSQL
    python bench/bench_tuning_workers.py --postgres postgresql:///bench?host=/run/postgresql

Target (issue 16): 4 workers take <= 0.4x the wall time of 1 worker on both storages.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

TARGET = 0.4


def _objective_factory(sleep_s: float) -> Any:
    def objective(trial: Any) -> float:
        time.sleep(sleep_s)
        return sum((v - 0.3) ** 2 for v in trial.params.values())

    return objective


def _worker(storage: str, name: str, n_trials: int, sleep_s: float, in_lock: bool, start: Any, out: Any) -> None:
    import pyengine as pe

    space = {f"x{i}": pe.tune.Uniform(0.0, 1.0) for i in range(4)}
    sampler = pe.tune.BayesSampler(n_startup_trials=20)
    study = pe.tune.Study(space, sampler=sampler, storage=storage, seed=0, study_name=name)
    study._suggest_in_lock = in_lock
    out.put(("ready", None))
    start.wait()
    study.optimize(_objective_factory(sleep_s), n_trials=n_trials)
    # Every transaction that claimed a new trial: optimistic claims and suggestions under the lock.
    held = [
        h for kind in ("claim", "claim-in-lock") for h in getattr(study._storage.lock_stats.get(kind), "samples", [])
    ]
    stats = study.claim_stats
    out.put(
        (
            "done",
            {
                "end": time.monotonic(),
                "held": held,
                "suggestions": stats.suggestions,
                "suggest_s": stats.suggest_s,
                "taken": stats.taken,
                "near": stats.near,
                "wasted_s": stats.wasted_s,
                "in_lock": stats.in_lock,
            },
        )
    )
    study.close()


def _get(out: Any, procs: list[Any]) -> Any:
    """The next message from the workers; raises as soon as one of them has died."""
    while True:
        try:
            return out.get(timeout=1.0)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a worker process exited with {dead[0]} (its traceback is above)") from None


def run(storage: str, workers: int, n_trials: int, sleep_s: float, in_lock: bool) -> dict[str, Any]:
    """One study run by `workers` processes; wall time from the common start to the last end."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    name = f"bench-{workers}-{'in' if in_lock else 'out'}-{uuid.uuid4().hex[:8]}"
    shares = [n_trials // workers + (i < n_trials % workers) for i in range(workers)]
    procs = [ctx.Process(target=_worker, args=(storage, name, k, sleep_s, in_lock, start, out)) for k in shares]
    for p in procs:
        p.start()
    for _ in procs:
        assert _get(out, procs)[0] == "ready"
    t0 = time.monotonic()
    start.set()
    results = [_get(out, procs)[1] for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a worker exited with {p.exitcode}")
    held = sorted(h for r in results for h in r["held"])
    suggestions = sum(r["suggestions"] for r in results)
    return {
        "wall_s": max(r["end"] for r in results) - t0,
        "held_mean_ms": 1e3 * sum(held) / len(held) if held else 0.0,
        "held_p95_ms": 1e3 * held[int(0.95 * (len(held) - 1))] if held else 0.0,
        "held_max_ms": 1e3 * held[-1] if held else 0.0,
        "suggest_mean_ms": 1e3 * sum(r["suggest_s"] for r in results) / max(1, suggestions),
        "taken": sum(r["taken"] for r in results),
        "near": sum(r["near"] for r in results),
        "wasted_s": sum(r["wasted_s"] for r in results),
        "in_lock": sum(r["in_lock"] for r in results),
    }


def _postgres_server() -> tuple[Any, str]:
    """A throwaway server (the tests' helper), or exit with why not."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from postgres_server import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL binaries (initdb, pg_ctl) found: pass --postgres URL or --backends sqlite")
    server = PostgresServer(bindir)
    server.start()
    return server, server.create_database("bench_tuning_workers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--sleep", type=float, default=1.0, help="seconds per objective call")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--postgres", default=None, help="URL of an existing database (default: start a throwaway server)")
    args = ap.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    server = None
    tmp = Path(tempfile.mkdtemp(prefix="pe-bench-workers-"))
    rows = []
    try:
        for backend in backends:
            if backend == "postgresql":
                url = args.postgres
                if url is None:
                    server, url = _postgres_server()
            for workers, in_lock in ((1, False), (args.workers, False), (args.workers, True)):
                storage = url if backend == "postgresql" else str(tmp / f"{uuid.uuid4().hex[:8]}.db")
                r = run(storage, workers, args.trials, args.sleep, in_lock)
                r.update(backend=backend, workers=workers, lock="inside" if in_lock else "outside")
                rows.append(r)
                print(
                    f"{backend:10s} workers={workers} suggest {r['lock']:7s} the lock: wall {r['wall_s']:6.1f} s, "
                    f"lock held per suggestion mean {r['held_mean_ms']:7.1f} ms p95 {r['held_p95_ms']:7.1f} "
                    f"max {r['held_max_ms']:7.1f}, suggest mean {r['suggest_mean_ms']:6.1f} ms, "
                    f"dropped claims {r['taken']} taken + {r['near']} near ({r['wasted_s']:.1f} s of suggesting), "
                    f"in-lock suggestions {r['in_lock']}",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()
    print(f"\n{args.trials} trials, {args.sleep:g} s objective, Bayesian after 20 trials, worker processes")
    print(f"{'storage':10s} {'suggest':8s} {'1 worker':>9s} {f'{args.workers} workers':>10s} {'ratio':>6s}  target")
    for backend in backends:
        one = next(r for r in rows if r["backend"] == backend and r["workers"] == 1)
        for lock in ("outside", "inside"):
            many = next(r for r in rows if r["backend"] == backend and r["workers"] > 1 and r["lock"] == lock)
            ratio = many["wall_s"] / one["wall_s"]
            verdict = ("PASS" if ratio <= TARGET else "MISS") if lock == "outside" else "(before)"
            print(
                f"{backend:10s} {lock:8s} {one['wall_s']:8.1f}s {many['wall_s']:9.1f}s {ratio:6.2f}  "
                f"<= {TARGET} {verdict}"
            )


if __name__ == "__main__":
    main()
