"""One budget for every worker: trials run until the study's evaluated trials reach it, exactly.

The budget counts the whole study's evaluated trials (COMPLETE, or pruned at zero shot).
:func:`optimize_to_budget` keeps it exact across workers; :class:`BudgetGuard` prunes the rare surplus trial.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from ranksearch.errors import RanksearchError
from ranksearch.results.record import Outcome, TrialRecord, TrialWriter, records
from ranksearch.study.heartbeat import beating, fail_silent_trials
from ranksearch.study.storage import POLL_S, worker_label

Objective = Callable[[optuna.Trial], "tuple[float, float] | float"]


def trial_counts(study: optuna.Study) -> Counter[TrialState | str]:
    """Trials per state, and under ``"spent"`` those that count towards the budget."""
    trials = records(study)
    counts: Counter[TrialState | str] = Counter(t.state for t in trials)
    counts["spent"] = sum(t.counts_toward_budget for t in trials)
    return counts


class BudgetGuard:
    """Wraps an objective: prunes, before evaluating, a trial that the trials ahead of it already fill the budget with
    (promotions, which do not count, are never pruned).

    The trials ahead are those with a lower number that are RUNNING or WAITING or count towards the
    budget: a trial only ever moves from WAITING to RUNNING to a finished state, so the k-th trial to
    count (by number) had at least k - 1 such trials ahead when it was checked, and at most ``budget``
    trials count.
    """

    def __init__(self, *, study: optuna.Study, objective: Objective, budget: int, heartbeat: int | None = None) -> None:
        self.study = study
        self.objective = objective
        self.budget = budget
        self.heartbeat = heartbeat
        """Seconds between a trial's attribute heartbeats (:func:`~ranksearch.study.heartbeat.beating`; None: off)."""
        self.number: int | None = None
        self.evaluated = False

    def __call__(self, trial: optuna.Trial) -> tuple[float, float] | float:
        with beating(trial, self.heartbeat):
            return self._guarded(trial)

    def _guarded(self, trial: optuna.Trial) -> tuple[float, float] | float:
        self.number, self.evaluated = trial.number, False
        writer = TrialWriter(trial)
        writer.worker(worker_label())
        ahead = sum(
            t.number < trial.number
            and t.rung == 0
            and (t.state in (TrialState.RUNNING, TrialState.WAITING) or t.counts_toward_budget)
            for t in records(self.study)
        )
        if ahead >= self.budget and not TrialRecord.is_promotion(trial.user_attrs):
            writer.ended(Outcome.NOT_EVALUATED, f"{ahead} trials ahead fill the budget")
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
    before_trial: Callable[[optuna.Study], None] | None = None,
    heartbeat: int | None = None,
    console: Console,
) -> int:
    """Run trials in this process until ``budget`` trials of the study count
    (:attr:`~ranksearch.results.record.TrialRecord.counts_toward_budget`), counting every worker's.

    Before asking for a trial, a worker fails stale trials, and waits while counted plus RUNNING trials
    fill the budget (a running trial may still fail, and its retry needs a worker); :class:`BudgetGuard` prunes
    the rare surplus trial of a race between workers before it is evaluated. ``after_trial`` runs whenever the
    study's trials change; ``before_trial`` just before this process asks for a trial (it may enqueue one).
    ``heartbeat``: seconds between the trials' heartbeats (None: none, for a study no other process watches).
    Returns how many trials this process completed.
    """
    guard = BudgetGuard(study=study, objective=objective, budget=budget, heartbeat=heartbeat)
    with _remember_sigint() as interrupted:
        return _optimize_loop(
            study, guard, timeout, console, interrupted, after_trial=after_trial, before_trial=before_trial
        )


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
    guard: BudgetGuard,
    timeout: float | None,
    console: Console,
    interrupted: threading.Event,
    *,
    after_trial: Callable[[], None] | None,
    before_trial: Callable[[optuna.Study], None] | None,
) -> int:
    budget = guard.budget
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
        fail_silent_trials(study)
        if counts["spent"] + counts[TrialState.RUNNING] >= budget:
            time.sleep(POLL_S)
            continue
        finished.clear()
        if before_trial is not None:
            before_trial(study)
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
            reason = TrialRecord.of(trial).reason or "see the log"
            console.print(f"trial {trial.number} failed: {reason}")
            if failures_in_a_row >= max(10, budget // 2):
                raise RanksearchError(
                    f"{failures_in_a_row} trials failed in a row (last: {reason}); fix the cause and rerun to resume"
                )
