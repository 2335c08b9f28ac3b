"""Wall time of the search per phase: where a trial's seconds go, and the projection to 50 trials.

    python benchmarks/search_cost.py [--model resnet18] [--budget 10] [--threads 2]

Runs a fresh study (the baseline comes from the training cache; its training time is reported
apart) in a temporary results directory and prints, per phase, the total and the median per
trial, then the projected wall time of ``ranksearch run --budget 50``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ranksearch.results.record import records
from ranksearch.study import RunSettings, run_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--budget", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sampler", default="tpe")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as results:
        settings = RunSettings.of(
            model=args.model, budget=args.budget, threads=args.threads, sampler=args.sampler, results_dir=Path(results)
        )
        start = time.perf_counter()
        result = run_search(settings, console=console)
        wall = time.perf_counter() - start - result.phase_seconds.get("baseline_training", 0.0)
    per_trial: dict[str, list[float]] = defaultdict(list)
    trials = result.study.trials
    for trial in records(result.study):
        for phase, seconds in trial.time_phases().items():
            per_trial[phase].append(seconds)
        if trial.duration_s is not None:
            per_trial["trial total"].append(trial.duration_s)
    table = Table(title=f"{args.model}: {len(trials)} trials, {args.threads} threads")
    for column in ("phase", "total s", "median s/trial", "share of trials %"):
        table.add_column(column, justify="right" if column != "phase" else "left")
    trial_time = sum(per_trial["trial total"])
    for phase, values in sorted(per_trial.items(), key=lambda kv: -sum(kv[1])):
        share = 100 * sum(values) / trial_time
        table.add_row(phase, f"{sum(values):.1f}", f"{statistics.median(values):.2f}", f"{share:.0f}")
    console.print(table)
    fixed = wall - trial_time
    projected = fixed + 50 * trial_time / len(trials)
    console.print(
        f"search wall time {wall:.0f} s (baseline training excluded; fixed costs {fixed:.0f} s); "
        f"projected for 50 trials: {projected / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
