"""Heartbeats through a storage server: a running trial's worker writes the time into a trial attribute.

Optuna's heartbeats live in the relational storage (a table a worker writes and every worker reads); its gRPC
storage proxy does not carry them. So a worker that talks to a storage server (``--storage grpc://HOST:PORT``)
records ``[unix time, seconds between beats]`` in the running trial's ``heartbeat`` attribute, and any worker that
finds a running trial silent for ``STALE_HEARTBEATS`` beats fails it and queues it again with the same parameters
and attributes, at most ``MAX_RETRIES`` times (as Optuna's ``RetryHeartbeatStaleTrialCallback`` does in a
database). Workers compare their own clocks with the recorded time: machines' clocks must agree within a beat or
two (NTP does). The attribute names are :mod:`ranksearch.results.record`'s.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch.results.record import HEARTBEAT, RETRIES, RETRY_OF, WORKER

STALE_HEARTBEATS = 3
"""A running trial whose last heartbeat is this many intervals old is failed and retried."""
MAX_RETRIES = 3
"""How often one trial is retried after its worker died."""
UNSIGNED_GRACE_S = 60.0
"""A running trial with no sign of life (no heartbeat, no worker label) this long after it started is an orphan."""
_NOT_CARRIED = frozenset({HEARTBEAT, WORKER})


@contextlib.contextmanager
def beating(trial: optuna.Trial, every: int | None) -> Iterator[None]:
    """Around a trial's evaluation: with ``every`` (seconds), record a heartbeat now and then every ``every`` seconds
    from a thread, which stops before the block ends; with None, nothing (the storage keeps Optuna's heartbeats)."""
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
    or it shows no sign of life at all (no heartbeat, no worker label) ``UNSIGNED_GRACE_S`` after it started: its
    process died between creating it and evaluating it, before even Optuna's first heartbeat in a database (found
    by ``benchmarks/chaos.py``: such a trial held the last slot of the budget forever). A labelled trial without
    this heartbeat is watched by Optuna's heartbeats in the database."""
    beat = trial.user_attrs.get(HEARTBEAT)
    if isinstance(beat, list) and len(beat) == 2:
        return now - beat[0] > STALE_HEARTBEATS * beat[1]
    if WORKER in trial.user_attrs or trial.datetime_start is None:
        return False
    return now - trial.datetime_start.timestamp() > UNSIGNED_GRACE_S
