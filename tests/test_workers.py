"""Workers and faults on a real tiny study: a real PostgreSQL server, real processes, real SIGKILLs."""

from __future__ import annotations

import datetime
import functools
import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from conftest import require_tool, space_yaml
from optuna.trial import FrozenTrial, TrialState
from pgcluster import throwaway_postgres
from rich.console import Console

from ranksearch import util
from ranksearch.errors import RanksearchError
from ranksearch.models import build_model
from ranksearch.results import front_trials
from ranksearch.results.phases import WALL, phase_seconds
from ranksearch.results.record import WENT_SILENT, TrialRecord, records
from ranksearch.study import heartbeat
from ranksearch.study.budget import optimize_to_budget
from ranksearch.study.storage import open_storage
from ranksearch.study.workers import join_study
from ranksearch.util import storage_for

SPACE = {  # the tiny space with fewer variants: six trials of random configs run in several processes
    "techniques": {"spatial_conv": ["keep", "svd", "spatial_svd"], "pointwise_conv": ["keep", "svd"]},
    "int8": False,
    "data_aware": False,
}
BUDGET = 6
PROMOTE_STEPS = "12,24"
"""Promotion rungs long enough for a kill to land inside one (12 steps: seconds; the polls come every 0.2 s)."""
HEARTBEAT = 3
WAIT_S = 900.0
pytestmark = pytest.mark.timeout(1800)  # searches in several processes, each wait bounded by WAIT_S


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server; missing PostgreSQL fails under CI (CI=true) and skips elsewhere."""
    require_tool("postgresql")
    with throwaway_postgres() as url:
        optuna.storages.RDBStorage(url)  # Optuna's tables, created once before processes race to create them
        yield url


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("workers")
    (workdir / "tiny.yaml").write_text(space_yaml(**SPACE))
    return workdir


def cli(workdir: Path, command: str, *args: str) -> list[str]:
    """A ``ranksearch`` command line on the tiny problem of tests/test_study.py."""
    common = ["--results-dir", str(workdir / "results"), "--data-root", str(workdir / "data")]
    if command == "run":
        common += [
            *("--model", "resnet18", "--space", str(workdir / "tiny.yaml"), "--budget", str(BUDGET)),
            *("--train-subset", "512", "--eval-subset", "256", "--baseline-epochs", "1", "--finetune-steps", "3"),
            *("--batch-size", "64", "--calib-batches", "1", "--threads", "1", "--sampler", "random"),
            *("--heartbeat", str(HEARTBEAT), "--no-sensitivity", "--no-early-reject"),
            *("--promote-steps", PROMOTE_STEPS, "--promote-fraction", "0.5", "--final-epochs", "0"),
        ]
    return [sys.executable, "-m", "ranksearch.cli", command, *args, *common]


def start(workdir: Path, command: list[str], log: str) -> subprocess.Popen:
    env = {**os.environ, "RANKSEARCH_CACHE_DIR": str(workdir / "cache")}
    with open(workdir / log, "ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(condition: Callable[[], object], what: str, *processes: subprocess.Popen) -> object:
    """Poll ``condition`` until it returns something truthy; fail if a process exits first or time runs out."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for process in processes:
            assert process.poll() is None, f"{process.args[3]} exited with {process.returncode} before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@functools.cache
def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """One storage, one connection pool, per database URL the tests poll: a storage made per poll (every 0.2 s)
    opens connections faster than garbage collection closes them, and PostgreSQL refused the 101st ("too many
    clients already") while a test waited for a baseline."""
    return optuna.storages.RDBStorage(url)


def load(name: str, storage: str | optuna.storages.BaseStorage) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=rdb_storage(storage) if isinstance(storage, str) else storage)
    except KeyError:
        return None


def complete_trials(database: Path) -> int:
    """COMPLETE trials in an embedded study, read without creating anything (0 while the run sets it up)."""
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            return connection.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def running_trial(name: str, storage: str | optuna.storages.BaseStorage) -> FrozenTrial | None:
    """A trial some worker is evaluating (its config is recorded, so the kill lands mid-trial)."""
    study = load(name, storage)
    running = [] if study is None else study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return next((t for t in running if "config" in t.user_attrs and "worker" in t.user_attrs), None)


def kill_worker_of(trial: FrozenTrial) -> int:
    pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    return pid


def check_budget_and_retry(study: optuna.Study, killed: FrozenTrial) -> None:
    """Exactly the budget complete, unique numbers, nothing left running, the killed trial failed and retried
    once to completion with its params."""
    trials = study.trials
    assert sum(r.counts_toward_budget for r in records(study)) == BUDGET
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get(heartbeat.RETRY_OF) == killed.number]
    outcomes = [(r.outcome, r.reason) for r in map(TrialRecord.of, retries)]
    assert [t.state for t in retries].count(TrialState.COMPLETE) == 1, outcomes
    assert all(t.params == trials[killed.number].params for t in retries)


def check_outcome(study: optuna.Study, killed: FrozenTrial, directory: Path) -> None:
    """:func:`check_budget_and_retry`, the results files agree with the storage, and every promotion ran once."""
    check_budget_and_retry(study, killed)
    trials = study.trials
    rows = pd.read_csv(directory / "trials.csv")
    assert list(rows["trial"]) == [t.number for t in trials]
    assert list(rows["state"]) == [t.state.name for t in trials]
    pareto = json.loads((directory / "pareto.json").read_text())
    front = {t.number for t in front_trials(study)}
    assert {m["trial"] for m in pareto["front"]} == front
    assert len(pd.read_csv(directory / "pareto.csv")) == len(front)
    assert not list(directory.glob(".*.tmp"))
    promotions = [r for r in records(study) if r.rung > 0 and r.state == TrialState.COMPLETE]
    assert promotions and len({(r.promotes, r.rung) for r in promotions}) == len(promotions)  # each once


@pytest.fixture(scope="module")
def resumed(workdir: Path, postgres_url: str) -> tuple[FrozenTrial, dict[int, list[float]]]:
    """kill -9 of the whole single-process run on PostgreSQL mid-trial, then the same command again, which must
    succeed (on SQLite, the promotion test below kills and reruns the whole run).

    Returns the killed trial and the values of the trials complete at the kill."""
    command = cli(workdir, "run", "--study-name", "resume", "--storage", postgres_url)
    url = postgres_url
    run = start(workdir, command, "resume.log")

    def two_complete_and_one_running() -> FrozenTrial | None:
        study = load("resume", url)  # Optuna's tables exist already (the server fixture made them)
        done = study is not None and len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2
        return running_trial("resume", url) if done else None

    killed = wait_for(two_complete_and_one_running, "two complete trials and a running one", run)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    before = {t.number: t.values for t in load("resume", url).get_trials(states=(TrialState.COMPLETE,))}
    rerun = start(workdir, command, "resume.log")
    assert rerun.wait(timeout=WAIT_S) == 0, (workdir / "resume.log").read_text()[-3000:]
    return killed, before


def test_run_killed_during_a_promotion_resumes_it(workdir: Path) -> None:
    """kill -9 of the run while a promotion (a trial of its own) is evaluated: the rerun retries it with its rung
    and steps, finishes the rungs, and every promotion is complete exactly once."""
    command = cli(workdir, "run", "--study-name", "promoted")
    url = f"sqlite:///{workdir / 'results' / 'promoted' / 'study.db'}"
    run = start(workdir, command, "promoted.log")

    def running_promotion() -> FrozenTrial | None:
        if complete_trials(workdir / "results" / "promoted" / "study.db") < BUDGET:
            return None
        trial = running_trial("promoted", url)
        return trial if trial is not None and trial.user_attrs.get("rung") else None

    killed = wait_for(running_promotion, "a running promotion", run)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    rerun = start(workdir, command, "promoted.log")
    assert rerun.wait(timeout=WAIT_S) == 0, (workdir / "promoted.log").read_text()[-3000:]
    study = load("promoted", url)
    check_outcome(study, killed, workdir / "results" / "promoted")
    retried = [t for t in study.trials if t.user_attrs.get(heartbeat.RETRY_OF) == killed.number]
    assert all(t.user_attrs["rung"] == killed.user_attrs["rung"] for t in retried)
    assert all(t.user_attrs["finetune_steps"] == killed.user_attrs["finetune_steps"] for t in retried)


def test_killed_run_resumes_with_every_completed_trial(workdir: Path, resumed, postgres_url: str) -> None:
    killed, before = resumed
    study = load("resume", postgres_url)
    assert {n: study.trials[n].values for n in before} == before
    check_outcome(study, killed, workdir / "results" / "resume")


def test_workers_share_the_budget_and_retry_a_killed_workers_trial(workdir: Path, postgres_url: str) -> None:
    """`run --workers 2` plus a `worker` on PostgreSQL; one of the three is killed mid-trial."""
    run = start(
        workdir, cli(workdir, "run", "--study-name", "pg", "--storage", postgres_url, "--workers", "2"), "pg.log"
    )
    wait_for(lambda: (study := load("pg", postgres_url)) and "baseline" in study.user_attrs, "the baseline", run)
    worker = start(workdir, cli(workdir, "worker", "pg", "--storage", postgres_url, "--threads", "1"), "pg.log")
    killed = wait_for(lambda: running_trial("pg", postgres_url), "a running trial", run)
    pid = kill_worker_of(killed)
    if pid == worker.pid:
        worker.wait()
    assert run.wait(timeout=WAIT_S) == 0, (workdir / "pg.log").read_text()[-3000:]
    if pid != worker.pid:
        assert worker.wait(timeout=WAIT_S) == 0
    check_outcome(load("pg", postgres_url), killed, workdir / "results" / "pg")


def test_worker_joins_a_complete_study_and_runs_nothing(workdir: Path, resumed, postgres_url: str) -> None:
    joined = join_study(
        "resume", storage=postgres_url, results_dir=workdir / "results", data_root=workdir / "data", threads=1
    )
    assert joined == 0


def test_worker_refuses_another_search_space(workdir: Path, resumed, postgres_url: str) -> None:
    other = workdir / "other.yaml"
    other.write_text(space_yaml(**SPACE, ranks=[0.5]))
    with pytest.raises(RanksearchError, match=r"other\.yaml: differs from the search space the study was started with"):
        join_study("resume", storage=postgres_url, results_dir=workdir / "results", space=other)


def test_worker_refuses_other_weights(workdir: Path, resumed, postgres_url: str) -> None:
    checkpoint = workdir / "untrained.pt"
    torch.save(build_model("resnet18", num_classes=10, in_channels=1, image_size=28).state_dict(), checkpoint)
    with pytest.raises(RanksearchError, match=r"untrained\.pt\) differ from the study's; pass --checkpoint"):
        join_study(
            "resume",
            storage=postgres_url,
            results_dir=workdir / "results",
            data_root=workdir / "data",
            checkpoint=checkpoint,
        )


def test_worker_refuses_a_missing_study(workdir: Path) -> None:
    with pytest.raises(RanksearchError, match=r"study 'nope': no study\.db"):
        join_study("nope", results_dir=workdir / "results")


def racing_objective(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", 0.0, 1.0)
    time.sleep(0.02)
    return x, 1.0 - x


def race_to_budget(url: str, budget: int) -> None:
    study = optuna.load_study(study_name="race", storage=open_storage(url))
    optimize_to_budget(study, racing_objective, budget=budget, console=Console(quiet=True))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_racing_workers_complete_exactly_the_budget(backend: str, tmp_path: Path, request) -> None:
    """Four processes with 20 ms trials race for the last slots: never more than the budget complete."""
    url = f"sqlite:///{tmp_path / 'race.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    budget = 24
    study = optuna.create_study(study_name="race", storage=open_storage(url), directions=["maximize"] * 2)
    for x in (0.1, 0.2, 0.3):
        study.enqueue_trial({"x": x})
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=race_to_budget, args=(url, budget)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(WAIT_S)
    assert [p.exitcode for p in processes] == [0] * 4
    trials = optuna.load_study(study_name="race", storage=url).trials
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == budget
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)]
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    if backend == "postgresql":
        optuna.delete_study(study_name="race", storage=url)


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ranksearch.cli", "serve-storage", *args]


@pytest.fixture(scope="module")
def storage_server(workdir: Path, postgres_url: str) -> Iterator[str]:
    """`ranksearch serve-storage` in front of the PostgreSQL server, on a free loopback port: its grpc:// URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start(workdir, serve_command("--storage", postgres_url, "--port", str(port)), "server.log")

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, "the storage server", server)
    yield f"grpc://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


def test_silent_trials_through_the_server_fail_once_and_retry(storage_server: str) -> None:
    """Through the storage server (no Optuna heartbeats): a running trial silent for 3 beats is failed and queued
    again with its parameters and attributes, once however many workers look; one beating is left alone; a config
    retried MAX_RETRIES times is not queued again."""
    study = optuna.create_study(study_name="beats", storage=storage_for(storage_server), directions=["maximize"])
    silent, alive, exhausted = (study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}) for _ in range(3))
    silent.set_user_attr("rung", 1)
    for trial, age in ((silent, 100.0), (alive, 1.0), (exhausted, 100.0)):
        trial.set_user_attr(heartbeat.HEARTBEAT, [time.time() - age, 10])
    exhausted.set_user_attr(heartbeat.RETRIES, heartbeat.MAX_RETRIES)
    with ThreadPoolExecutor(4) as pool:
        failed = [n for numbers in pool.map(heartbeat.fail_silent_trials, [study] * 4) for n in numbers]
    assert sorted(failed) == [silent.number, exhausted.number]
    trials = study.get_trials()
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert len(retries) == 1 and retries[0].system_attrs["fixed_params"] == trials[silent.number].params
    assert retries[0].user_attrs == {"rung": 1, heartbeat.RETRY_OF: silent.number, heartbeat.RETRIES: 1}
    assert trials[alive.number].state == TrialState.RUNNING


@pytest.mark.serial
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_trial_that_never_beat_is_failed_and_retried_after_the_grace(
    backend: str, tmp_path: Path, request, monkeypatch
) -> None:
    """A trial whose process died between creating it and its first heartbeat held the budget's last slot forever
    (benchmarks/chaos.py found it, on PostgreSQL before its worker label and on SQLite after it): UNSIGNED_GRACE_S
    after it started it is failed and queued again with its queued parameters, labelled or not; a younger one and
    a beating one are left alone."""
    url = f"sqlite:///{tmp_path / 'orphans.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    monkeypatch.setattr(heartbeat, "UNSIGNED_GRACE_S", 0.5)
    study = optuna.create_study(study_name="orphans", storage=open_storage(url))
    study.enqueue_trial({"x": 0.25}, user_attrs={"anchor": "uniform svd@0.25"})
    orphan, labelled = study.ask(), study.ask()
    labelled.set_user_attr("worker", "host:1")
    time.sleep(0.6)
    young, beating = study.ask(), study.ask()
    beating.set_user_attr(heartbeat.HEARTBEAT, [time.time(), 10])
    assert heartbeat.fail_silent_trials(study) == [orphan.number, labelled.number]
    retry = study.get_trials(states=(TrialState.WAITING,))
    assert len(retry) == 2 and retry[0].system_attrs["fixed_params"] == {"x": 0.25}
    assert retry[1].user_attrs == {heartbeat.RETRY_OF: labelled.number, heartbeat.RETRIES: 1}
    assert retry[0].user_attrs == {
        "anchor": "uniform svd@0.25",
        heartbeat.RETRY_OF: orphan.number,
        heartbeat.RETRIES: 1,
    }
    assert [study.trials[t.number].state for t in (young, beating)] == [TrialState.RUNNING] * 2
    optuna.delete_study(study_name="orphans", storage=url)


def test_a_trial_failed_as_silent_counts_only_until_its_last_beat(tmp_path: Path, monkeypatch) -> None:
    """A trial whose process was killed is failed when another process (or a resumed run, hours later) finds it
    silent: its time counts to its last heartbeat, or not at all without one, never the downtime; a trial that
    failed in its own process counts whole. `show` and the phase table read these records."""
    url = f"sqlite:///{tmp_path / 'silent.db'}"
    study = optuna.create_study(study_name="silent", storage=open_storage(url))
    start = datetime.datetime.now() - datetime.timedelta(hours=2)
    beat = [start.timestamp() + 40, 10]

    def failed(seconds: float, **attrs: object) -> int:
        trial = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs=attrs)
        trial.datetime_start, trial.datetime_complete = start, start + datetime.timedelta(seconds=seconds)
        study.add_trial(trial)
        return study.trials[-1].number

    killed = failed(7200, **{heartbeat.HEARTBEAT: beat})  # found silent two hours later
    stopped = failed(45, **{heartbeat.HEARTBEAT: beat})  # a user error stopped it in its own process
    diverged = failed(7200, **{heartbeat.HEARTBEAT: beat, "fail_reason": "loss diverged (nan)"})
    monkeypatch.setattr(heartbeat, "UNSIGNED_GRACE_S", 0.5)
    unbeating = study.ask()  # a single-process run killed before its first beat: no heartbeat, retried on resume
    time.sleep(0.6)
    assert heartbeat.fail_silent_trials(study) == [unbeating.number]
    by_number = {r.number: r for r in records(study)}
    silent = [by_number[n].went_silent for n in (killed, stopped, diverged, unbeating.number)]
    assert silent == [True, False, False, True]
    assert by_number[killed].duration_s == pytest.approx(40)
    assert by_number[stopped].duration_s == pytest.approx(45)
    assert by_number[diverged].duration_s == pytest.approx(7200)
    assert by_number[unbeating.number].duration_s is None
    assert by_number[killed].reason == by_number[unbeating.number].reason == WENT_SILENT
    assert phase_seconds(study)[WALL] == pytest.approx(40 + 45 + 7200)
    assert [r.went_silent for r in records(study, states=(TrialState.FAIL,))] == [True, False, False, True]


@pytest.mark.serial
def test_a_beating_trial_records_its_heartbeat_until_it_ends(storage_server: str) -> None:
    study = optuna.create_study(study_name="beating", storage=storage_for(storage_server))
    trial = study.ask()
    with heartbeat.beating(trial, 1):
        first = study.trials[0].user_attrs[heartbeat.HEARTBEAT]
        time.sleep(2.5)
        last = study.trials[0].user_attrs[heartbeat.HEARTBEAT]
    assert first[1] == 1 and last[0] - first[0] >= 1.9
    ended = study.trials[0].user_attrs[heartbeat.HEARTBEAT]
    time.sleep(1.5)
    assert study.trials[0].user_attrs[heartbeat.HEARTBEAT] == ended, "a beat after the block ended"
    study.tell(trial, 1.0)


def test_workers_through_the_storage_server_retry_a_killed_workers_trial(workdir: Path, storage_server: str) -> None:
    """`run` and a `worker` reach PostgreSQL only through `ranksearch serve-storage`; the worker is killed mid-trial:
    the run fails its silent trial, retries it, and ends with exactly the budget and unique trial numbers."""
    command = cli(workdir, "run", "--study-name", "grpc", "--storage", storage_server)
    run = start(workdir, [*command, "--promote-steps", "0", "--final-epochs", "0"], "grpc.log")
    url, proxy = storage_server, storage_for(storage_server)
    wait_for(lambda: (study := load("grpc", proxy)) and "baseline" in study.user_attrs, "the baseline", run)
    worker = start(workdir, cli(workdir, "worker", "grpc", "--storage", url, "--threads", "1"), "grpc.log")

    def workers_trial() -> FrozenTrial | None:
        trial = running_trial("grpc", proxy)
        return trial if trial is not None and trial.user_attrs["worker"].endswith(f":{worker.pid}") else None

    killed = wait_for(workers_trial, "a trial of the worker", run, worker)
    kill_worker_of(killed)
    worker.wait()
    assert run.wait(timeout=WAIT_S) == 0, (workdir / "grpc.log").read_text()[-3000:]
    study = load("grpc", proxy)
    check_budget_and_retry(study, killed)
    assert sum(t.user_attrs.get(heartbeat.RETRY_OF) == killed.number for t in study.trials) == 1  # retried once


def test_a_storage_server_address_nobody_answers_is_a_one_line_error(
    workdir: Path, storage_server: str, monkeypatch
) -> None:
    monkeypatch.setattr(util, "GRPC_CONNECT_TIMEOUT_S", 1.0)
    port = int(storage_server.rsplit(":", 1)[1])
    command = serve_command("--storage", f"sqlite:///{workdir / 'x.db'}", "--port", str(port))
    taken = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert taken.returncode == 2 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in taken.stderr
    with pytest.raises(RanksearchError, match=r"--storage grpc://127.0.0.1:1: no storage server answered in 1 s"):
        storage_for("grpc://127.0.0.1:1")
    with pytest.raises(RanksearchError, match=r"--storage grpc://nowhere: not a storage server address"):
        storage_for("grpc://nowhere")
