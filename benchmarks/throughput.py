"""Completed trials per hour with 1, 2, 4 and 8 workers, on the embedded SQLite storage and on PostgreSQL.

    python benchmarks/throughput.py [--model resnet18] [--budget 8] [--workers 1 2 4 8] [--postgres URL] [--tiny]

Runs a fresh study per storage and worker count (``ranksearch run --workers N``, embedded or ``--storage``
PostgreSQL) of ``--budget`` trials in a temporary results directory; the baseline comes from the training
cache (trained first if missing, not timed). One worker uses torch's default threads; N workers split the
cores this process may use (at least 1 thread each, so more workers than cores share them). "trials/h"
counts COMPLETE trials between the first trial's start and the last one's end; "x 1 worker" is that rate
over the same storage's one-worker rate; "wall s" is the whole run (loading, baseline measurement, worker
start-up, test of the front). Promotion and recovery are off (``--promote-steps 0``, ``--final-epochs 0``): they
run after the budget's trials and would only add the same time to every row. Without ``--postgres`` a throwaway
local server is started (tests/pgcluster.py; needs ``postgresql``), on the same cores. ``--tiny`` uses the tests'
tiny problem, to check that the script works.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from ranksearch.study import RunSettings, run_search

TINY = {
    "train_subset": 512,
    "eval_subset": 256,
    "baseline_epochs": 1,
    "finetune_steps": 3,
    "batch_size": 64,
    "calib_batches": 1,
}


def trials_per_hour(study: optuna.Study) -> tuple[int, float]:
    """COMPLETE trials, and their rate per hour from the first trial's start to the last trial's end."""
    finished = [t for t in study.trials if t.datetime_complete is not None]
    complete = sum(t.state == TrialState.COMPLETE for t in finished)
    span = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
    return complete, 3600.0 * complete / span.total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8], help="worker counts to compare")
    parser.add_argument("--postgres", help="SQLAlchemy URL of a PostgreSQL database (default: a throwaway server)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny problem (checks the script)")
    args = parser.parse_args()
    if min(args.workers) < 1:
        parser.error("--workers: every count must be >= 1")
    counts = sorted(set(args.workers))
    cores = len(os.sched_getaffinity(0))
    console = Console()
    if max(counts) > cores:
        console.print(
            f"[yellow]{cores} cores here: {max(counts)} workers share them, which measures contention, not scale-out"
        )
    table = Table(title=f"{args.model}: completed trials per hour ({args.budget} trials per study, {cores} cores)")
    for column in ("storage", "workers", "threads each", "complete", "trials/h", "x 1 worker", "wall s"):
        table.add_column(column, justify="left" if column == "storage" else "right")
    with ExitStack() as stack:
        results = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        postgres = args.postgres or stack.enter_context(_throwaway_postgres())
        for storage in ("embedded", "postgresql"):
            single = None
            for workers in counts:
                settings = RunSettings.of(
                    model=args.model,
                    budget=args.budget,
                    workers=workers,
                    storage=postgres if storage == "postgresql" else None,
                    study_name=f"{storage}-{workers}",
                    results_dir=results,
                    promote_steps="0",
                    final_epochs=0,
                    **(TINY if args.tiny else {}),
                )
                console.print(f"{storage}, {workers} worker(s) ...")
                start = time.perf_counter()
                result = run_search(settings, console=Console(stderr=True, quiet=True))
                wall = time.perf_counter() - start - result.phase_seconds.get("baseline_training", 0.0)
                complete, rate = trials_per_hour(result.study)
                single = rate if workers == 1 else single
                console.print(f"  {complete} complete, {rate:.0f} trials/h, {wall:.0f} s")
                table.add_row(
                    storage,
                    str(workers),
                    str(settings.with_worker_threads().infra.threads or "default"),
                    str(complete),
                    f"{rate:.0f}",
                    "" if single is None else f"{rate / single:.2f}x",
                    f"{wall:.0f}",
                )
    console.print(table)


def _throwaway_postgres() -> AbstractContextManager[str]:
    """tests/pgcluster.py's throwaway PostgreSQL server."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from pgcluster import throwaway_postgres

    return throwaway_postgres()


if __name__ == "__main__":
    main()
