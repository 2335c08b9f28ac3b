"""The live view: optuna-dashboard on a study's storage (the optional ``dashboard`` extra)."""

from __future__ import annotations

from pathlib import Path

import optuna
from rich.console import Console

from ranksearch.errors import RanksearchError
from ranksearch.results import load_study, locate_study
from ranksearch.util import GRPC_SCHEME


def serve_dashboard(
    ref: str | Path,
    *,
    results_dir: Path = Path("results"),
    storage: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    console: Console,
) -> None:
    """Serve optuna-dashboard on the storage holding study ``ref`` until interrupted.

    The dashboard draws its own Pareto front from every COMPLETE trial; it ignores the study's
    constraints (``--max-accuracy-drop``, ``--max-latency-ms``), which ``ranksearch show`` applies.
    """
    try:
        import optuna_dashboard
    except ImportError:
        raise RanksearchError(
            "optuna-dashboard is not installed; pip install 'ranksearch[dashboard]' (or optuna-dashboard)"
        ) from None
    load_study(ref, results_dir=results_dir, storage=storage)  # one-line errors for a missing study
    url, name = locate_study(ref, results_dir=results_dir, storage=storage)
    if url.startswith(GRPC_SCHEME):
        raise RanksearchError(
            f"--storage {url}: optuna-dashboard reads a database, not a storage server; pass the server's database URL"
        )
    opened = optuna.storages.get_storage(url)
    study_id = opened.get_study_id_from_name(name)
    console.print(
        f"optuna-dashboard: http://{host}:{port}/dashboard/studies/{study_id} ({name}); Ctrl-C stops it. "
        "Its Pareto front counts infeasible trials too: `ranksearch show` gives the feasible front."
    )
    try:
        optuna_dashboard.run_server(opened, host=host, port=port)
    except OSError as exc:
        raise RanksearchError(f"dashboard at {host}:{port}: {exc.strerror or exc}; pass a free --port") from None
