"""PostgreSQL storage against a real server: URLs and their errors, reopening, the server's
clock, and a serialization failure retried for real."""

from __future__ import annotations

import sys
import threading
import time

import pytest

import pyengine as pe
from pyengine.tune.trial import TrialState


def _space():
    return {"x": pe.tune.Uniform(-2.0, 2.0), "k": pe.tune.IntUniform(1, 8)}


def _objective(t):
    return (t.params["x"] - 0.5) ** 2 + t.params["k"]


def test_missing_psycopg_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "pyengine\[postgres\]"'):
        pe.tune.Study(_space(), storage="postgresql://user@localhost/db")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://user@localhost:notaport/db", "port 'notaport' is not a number"),
        ("postgresql://user@localhost/db?bogus=1", "bogus"),
    ],
)
def test_bad_urls_are_explained(url, message):
    pytest.importorskip("psycopg")
    with pytest.raises(ValueError, match="not a valid PostgreSQL URL") as info:
        pe.tune.Study(_space(), storage=url)
    assert message in str(info.value) and "postgresql:///dbname?host=" in str(info.value)


def test_an_unreachable_server_is_explained_without_the_password(tmp_path):
    pytest.importorskip("psycopg")
    url = f"postgresql://user:s3cret@/db?host={tmp_path}&connect_timeout=5"
    with pytest.raises(ConnectionError, match="cannot connect to the PostgreSQL server") as info:
        pe.tune.Study(_space(), storage=url)
    assert "pg_isready" in str(info.value) and "s3cret" not in str(info.value) and "***" in str(info.value)


def test_a_missing_database_is_explained(postgres_server):
    with pytest.raises(ConnectionError, match="createdb"):
        pe.tune.Study(_space(), storage=postgres_server.url("no_such_db"))


def test_a_study_reopened_by_url_continues(postgres_url):
    first = pe.tune.Study(_space(), sampler="bayes", storage=postgres_url, seed=1)
    first.optimize(_objective, n_trials=12)
    first.close()
    again = pe.tune.Study(_space(), sampler="bayes", storage=postgres_url, seed=1)
    assert len(again.trials) == 12
    again.optimize(_objective, n_trials=5, n_workers=2)
    trials = again.trials
    assert [t.number for t in trials] == list(range(17))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({again.space.key(t.params) for t in trials}) == 17
    with pytest.raises(ValueError, match="different search space"):
        pe.tune.Study({"x": pe.tune.Uniform(-1.0, 1.0)}, storage=postgres_url)
    pe.tune.Study({"x": pe.tune.Uniform(-1.0, 1.0)}, storage=postgres_url, study_name="other").close()


def test_intermediate_values_and_their_errors(postgres_url):
    def objective(trial):
        for step in range(3):
            trial.report(step, float(step))
        if trial.number == 1:
            trial.report(2, 0.0)
        return 0.0

    study = pe.tune.Study(_space(), sampler="random", storage=postgres_url)
    study.optimize(objective, n_trials=2)
    first, second = study.trials
    assert first.state == TrialState.COMPLETE and first.intermediate == {0: 0.0, 1: 1.0, 2: 2.0}
    assert second.state == TrialState.FAILED and "steps must increase" in second.error


def test_stamps_come_from_the_server_clock(postgres_url, monkeypatch):
    study = pe.tune.Study(_space(), sampler="random", storage=postgres_url)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 86400.0)  # this process is a day ahead
    study.optimize(_objective, n_trials=3)
    server_now = study._storage.now()
    assert abs(server_now - real()) < 60
    for t in study.trials:
        assert abs(t.started - server_now) < 60 and abs(t.finished - server_now) < 60


def test_a_serialization_failure_is_retried_for_real(postgres_url, caplog):
    """A heartbeat commits while the reaper holds an older view of the trial: the reaper's
    SERIALIZABLE transaction fails with 40001, is re-run, sees the fresh heartbeat and leaves
    the live trial alone."""
    import psycopg

    study = pe.tune.Study(_space(), sampler="random", storage=postgres_url, grace_period_s=5.0)
    params = {"x": 0.0, "k": 1}
    trial = study._storage.atomic(lambda tx: tx.insert_trial(params, study.space.key(params), "other-host", 1))
    with psycopg.connect(postgres_url, autocommit=True) as beat, psycopg.connect(postgres_url, autocommit=True) as spy:
        beat.execute("UPDATE pyengine_trials SET heartbeat = heartbeat - 3600 WHERE id=%s", (trial.id,))
        assert study._has_queued_work(study._storage.snapshot())  # silent for an hour: looks dead
        beat.execute("BEGIN")
        beat.execute("UPDATE pyengine_trials SET heartbeat = extract(epoch from now()) WHERE id=%s", (trial.id,))
        result: list = []
        caplog.set_level("INFO", logger="pyengine.tune.storage.postgres")
        reaper = threading.Thread(target=lambda: result.append(study._storage.atomic(study._take_queued, "queue")))
        reaper.start()
        deadline = time.monotonic() + 30
        while spy.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] == 0:
            assert time.monotonic() < deadline, "the reaper never blocked on the trial's row"
            time.sleep(0.01)
        beat.execute("COMMIT")  # the reaper's snapshot is now stale: 40001 on its UPDATE
        reaper.join(30)
    assert result == [None]
    assert study._storage.transient_retries >= 1 and "serialization failure" in caplog.text
    (t,) = study.trials
    assert t.state == TrialState.RUNNING and t.retries == 0


def test_a_deadlock_is_retried_for_real(postgres_url, caplog):
    """A client locks trial B then wants trial A while a heartbeat holds A and waits for B: the
    server aborts the heartbeat (40P01, it waited longest) and the storage runs it again."""
    import psycopg

    study = pe.tune.Study(_space(), sampler="random", storage=postgres_url)
    a, b = (
        study._storage.atomic(lambda tx, p=p: tx.insert_trial(p, study.space.key(p), "h", 1))
        for p in ({"x": 0.0, "k": 1}, {"x": 1.0, "k": 2})
    )
    caplog.set_level("INFO", logger="pyengine.tune.storage.postgres")
    with psycopg.connect(postgres_url, autocommit=True) as other, psycopg.connect(postgres_url, autocommit=True) as spy:
        other.execute("SET deadlock_timeout = '60s'")  # only the heartbeat's backend looks for the cycle
        other.execute("BEGIN")
        other.execute("UPDATE pyengine_trials SET error='other' WHERE id=%s", (b.id,))
        beat = threading.Thread(target=study._storage.heartbeat, args=([a.id, b.id],))
        beat.start()
        deadline = time.monotonic() + 30
        while spy.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] == 0:
            assert time.monotonic() < deadline, "the heartbeat never blocked on trial b"
            time.sleep(0.01)
        other.execute("UPDATE pyengine_trials SET error='other' WHERE id=%s", (a.id,))  # the cycle
        other.execute("COMMIT")
        beat.join(30)
    assert not beat.is_alive()
    assert study._storage.transient_retries >= 1 and "deadlock" in caplog.text
    assert {t.error for t in study.trials} == {"other"}
