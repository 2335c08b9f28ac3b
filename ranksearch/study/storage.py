"""The study's storage, shared by every worker: opening it, the storage server, the study's identity.

Optuna's relational storage is the distributed engine: workers on any machine share one study
through PostgreSQL (or, on one machine, the embedded SQLite file), directly or through its gRPC storage
server. Running trials beat through an attribute (:mod:`ranksearch.study.heartbeat`) in every storage.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sqlite3
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from rich.console import Console

from ranksearch.errors import RanksearchError
from ranksearch.results import STORAGE_FILE
from ranksearch.results.record import IDENTITY, OBJECTIVES, SETTINGS
from ranksearch.study.settings import RunSettings
from ranksearch.util import GRPC_SCHEME, describe, digest, grpc_storage, sqlite_url

POLL_S = 1.0
"""How often a worker with nothing to run looks at the study again."""
SQLITE_BUSY_TIMEOUT_S = 60


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna relational storage at ``url``; for ``grpc://HOST:PORT`` a proxy of the storage server there
    (``ranksearch serve-storage``).

    SQLite runs in WAL mode with a long busy timeout, and every transaction takes the write lock up
    front (``BEGIN IMMEDIATE``): with pysqlite's default deferred transactions, two workers can pop
    the same queued trial (17 of 90 trials were evaluated twice with 3 processes; none this way).
    """
    if url.startswith(GRPC_SCHEME):
        return grpc_storage(url)
    sqlite = url.startswith("sqlite:///")
    if sqlite:
        _enable_wal(Path(url.removeprefix("sqlite:///")))
    storage = optuna.storages.RDBStorage(
        url,
        engine_kwargs={"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "isolation_level": None}} if sqlite else {},
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


def serve_storage(url: str, *, host: str, port: int, console: Console) -> None:
    """Serve the storage at ``url`` (a database URL) to workers over gRPC on ``host:port`` until interrupted: Optuna's
    storage proxy server, so that workers need neither a database driver nor its credentials."""
    if url.startswith(GRPC_SCHEME):
        raise RanksearchError(f"--storage {url}: serve a database (postgresql://..., sqlite:///...), not a server")
    try:
        storage = open_storage(url)
        storage.get_all_studies()  # fails now on an unreachable database, not at the first worker
    except RanksearchError:
        raise
    except Exception as exc:
        raise RanksearchError(
            f"--storage {url}: cannot be opened ({describe(exc)}); check the URL and that the database is up"
        ) from None
    _check_port_free(host, port)
    console.print(f"serving {_without_password(url)} on grpc://{host}:{port}; workers: --storage grpc://HOST:{port}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.run_grpc_proxy_server(storage, host=host, port=port)


def _check_port_free(host: str, port: int) -> None:
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise RanksearchError(
            f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); pick a free port or another --host"
        ) from None


def _without_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def storage_url(settings: RunSettings, directory: Path) -> str:
    """``--storage``, or the SQLite file in the study's results directory."""
    return settings.infra.storage or sqlite_url(directory / STORAGE_FILE)


def check_existing_study(settings: RunSettings, directory: Path) -> None:
    """Before anything is loaded: ``--storage`` opens (an unreachable server fails now), and a study of this
    name there was run with the same settings."""
    if settings.infra.storage is None and not (directory / STORAGE_FILE).is_file():
        return
    try:
        storage = open_storage(storage_url(settings, directory))
        study_id = storage.get_study_id_from_name(settings.name())
    except KeyError:
        return
    except RanksearchError:
        raise
    except Exception as exc:  # sqlalchemy and driver errors: malformed or unreachable URLs, unreadable files
        raise _storage_error(settings, directory, exc) from None
    _check_identity(settings, storage.get_study_user_attrs(study_id).get(IDENTITY.key))


def open_study(settings: RunSettings, directory: Path) -> optuna.Study:
    """Create or resume the study ``settings`` describe (refused when it was run with another identity)."""
    database = directory / STORAGE_FILE
    new_database = settings.infra.storage is None and not database.exists()
    try:
        study = optuna.create_study(
            storage=open_storage(storage_url(settings, directory)),
            sampler=sampler(settings),
            study_name=settings.name(),
            directions=["maximize", "minimize"],
            load_if_exists=True,
        )
    except RanksearchError:
        raise
    except Exception as exc:  # sqlalchemy and driver errors: malformed or unreachable URLs, a full disk
        if new_database:
            _remove_database(database)
        raise _storage_error(settings, directory, exc) from None
    recorded = IDENTITY.read(study) if IDENTITY.stored(study) else None
    _check_identity(settings, recorded)
    if recorded is None:  # a new study: its second objective is the latency relative to the dense model's
        study.set_metric_names(["accuracy", "relative_latency"])
        OBJECTIVES.write(study, {"latency": "relative"})
        IDENTITY.write(study, settings.identity())
    SETTINGS.write(study, settings.to_flat())  # the latest budget and timeout, for workers to follow
    return study


NSGA2_POPULATION = 10
"""NSGA-II's population: about half of what a default run queues (anchors and warm starts, which join the populations
as they complete), so that its first generations are the queued configs and their children rather than random draws."""


def sampler(settings: RunSettings) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``--sampler`` names, seeded by ``--seed``."""
    seed = settings.problem.seed
    name = settings.search.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=NSGA2_POPULATION)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)
    return optuna.samplers.RandomSampler(seed=seed)


def _check_identity(settings: RunSettings, recorded: dict[str, object] | None) -> None:
    if recorded is None:
        return
    recorded = RunSettings.recorded_identity(recorded)  # keys added since the study was made
    if digest(recorded) == settings.identity_digest():
        return
    identity = settings.identity()
    key = next((k for k in {**recorded, **identity} if recorded.get(k) != identity.get(k)), None)
    if key is None:  # equal values written differently (1 and 1.0)
        return
    value = recorded.get(key)
    option = f"--{key.replace('_', '-')}"
    if key == "space_digest":
        same = "the search space file the study was started with"
    elif isinstance(value, bool):
        same = option if value else f"--no-{option[2:]}"
    else:
        same = f"without {option}" if value is None else f"{option} {value}"
    raise RanksearchError(
        f"study {settings.name()!r} exists with {key}={value!r}, not {identity.get(key)!r}; "
        f"rerun with the same settings ({same}) or pass --study-name for a new study"
    )


def _storage_error(settings: RunSettings, directory: Path, exc: Exception) -> RanksearchError:
    storage = settings.infra.storage
    if storage is None:
        return RanksearchError(
            f"{directory / STORAGE_FILE}: cannot be opened or written ({describe(exc.__cause__ or exc)}); "
            "check that its disk has room and is writable, or pass another --results-dir"
        )
    if isinstance(exc, ImportError):
        return RanksearchError(
            f"--storage {storage}: no database driver for it ({describe(exc.__cause__ or exc)}); "
            "install one (pip install 'ranksearch[dist]' for postgresql+psycopg2://) and name it in the URL"
        )
    return RanksearchError(
        f"--storage {storage}: cannot be opened ({describe(exc)}); "
        "check the URL (dialect+driver://user:password@host:port/database) and that the server is up"
    )


def _remove_database(database: Path) -> None:
    """A SQLite database this run created but could not set up (a full disk), with its folder if left empty."""
    for path in (database, *(database.with_name(database.name + s) for s in ("-wal", "-shm", "-journal"))):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        database.parent.rmdir()
