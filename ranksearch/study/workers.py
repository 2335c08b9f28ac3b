"""Workers: processes, on this machine or any other, that run an existing study's trials until its budget is complete.

``ranksearch worker STUDY --storage URL`` joins a study from any machine; ``ranksearch run --workers N``
starts N local worker processes. Optuna's storage hands out the trials; :mod:`ranksearch.study.storage`
keeps the budget exact and retries the trials of workers that died.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console

from ranksearch.errors import USER_ERRORS, RanksearchError
from ranksearch.measure.latency import torch_threads
from ranksearch.results import STORAGE_FILE, load_study
from ranksearch.results.record import BASELINE, MODEL, SETTINGS
from ranksearch.study.budget import optimize_to_budget, trial_counts
from ranksearch.study.heartbeat import fail_silent_trials
from ranksearch.study.objective import Objective
from ranksearch.study.prepared import PreparedSearch, evaluator_factory
from ranksearch.study.problem import load_space
from ranksearch.study.progress import quiet_optuna
from ranksearch.study.settings import RunSettings
from ranksearch.study.storage import POLL_S, open_storage, worker_label
from ranksearch.util import file_digest, sqlite_url

STOP_GRACE_S = 10.0
"""Seconds a local worker gets to mark its trial failed after Ctrl-C before it is terminated."""


def join_study(
    study_name: str,
    *,
    storage: str | None = None,
    results_dir: Path = Path("results"),
    threads: int | None = None,
    data_root: Path | None = None,
    checkpoint: Path | None = None,
    space: Path | None = None,
    trust_checkpoint: bool = False,
    console: Console | None = None,
) -> int:
    """Run trials of an existing study until its budget is complete; return how many this worker completed.

    Model, dataset, space, evaluator, budget, heartbeat and baseline are the study's (recorded by
    ``ranksearch run``); ``data_root``, ``checkpoint`` and ``space`` point at this machine's copies
    (default: the paths the study recorded), which must match the study's digests. ``threads``
    defaults to the study's. Without ``storage`` the study is ``results_dir/<study>/study.db``.
    ``trust_checkpoint`` is this worker's own say (never the study's): whether a checkpoint holding more than
    tensors may be unpickled (see :func:`ranksearch.models.load_checkpoint`).
    """
    console = console or Console(stderr=True)
    study = load_study(study_name, results_dir=results_dir, storage=storage)
    url = storage or sqlite_url(results_dir / study_name / STORAGE_FILE)
    if not SETTINGS.stored(study):
        raise RanksearchError(f"study {study_name!r} has no recorded settings; start it with `ranksearch run` first")
    recorded = SETTINGS.read(study)
    if not BASELINE.stored(study):
        raise RanksearchError(
            f"study {study_name!r} has no baseline yet; start workers once `ranksearch run` has measured it"
        )
    changes: dict[str, object] = {"storage": storage, "workers": 1, "trust_checkpoint": trust_checkpoint}
    local = {"threads": threads, "data_root": data_root, "space": space}
    changes.update({k: v for k, v in local.items() if v is not None})
    changes["checkpoint"] = checkpoint or recorded.get("checkpoint") or MODEL.read(study).get("checkpoint")
    settings = RunSettings.from_flat(recorded, **changes)
    settings.validate()
    _check_local_files(settings, recorded)
    timing_device = settings.infra.devices()[1]
    factory = evaluator_factory(settings)
    label = worker_label()
    with torch_threads(settings.infra.threads), quiet_optuna():
        study = optuna.load_study(study_name=study.study_name, storage=open_storage(url))
        space = load_space(settings.search.space, timing_device, console, backend=settings.evaluation.latency_backend)
        search, study = PreparedSearch.prepare(
            settings, factory, space=space, open_study=lambda: study, console=console
        )
        budget = settings.search.budget
        console.print(f"worker {label}: joined study {study.study_name} ({_progress(study, budget)})")
        done = optimize_to_budget(
            study,
            Objective(search),
            before_trial=search.fill_gap,
            budget=budget,
            timeout=settings.search.timeout,
            heartbeat=settings.infra.heartbeat,
            console=console,
        )
    console.print(f"worker {label}: completed {done} trials; study {study.study_name}: {_progress(study, budget)}")
    return done


def _check_local_files(settings: RunSettings, recorded: dict[str, object]) -> None:
    """The study's trained weights and search space must be on this machine, the space unchanged."""
    checkpoint, space = settings.problem.checkpoint, settings.search.space
    if checkpoint is None or not checkpoint.is_file():
        raise RanksearchError(
            f"checkpoint {checkpoint}: the study's trained weights are not on this machine; "
            "copy that file here and pass --checkpoint PATH"
        )
    if space is None or not space.is_file():
        raise RanksearchError(
            f"search space {space}: not on this machine; copy the study's space file and pass --space PATH"
        )
    if file_digest(space) != recorded.get("space_digest"):
        raise RanksearchError(
            f"--space {space}: differs from the search space the study was started with; pass that file"
        )


def _progress(study: optuna.Study, budget: int) -> str:
    counts = trial_counts(study)
    return f"{counts['spent']}/{budget} evaluated, {counts[TrialState.RUNNING]} running"


def run_local_workers(
    study: optuna.Study,
    settings: RunSettings,
    *,
    storage: str,
    checkpoint: Path | None,
    refresh: Callable[[], None],
    console: Console,
) -> None:
    """Start ``--workers`` worker processes on ``study`` (at ``storage``) and wait for them.

    Each runs with ``--threads`` threads. While they run, ``refresh`` runs whenever the study's
    trials change, and stale trials are failed for retry.
    Raises when every worker stopped with an error before the budget was complete.
    """
    context = multiprocessing.get_context("spawn")
    kwargs = {
        "study_name": study.study_name,
        "storage": storage,
        "threads": settings.infra.threads,
        "data_root": settings.problem.data_root,
        "checkpoint": checkpoint,
        "space": settings.search.space,
        "trust_checkpoint": settings.problem.trust_checkpoint,
    }
    workers = settings.infra.workers
    processes = [
        context.Process(target=_worker_process, kwargs=kwargs, name=f"ranksearch-worker-{i}") for i in range(workers)
    ]
    console.print(f"starting {workers} workers with {settings.infra.threads or 'all'} thread(s) each")
    for process in processes:
        process.start()
    seen = None
    try:
        while alive := [p for p in processes if p.is_alive()]:
            counts = trial_counts(study)
            if counts != seen:
                refresh()
                seen = counts
            fail_silent_trials(study)
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=POLL_S)
    finally:
        _stop(processes)
    refresh()
    codes = [p.exitcode for p in processes]
    spent = trial_counts(study)["spent"]
    budget = settings.search.budget
    if spent < budget and all(code != 0 for code in codes):
        raise RanksearchError(
            f"all {len(processes)} workers stopped with {spent}/{budget} trials evaluated "
            f"(exit codes {codes}); fix the cause named above and rerun to resume"
        )


def _stop(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """Interrupt running workers (their trial is marked failed), then terminate those that linger."""
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGINT)
    for process in processes:
        process.join(STOP_GRACE_S)
        if process.is_alive():
            process.terminate()
            process.join()


def _worker_process(**kwargs: object) -> None:
    """A local worker's entry point: one line and exit code 2 for a user error, 130 for Ctrl-C."""
    try:
        join_study(**kwargs)  # type: ignore[arg-type]
    except USER_ERRORS as exc:
        print(f"worker {worker_label()}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
