"""The study's storage, shared by every worker: heartbeats, stale-trial retry, and one budget for all.

Optuna's relational storage is the distributed engine: workers on any machine share one study
through PostgreSQL (or, on one machine, the embedded SQLite file). A running trial records a
heartbeat every ``heartbeat`` seconds; one silent for ``STALE_HEARTBEATS`` heartbeats (its worker
was killed) is failed by the next worker that looks and re-queued with the same parameters
(:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`).

The budget counts the whole study's evaluated trials (COMPLETE, or pruned at zero shot);
:func:`optimize_to_budget` keeps it exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sqlite3
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import sqlalchemy
import torch
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from torch import nn

from ranksearch.data import DataSplits, TensorImageDataset
from ranksearch.errors import RanksearchError

STALE_HEARTBEATS = 3
"""A running trial whose last heartbeat is this many intervals old is failed and retried."""
MAX_RETRIES = 3
"""How often one trial is retried after its worker died."""
POLL_S = 1.0
"""How often a worker with nothing to run looks at the study again."""
SQLITE_BUSY_TIMEOUT_S = 60
FINGERPRINT_KEY = "fingerprint"
"""Study user attribute: digests of the trained weights and the data splits the study was measured with."""

Objective = Callable[[optuna.Trial], "tuple[float, float] | float"]


def open_storage(url: str, *, heartbeat: int) -> optuna.storages.RDBStorage:
    """An Optuna relational storage at ``url`` with heartbeats and the retry of stale trials.

    SQLite runs in WAL mode with a long busy timeout, and every transaction takes the write lock up
    front (``BEGIN IMMEDIATE``): with pysqlite's default deferred transactions, two workers can pop
    the same queued trial (17 of 90 trials were evaluated twice with 3 processes; none this way).
    """
    sqlite = url.startswith("sqlite:///")
    if sqlite:
        _enable_wal(Path(url.removeprefix("sqlite:///")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=STALE_HEARTBEATS * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
            engine_kwargs={"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "isolation_level": None}}
            if sqlite
            else {},
        )
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def _enable_wal(path: Path) -> None:
    """WAL lets readers proceed while one worker writes (persistent: set once per database file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


def worker_label() -> str:
    """``host:pid``: recorded on each trial as its "worker" attribute."""
    return f"{socket.gethostname()}:{os.getpid()}"


REJECTED_AT_ZERO_SHOT = "rejected_at_zero_shot"
"""User attribute of a trial pruned by its evaluator's zero-shot verdict: it was evaluated, so it counts."""


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """COMPLETE trials, and trials pruned at zero shot (evaluated up to the verdict); not failed ones, nor
    configs rejected from the latency table or sensitivity before any evaluation."""
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.PRUNED and bool(trial.user_attrs.get(REJECTED_AT_ZERO_SHOT))
    )


def trial_counts(study: optuna.Study) -> Counter[TrialState | str]:
    """Trials per state, and under ``"spent"`` those that count towards the budget."""
    trials = study.get_trials(deepcopy=False)
    counts: Counter[TrialState | str] = Counter(t.state for t in trials)
    counts["spent"] = sum(map(counts_toward_budget, trials))
    return counts


class BudgetGuard:
    """Wraps an objective: prunes, before evaluating, a trial that the trials ahead of it already fill the budget with.

    The trials ahead are those with a lower number that are RUNNING or WAITING or count towards the
    budget: a trial only ever moves from WAITING to RUNNING to a finished state, so the k-th trial to
    count (by number) had at least k - 1 such trials ahead when it was checked, and at most ``budget``
    trials count.
    """

    def __init__(self, *, study: optuna.Study, objective: Objective, budget: int) -> None:
        self.study = study
        self.objective = objective
        self.budget = budget
        self.number: int | None = None
        self.evaluated = False

    def __call__(self, trial: optuna.Trial) -> tuple[float, float] | float:
        self.number, self.evaluated = trial.number, False
        trial.set_user_attr("worker", worker_label())
        ahead = sum(
            t.number < trial.number and (t.state in (TrialState.RUNNING, TrialState.WAITING) or counts_toward_budget(t))
            for t in self.study.get_trials(deepcopy=False)
        )
        if ahead >= self.budget:
            trial.set_user_attr("fail_reason", f"not evaluated: {ahead} trials ahead fill the budget")
            raise optuna.TrialPruned()
        try:
            values = self.objective(trial)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale while evaluating
            self.evaluated = True
            raise
        self.evaluated = True
        return values

    def lost(self) -> bool:
        """Whether another worker failed this worker's last trial as stale while it ran (so it cannot be told)."""
        mine = [t for t in self.study.get_trials(deepcopy=False) if t.number == self.number]
        return self.evaluated and bool(mine) and mine[0].state == TrialState.FAIL


def optimize_to_budget(
    study: optuna.Study,
    objective: Objective,
    *,
    budget: int,
    timeout: float | None = None,
    after_trial: Callable[[], None] | None = None,
    console: Console,
) -> int:
    """Run trials in this process until ``budget`` trials of the study count (:func:`counts_toward_budget`),
    counting every worker's.

    Before asking for a trial, a worker waits while counted plus RUNNING trials fill the budget
    (a running trial may still fail, and its retry needs a worker), failing stale trials as it
    polls; :class:`BudgetGuard` prunes the rare surplus trial of a race between workers before it is
    evaluated. ``after_trial`` runs whenever the study's trials change. Returns how many trials this
    process completed.
    """
    with _remember_sigint() as interrupted:
        return _optimize_loop(study, objective, budget, timeout, after_trial, console, interrupted)


@contextlib.contextmanager
def _remember_sigint() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered: Python swallows an interrupt that
    lands inside a finalizer ("Exception ignored in ..."), and the loop must still stop after that trial."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield interrupted
        return

    def on_sigint(signum: int, frame: object) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _optimize_loop(
    study: optuna.Study,
    objective: Objective,
    budget: int,
    timeout: float | None,
    after_trial: Callable[[], None] | None,
    console: Console,
    interrupted: threading.Event,
) -> int:
    guard = BudgetGuard(study=study, objective=objective, budget=budget)
    deadline = None if timeout is None else time.monotonic() + timeout
    completed = failures_in_a_row = 0
    seen: Counter[TrialState] | None = None
    finished: list[FrozenTrial] = []
    while True:
        if interrupted.is_set():
            raise KeyboardInterrupt
        counts = trial_counts(study)
        if counts != seen and seen is not None and after_trial is not None:
            after_trial()
        seen = counts
        if counts["spent"] >= budget:
            return completed
        if deadline is not None and time.monotonic() >= deadline:
            console.print(f"--timeout {timeout:g}s reached with {counts['spent']} trials evaluated")
            return completed
        if counts["spent"] + counts[TrialState.RUNNING] >= budget:
            fail_stale_trials(study)
            time.sleep(POLL_S)
            continue
        finished.clear()
        try:
            study.optimize(guard, n_trials=1, callbacks=[lambda _, trial: finished.append(trial)])
        except RanksearchError:
            raise
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            if not guard.lost():
                raise
            console.print(f"trial {guard.number}: failed as stale while it ran (a heartbeat came late); retried")
            continue
        trial = finished[0]
        if trial.state == TrialState.COMPLETE:
            completed += 1
            failures_in_a_row = 0
        elif trial.state == TrialState.FAIL:
            failures_in_a_row += 1
            reason = trial.user_attrs.get("fail_reason", "see the log")
            console.print(f"trial {trial.number} failed: {reason}")
            if failures_in_a_row >= max(10, budget // 2):
                raise RanksearchError(
                    f"{failures_in_a_row} trials failed in a row (last: {reason}); fix the cause and rerun to resume"
                )


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the running trials whose worker stopped sending heartbeats; each is re-queued for retry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def problem_fingerprint(model: nn.Module, splits: DataSplits) -> dict[str, str]:
    """Digests of the trained weights and of every data split (images and labels)."""
    weights = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if not name.endswith("num_batches_tracked"):
            weights.update(name.encode())
            weights.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    data = hashlib.blake2b(digest_size=16)
    for split in (splits.train, splits.val, splits.test):
        if not isinstance(split, TensorImageDataset):
            raise TypeError(f"cannot fingerprint a {type(split).__name__}; expected a TensorImageDataset")
        data.update(split.images.contiguous().numpy().tobytes())
        data.update(split.labels.contiguous().numpy().tobytes())
    return {"model": weights.hexdigest(), "data": data.hexdigest()}


def check_fingerprint(study: optuna.Study, fingerprint: dict[str, str], *, checkpoint: Path | None) -> None:
    """Record a new study's fingerprint; refuse weights or data that differ from those the study was measured with."""
    recorded = study.user_attrs.get(FINGERPRINT_KEY)
    if recorded is None:
        study.set_user_attr(FINGERPRINT_KEY, fingerprint)
        return
    name = study.study_name
    if recorded.get("model") != fingerprint["model"]:
        raise RanksearchError(
            f"study {name!r}: the trained weights here ({checkpoint or 'the baseline'}) differ from the study's; "
            f"pass --checkpoint with the file the study was measured with (its 'model' attribute names it)"
        )
    if recorded.get("data") != fingerprint["data"]:
        raise RanksearchError(
            f"study {name!r}: the dataset here differs from the study's; point --data-root at the same dataset files"
        )
