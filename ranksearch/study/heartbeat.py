"""Heartbeats: a running trial's worker writes the time into a trial attribute, in every storage.

A worker records ``[unix time, seconds between beats]`` in the running trial's ``heartbeat`` attribute before it
writes anything else on the trial, and any worker that finds a running trial silent for ``STALE_HEARTBEATS`` beats
fails it and queues it again with the same parameters and attributes, at most ``MAX_RETRIES`` times (as Optuna's
``RetryHeartbeatStaleTrialCallback`` does). One mechanism serves a database and a storage server alike: Optuna's
own heartbeats live in a table of the relational storage, which its gRPC storage proxy does not carry, and they
start after the trial is created, so a worker killed in between left a trial running forever (``benchmarks/
chaos.py`` found it on SQLite). Workers compare their own clocks with the recorded time: machines' clocks must
agree within a beat or two (NTP does). The attribute names are :mod:`ranksearch.results.record`'s.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch.results.record import HEARTBEAT, RETRIES, RETRY_OF, WORKER, last_heartbeat

STALE_HEARTBEATS = 3
"""A running trial whose last heartbeat is this many intervals old is failed and retried."""
MAX_RETRIES = 3
"""How often one trial is retried after its worker died."""
UNSIGNED_GRACE_S = 60.0
"""A running trial with no heartbeat this long after it started is an orphan (or was left by an earlier release)."""
_NOT_CARRIED = frozenset({HEARTBEAT, WORKER})


@contextlib.contextmanager
def beating(trial: optuna.Trial, every: int | None) -> Iterator[None]:
    """Around a trial's evaluation: with ``every`` (seconds), record a heartbeat now and then every ``every`` seconds
    from a thread, which stops before the block ends; with None, nothing (a study no other process watches)."""
    if every is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        trial.set_user_attr(HEARTBEAT, [time.time(), every])

    def keep_beating() -> None:
        while not stop.wait(every):
            try:
                beat()
            except (optuna.exceptions.UpdateFinishedTrialError, KeyError):  # failed as stale: the evaluation finds out
                return
            except Exception:  # the server restarting, a network blip: beat again next time
                continue

    beat()
    thread = threading.Thread(target=keep_beating, name=f"heartbeat-trial-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_silent_trials(study: optuna.Study) -> list[int]:
    """Fail the running trials that went silent (:func:`is_silent`) and queue each again (its parameters and
    attributes, :data:`RETRY_OF` and :data:`RETRIES` added) unless it was retried ``MAX_RETRIES`` times; returns the
    numbers failed. Of two workers failing the same trial, one succeeds: only it queues the retry."""
    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_silent(trial, now):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # it finished, or another worker failed it first
        failed.append(trial.number)
        retries = int(trial.user_attrs.get(RETRIES, 0))
        if retries < MAX_RETRIES:
            params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}  # a queued trial's own, if any
            attrs = {key: value for key, value in trial.user_attrs.items() if key not in _NOT_CARRIED}
            study.enqueue_trial(params, user_attrs={**attrs, RETRY_OF: trial.number, RETRIES: retries + 1})
    return failed


def is_silent(trial: FrozenTrial, now: float) -> bool:
    """Whether a running trial's process is gone: its :data:`HEARTBEAT` is older than ``STALE_HEARTBEATS`` beats,
    or it has none ``UNSIGNED_GRACE_S`` after it started: its process died between creating it and its first beat
    (such a trial held the last slot of the budget forever), or an earlier release, whose trials beat in Optuna's
    table, left it running when it was killed."""
    beat = last_heartbeat(trial.user_attrs)
    if beat is not None:
        return now - beat[0] > STALE_HEARTBEATS * beat[1]
    return trial.datetime_start is not None and now - trial.datetime_start.timestamp() > UNSIGNED_GRACE_S
