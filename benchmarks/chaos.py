"""Chaos: a long study of cheap trials while workers are killed at random and restarted, the storage server once.

    python benchmarks/chaos.py [--trials 200] [--workers 4] [--kill-every 3] [--backends sqlite postgresql grpc]

Per backend (embedded SQLite; a throwaway PostgreSQL server, tests/pgcluster.py; the same behind
``ranksearch serve-storage``), ``--workers`` worker processes share one study through
:func:`ranksearch.study.budget.optimize_to_budget` (the loop every ``ranksearch`` worker runs: budget, heartbeats,
stale-trial retry) with cheap trials (``--trial-seconds`` of sleep). Every ``--kill-every`` seconds (uniformly 0.5x to
1.5x) one worker, chosen at random, gets SIGKILL and a fresh one starts; with ``grpc`` the storage server is also
killed once, halfway, and started again on the same port. Once the budget is complete, the running trials left by
killed workers are failed (after the stale-heartbeat grace) as the next worker would. Prints, per backend and run
(undisturbed, then chaos): wall time, kills, completed trials lost (seen COMPLETE once, not at the end; must be 0),
duplicate trial numbers (0), trials never finished after the run (RUNNING or WAITING; 0), completed trials (the
budget, exactly), failed trials (the killed ones) and retries.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from ranksearch.results.record import RETRY_OF
from ranksearch.study.budget import optimize_to_budget
from ranksearch.study.heartbeat import STALE_HEARTBEATS, fail_silent_trials
from ranksearch.study.storage import open_storage

HEARTBEAT_S = 1
STUDY = "chaos"


def worker(url: str, budget: int, trial_seconds: float) -> None:
    """One worker process: trials until the study's budget is complete."""

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 0.0, 1.0)
        time.sleep(trial_seconds)
        return x, 1.0 - x

    study = optuna.load_study(study_name=STUDY, storage=open_storage(url))
    optimize_to_budget(study, objective, budget=budget, heartbeat=HEARTBEAT_S, console=Console(quiet=True))


@dataclass
class Outcome:
    backend: str
    run: str
    seconds: float
    kills: int
    restarts: int
    """Workers that died by themselves (with the storage server) and were started again."""
    lost: int
    duplicates: int
    unfinished: int
    complete: int
    failed: int
    retries: int


class StorageServer:
    """``ranksearch serve-storage`` in front of ``database`` on a free loopback port; restartable on that port."""

    def __init__(self, database: str) -> None:
        self.database = database
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "ranksearch.cli", "serve-storage", "--storage", self.database]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("the storage server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


def one_run(backend: str, url: str, args: argparse.Namespace, *, chaos: bool, server: StorageServer | None) -> Outcome:
    optuna.create_study(study_name=STUDY, storage=open_storage(url), directions=["maximize"] * 2)
    study = optuna.load_study(study_name=STUDY, storage=open_storage(url))
    command = [sys.executable, __file__, "--worker", url, "--trials", str(args.trials)]
    command += ["--trial-seconds", str(args.trial_seconds)]
    rng = random.Random(args.seed)
    workers = [subprocess.Popen(command) for _ in range(args.workers)]
    seen_complete: set[int] = set()
    kills, restarts, server_restarted = 0, 0, server is None
    start = time.monotonic()
    next_kill = start + args.kill_every * rng.uniform(0.5, 1.5)
    try:
        while True:
            with contextlib.suppress(Exception):  # the storage server may be down for a moment
                trials = study.get_trials(deepcopy=False)
                seen_complete |= {t.number for t in trials if t.state == TrialState.COMPLETE}
                if len(seen_complete) >= args.trials and all(w.poll() is not None for w in workers):
                    break
            if all(w.poll() is not None for w in workers) and not chaos:
                break
            now = time.monotonic()
            if chaos and now >= next_kill and len(seen_complete) < args.trials:
                victim = rng.randrange(len(workers))
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait()
                workers[victim] = subprocess.Popen(command)
                kills += 1
                next_kill = now + args.kill_every * rng.uniform(0.5, 1.5)
            if chaos and not server_restarted and len(seen_complete) >= args.trials // 2:
                server.kill()
                server.start()
                server_restarted = True
            for index, process in enumerate(workers):  # a worker that died with the server is started again
                if process.poll() not in (None, 0) and len(seen_complete) < args.trials:
                    workers[index] = subprocess.Popen(command)
                    restarts += 1
            time.sleep(0.2)
    finally:
        for process in workers:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
    seconds = time.monotonic() - start
    time.sleep(STALE_HEARTBEATS * HEARTBEAT_S + 1)  # the trials of killed workers go stale, as the next worker sees
    fail_silent_trials(study)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    states = [t.state for t in trials]
    complete = {t.number for t in trials if t.state == TrialState.COMPLETE}
    retries = sum(RETRY_OF in t.user_attrs for t in trials)
    optuna.delete_study(study_name=STUDY, storage=open_storage(url))
    return Outcome(
        backend,
        "chaos" if chaos else "undisturbed",
        seconds,
        kills,
        restarts,
        lost=len(seen_complete - complete),
        duplicates=len(numbers) - len(set(numbers)),
        unfinished=sum(s in (TrialState.RUNNING, TrialState.WAITING) for s in states),
        complete=len(complete),
        failed=states.count(TrialState.FAIL),
        retries=retries,
    )


@contextlib.contextmanager
def database(backend: str, directory: Path) -> Iterator[str]:
    """The database URL of ``backend``: a SQLite file in ``directory``, or a throwaway PostgreSQL server (``grpc``
    serves one)."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'chaos.db'}"
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from pgcluster import throwaway_postgres

    with throwaway_postgres() as url:
        optuna.storages.RDBStorage(url)  # the tables, before processes race to create them
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills, on average")
    parser.add_argument("--trial-seconds", type=float, default=0.3)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql", "grpc"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.trials, args.trial_seconds)
        return
    console = Console(width=160)
    outcomes: list[Outcome] = []
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as tmp, database(backend, Path(tmp)) as db:
            server = None
            if backend == "grpc":
                server = StorageServer(db)
                server.start()
            try:
                for chaos in (False, True):
                    url = db if server is None else server.url
                    outcomes.append(one_run(backend, url, args, chaos=chaos, server=server))
                    console.print(outcomes[-1])
            finally:
                if server is not None:
                    server.kill()
    title = f"{args.trials} trials of {args.trial_seconds} s, {args.workers} workers, a kill every ~{args.kill_every} s"
    table = Table(title=title)
    columns = ("backend", "run", "wall s", "kills", "restarts", "lost", "duplicates", "unfinished", "complete")
    columns += ("failed", "retries")
    for column in columns:
        table.add_column(column)
    for o in outcomes:
        counts = (o.kills, o.restarts, o.lost, o.duplicates, o.unfinished, o.complete, o.failed, o.retries)
        table.add_row(o.backend, o.run, f"{o.seconds:.0f}", *map(str, counts))
    console.print(table)
    console.print("targets: lost 0, duplicates 0, unfinished 0, complete = --trials")


if __name__ == "__main__":
    main()
