"""Study: runs an objective over a search space with a sampler, a storage and an optional pruner."""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pyengine.tune.pruners import Pruner
from pyengine.tune.samplers import History, Sampler, make_sampler
from pyengine.tune.space import Param, Space
from pyengine.tune.storage import DuplicateTrial, Snapshot, Storage, Transaction, open_storage
from pyengine.tune.trial import FrozenTrial, Trial, TrialPruned, TrialState

log = logging.getLogger(__name__)
_HOST = socket.gethostname()
_PENDING = (TrialState.RUNNING, TrialState.WAITING)
# Suggestions made on a snapshot that turned out stale before the next one is made under the
# write lock (serialised as before this existed, but always consistent).
_OPTIMISTIC_ATTEMPTS = 3
# A trial started since the snapshot changes the pending set materially when it lies this
# close to the proposal, as a fraction of the unit cube's diagonal: the constant liar would
# have pushed the proposal away from it. Farther pending points barely move LogEI.
_NEAR = 0.1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


class _Budget:
    """How many new trials this `optimize` call may still create, shared by its threads."""

    def __init__(self, n_trials: int | None, timeout: float | None) -> None:
        self._left = n_trials
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                return False
            if self._left is not None:
                if self._left <= 0:
                    return False
                self._left -= 1
            return True


@dataclass
class ClaimStats:
    """What choosing new trials cost this `Study` object (all its threads)."""

    suggestions: int = 0  # sampler.suggest calls
    suggest_s: float = 0.0  # seconds in sampler.suggest, with or without the lock
    taken: int = 0  # suggestions dropped at the claim: another trial took the configuration meanwhile
    near: int = 0  # suggestions dropped at the claim: a trial started meanwhile near the point
    wasted_s: float = 0.0  # seconds of the dropped suggestions
    in_lock: int = 0  # suggestions made under the write lock


class Study:
    """A hyperparameter search whose every trial is recorded in storage as it happens.

    Concurrency contract: `optimize(n_workers=k)` runs k threads in this process; several
    processes (on one host with SQLite, on many with PostgreSQL) may run `optimize` on the same
    storage at once. A worker chooses a new point WITHOUT holding the write lock: it reads a
    snapshot of the study, runs `sampler.suggest` on it (running and queued trials are its
    pending points), then claims the point in a short transaction that re-checks it. The claim
    is refused, and the suggestion made again on a fresh snapshot, when a trial took the same
    configuration meanwhile (so no two trials ever have the same configuration) or when a
    trial started meanwhile within 10% of the cube's diagonal of it (the constant liar would
    have moved it away); after 3 refusals the suggestion is made inside the transaction, as a
    fully serialised fallback. Other pending changes (trials started elsewhere in the space,
    values completed meanwhile) do not invalidate a suggestion, so a claimed trial may have
    been chosen on a slightly older history, and its number may be later than the one the
    sampler was told (its randomness then comes from the number it was told: a run with one
    worker is reproducible, one with several is not). A trial left RUNNING by a dead worker
    (same host: its pid is gone; any host: no heartbeat for `grace_period_s`, measured on the
    storage's clock: the server's for PostgreSQL, this host's for SQLite) is re-queued up to
    `max_retries` times, then marked FAILED; a re-queued trial resumes from its own
    checkpoint directory.

    Attributes:
        claim_stats: suggestions made by this object, dropped at the claim, and their cost.

    Args:
        space: dict of parameter name -> `Uniform` / `LogUniform` / `IntUniform` / `Choice`.
        direction: "minimize" or "maximize".
        sampler: "grid", "random", "bayes" or a `Sampler`.
        storage: None (in memory), a SQLite file path, a `postgresql://` URL (libpq form; a
            Unix socket as `postgresql:///db?host=/socket/dir`; needs `pip install
            "pyengine[postgres]"`) or a `pe.tune.storage.Storage`. Reopening a file or URL
            continues its study.
        seed: seeds every sampler decision (per trial, from (seed, trial number)).
        pruner: None, `MedianPruner()` or `ASHAPruner()`.
        study_name: several studies may share one file under different names.
        checkpoint_root: where trial checkpoint directories go (default: beside the SQLite
            file; for PostgreSQL the current directory, so workers on several hosts must pass
            one they all see; a temporary directory for an in-memory study).
        heartbeat_interval_s: how often running trials prove their worker is alive.
        grace_period_s: silence after which another host's running trial counts as dead.
        max_retries: re-queues of a trial whose worker died before it is marked FAILED.
    """

    def __init__(
        self,
        space: Mapping[str, Param] | Space,
        direction: str = "minimize",
        sampler: str | Sampler = "bayes",
        storage: str | Path | None = None,
        seed: int = 0,
        pruner: Pruner | None = None,
        *,
        study_name: str = "default",
        checkpoint_root: str | Path | None = None,
        heartbeat_interval_s: float = 10.0,
        grace_period_s: float = 60.0,
        max_retries: int = 1,
    ) -> None:
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"direction={direction!r}: expected 'minimize' or 'maximize'")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an int")
        if pruner is not None and not isinstance(pruner, Pruner):
            raise ValueError(f"pruner={pruner!r}: expected None, pe.tune.MedianPruner() or pe.tune.ASHAPruner()")
        self.space = space if isinstance(space, Space) else Space(space)
        self.direction, self.seed, self.pruner = direction, seed, pruner
        self.sampler = make_sampler(sampler)
        self._sign = 1.0 if direction == "minimize" else -1.0
        self._storage: Storage = open_storage(storage)
        self._storage.open_study(study_name, direction, self.space.to_json(), seed)
        if checkpoint_root is None:
            checkpoint_root = self._storage.default_checkpoint_root(study_name)
        # An in-memory study gets a temporary directory, made only if a trial asks for one.
        self._checkpoint_root = None if checkpoint_root is None else Path(checkpoint_root)
        self.heartbeat_interval_s, self.grace_period_s, self.max_retries = (
            heartbeat_interval_s,
            grace_period_s,
            max_retries,
        )
        self._running: set[int] = set()
        self._running_lock = threading.Lock()
        self.claim_stats = ClaimStats()
        self._suggest_in_lock = False  # True: every suggestion under the write lock (the old way; benchmarks)

    # ---- results -------------------------------------------------------------------------

    @property
    def trials(self) -> list[FrozenTrial]:
        """Every trial so far, in order of number (a snapshot)."""
        return self._storage.trials()

    @property
    def best_trial(self) -> FrozenTrial:
        """The completed trial with the best value.

        Raises:
            ValueError: if no trial has completed yet.
        """
        trials = self.trials
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if not done:
            failed = sum(t.state == TrialState.FAILED for t in trials)
            raise ValueError(
                f"no trial has completed yet ({len(trials)} trials, {failed} failed): run "
                "study.optimize(...) first; a failed trial's error is in study.trials[i].error"
            )
        return min(done, key=lambda t: self._sign * t.value)

    @property
    def best_params(self) -> dict[str, Any]:
        return dict(self.best_trial.params)

    @property
    def best_value(self) -> float:
        return float(self.best_trial.value)

    def to_csv(self, path: str | Path) -> None:
        """Write one row per trial: number, state, value, each parameter, times, error."""
        names = list(self.space.params)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["number", "state", "value", *names, "started", "finished", "retries", "error"])
            for t in self.trials:
                w.writerow(
                    [
                        t.number,
                        t.state.value,
                        t.value,
                        *(t.params[n] for n in names),
                        t.started,
                        t.finished,
                        t.retries,
                        _last_line(t.error),
                    ]
                )

    def close(self) -> None:
        self._storage.close()

    # ---- running -------------------------------------------------------------------------

    def optimize(
        self,
        objective: Callable[[Trial], float],
        n_trials: int | None = None,
        n_workers: int = 1,
        timeout: float | None = None,
        catch: tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        """Run trials until `n_trials` new ones were started here or `timeout` seconds passed.

        Workers first resume re-queued and promotable paused trials (these do not count
        towards `n_trials`), then start new ones. An objective that raises one of `catch` or
        returns a non-finite value marks its trial FAILED and the study goes on.

        Args:
            objective: `objective(trial) -> float`.
            n_trials: new trials to start in this call (None: until timeout or exhaustion).
            n_workers: threads running trials concurrently in this process.
            timeout: seconds after which no new trial starts (running ones finish).
            catch: exception types recorded as a failed trial instead of propagating.
        """
        if n_trials is None and timeout is None:
            raise ValueError("optimize: give n_trials, timeout or both, otherwise it never stops")
        if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 0):
            raise ValueError(f"optimize: n_trials={n_trials!r} must be a non-negative int")
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"optimize: n_workers={n_workers!r} must be a positive int")
        if not callable(objective):
            raise ValueError("optimize: objective must be a callable objective(trial) -> float")
        self.sampler.prepare(self.space)
        budget, stop, errors = _Budget(n_trials, timeout), threading.Event(), []

        def worker() -> None:
            try:
                while not stop.is_set():
                    claimed = self._claim(budget)
                    if claimed is None:
                        return
                    self._run(objective, *claimed, catch)
            except BaseException as e:  # re-raised in the calling thread below
                errors.append(e)
                stop.set()

        beat = threading.Thread(target=self._heartbeat_loop, args=(stop,), name="pyengine-tune-heartbeat", daemon=True)
        beat.start()
        threads = [threading.Thread(target=worker, name=f"pyengine-tune-worker-{i}") for i in range(n_workers)]
        try:
            if n_workers == 1:
                worker()  # run in the caller's thread: Ctrl-C and debuggers behave as usual
            else:
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        finally:
            stop.set()
            beat.join()
        if errors:
            raise errors[0]

    @property
    def checkpoint_root(self) -> Path:
        """The directory that holds every trial's checkpoint directory."""
        if self._checkpoint_root is None:
            self._checkpoint_root = Path(tempfile.mkdtemp(prefix="pyengine-study-"))
        return self._checkpoint_root

    def _trial_dir(self, number: int) -> Path:
        d = self.checkpoint_root / f"trial-{number:05d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_interval_s):
            with self._running_lock:
                ids = list(self._running)
            try:
                self._storage.heartbeat(ids)
            except Exception as e:  # a busy database must not kill the heartbeat; the next beat retries
                log.warning("heartbeat failed: %s", e)

    def _claim(self, budget: _Budget) -> tuple[FrozenTrial, bool] | None:
        """The next trial to run: re-queued, then promotable paused, then a new one."""
        snap = self._storage.snapshot()
        if self._has_queued_work(snap):
            queued = self._storage.atomic(self._take_queued, "queue")
            if queued is not None:
                return self._started(queued), True
        if not budget.take():
            return None
        attempts = 0 if self._suggest_in_lock else _OPTIMISTIC_ATTEMPTS
        for _ in range(attempts):
            t0 = time.perf_counter()
            params = self._suggest(snap.trials)
            spent = time.perf_counter() - t0
            if params is None:
                log.info("the sampler has no new configuration left; stopping")
                return None
            claim = functools.partial(self._claim_unless_stale, params=params, seen=snap.trials)
            try:
                outcome = self._storage.atomic(claim, "claim")
            except DuplicateTrial as e:  # only a writer that ignores the lock gets here
                outcome = ("taken", str(e))
            if isinstance(outcome, FrozenTrial):
                return self._started(outcome), False
            with self._running_lock:
                setattr(self.claim_stats, outcome[0], getattr(self.claim_stats, outcome[0]) + 1)
                self.claim_stats.wasted_s += spent
            log.debug("trial suggestion dropped at the claim: %s", outcome[1])
            snap = self._storage.snapshot()
        frozen = self._storage.atomic(self._suggest_and_insert, "claim-in-lock")
        if frozen is None:
            log.info("the sampler has no new configuration left; stopping")
            return None
        return self._started(frozen), False

    def _history(self, trials: list[FrozenTrial]) -> History:
        return History(
            complete=[(t.params, self._sign * t.value) for t in trials if t.state == TrialState.COMPLETE],
            pending=[t.params for t in trials if t.state in _PENDING],
            seen_keys={self.space.key(t.params) for t in trials},
            number=len(trials),
            seed=self.seed,
        )

    def _suggest(self, trials: list[FrozenTrial], in_lock: bool = False) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        params = self.sampler.suggest(self.space, self._history(trials))
        with self._running_lock:
            self.claim_stats.suggestions += 1
            self.claim_stats.suggest_s += time.perf_counter() - t0
            self.claim_stats.in_lock += in_lock
        return params

    def _claim_unless_stale(
        self, tx: Transaction, params: dict[str, Any], seen: list[FrozenTrial]
    ) -> FrozenTrial | tuple[str, str]:
        """Insert `params` (suggested on `seen`) unless the study changed under it; else say why."""
        key = self.space.key(params)
        if tx.has_key(key):
            return "taken", f"{key} was taken meanwhile"
        pending_before = {t.id for t in seen if t.state in _PENDING}
        x = self.space.encode(params)
        near = _NEAR * math.sqrt(self.space.dim)
        for t in tx.trials(intermediate=False, states=_PENDING):
            if t.id not in pending_before and float(np.linalg.norm(self.space.encode(t.params) - x)) < near:
                return "near", f"trial {t.number} started meanwhile near {key}"
        return tx.insert_trial(params, key, _HOST, os.getpid())

    def _suggest_and_insert(self, tx: Transaction) -> FrozenTrial | None:
        params = self._suggest(tx.trials(intermediate=False), in_lock=True)
        if params is None:
            return None
        key = self.space.key(params)
        if tx.has_key(key):
            raise ValueError(
                f"sampler {type(self.sampler).__name__} proposed {params}, which a trial of the study already has: "
                "a Sampler must return a configuration outside History.seen_keys, or None when none is left"
            )
        return tx.insert_trial(params, key, _HOST, os.getpid())

    def _started(self, t: FrozenTrial) -> FrozenTrial:
        with self._running_lock:
            self._running.add(t.id)
        return t

    def _looks_dead(self, t: FrozenTrial, now: float) -> bool:
        if t.state != TrialState.RUNNING or (t.host == _HOST and t.pid == os.getpid()):
            return False
        dead_here = t.host == _HOST and t.pid is not None and not _pid_alive(t.pid)
        silent = t.heartbeat is not None and now - t.heartbeat > self.grace_period_s
        return dead_here or silent

    def _promotable(self, trials: list[FrozenTrial]) -> FrozenTrial | None:
        if self.pruner is None or not self.pruner.pauses:
            return None
        return self.pruner.promotion(trials, self._sign)

    def _has_queued_work(self, snap: Snapshot) -> bool:
        """Whether the snapshot shows a trial to reap, resume or promote (then `_take_queued` runs)."""
        return (
            any(t.state == TrialState.WAITING or self._looks_dead(t, snap.now) for t in snap.trials)
            or self._promotable(snap.trials) is not None
        )

    def _take_queued(self, tx: Transaction) -> FrozenTrial | None:
        """Under the lock: reap dead trials, then start a WAITING or a promotable PAUSED one."""
        trials = tx.trials()
        self._reap_dead(tx, trials, tx.now())
        t = next((t for t in trials if t.state == TrialState.WAITING), None) or self._promotable(trials)
        if t is None:
            return None
        tx.set_state(t.id, TrialState.RUNNING, host=_HOST, pid=os.getpid())
        t.state, t.host, t.pid = TrialState.RUNNING, _HOST, os.getpid()
        return t

    def _reap_dead(self, tx: Transaction, trials: list[FrozenTrial], now: float) -> None:
        for t in trials:
            if not self._looks_dead(t, now):
                continue
            if t.retries < self.max_retries:
                log.warning(
                    "trial %d: worker %s:%s died; re-queued to resume from its checkpoint", t.number, t.host, t.pid
                )
                tx.set_state(t.id, TrialState.WAITING, retries_inc=1)
                t.state, t.retries = TrialState.WAITING, t.retries + 1
            else:
                msg = f"worker {t.host}:{t.pid} died while running it ({t.retries} retries used)"
                tx.set_state(t.id, TrialState.FAILED, error=msg)
                t.state, t.error = TrialState.FAILED, msg

    def _run(
        self,
        objective: Callable[[Trial], float],
        frozen: FrozenTrial,
        resumed: bool,
        catch: tuple[type[BaseException], ...],
    ) -> None:
        trial = Trial(self, frozen, resumed)
        state, value, error = TrialState.FAILED, None, None
        try:
            result = objective(trial)
            value = float(result) if isinstance(result, (int, float)) or hasattr(result, "__float__") else math.nan
            if math.isfinite(value):
                state = TrialState.COMPLETE
            else:
                error = f"objective returned {result!r}, not a finite number"
                value = None
        except TrialPruned:
            paused = self.pruner is not None and self.pruner.pauses and trial.prune_requested
            state = TrialState.PAUSED if paused else TrialState.PRUNED
            value = frozen.intermediate[frozen.last_step] if frozen.intermediate else None
        except catch as e:
            error = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            log.warning("trial %d failed: %r", frozen.number, e)
        finally:
            with self._running_lock:
                self._running.discard(frozen.id)
            if state == TrialState.FAILED and error is None:
                error = "interrupted (KeyboardInterrupt or another exception outside `catch`)"
            self._storage.atomic(lambda tx: tx.set_state(frozen.id, state, value=value, error=error), "finish")
        if state == TrialState.FAILED and error:
            log.info("trial %d params %s: %s", frozen.number, frozen.params, error.splitlines()[-1])
