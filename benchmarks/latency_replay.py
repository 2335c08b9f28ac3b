"""How well would today's latency table have predicted the configs stored studies measured? A replay.

    python benchmarks/latency_replay.py STUDY_DIR [STUDY_DIR ...] [--threads 2] [--fast 0.35]

Each STUDY_DIR holds a study's ``study.db`` (a ``ranksearch run`` results folder; ``compare.py``'s
``results/compare/seed-N/compare-*``), all of one problem and search space, measured on this processor. The table
is built as the first study's run builds it (its settings, in its deployed form, cached under that run's results
folder). Then, study by study, each complete trial's config is predicted from the table refitted on the trials of
the same study measured before it, as the search predicts it (:meth:`LatencyTable.fitted`). The error is that of
the predicted speedup applied to the dense model timed beside the config, in percent of the config's measured
latency (the table's error without the machine's drift): overall, over the configs faster than ``--fast`` of the
dense model (where layer times add up worst), after each study's 20th config, and over its first 10.

Measured latencies are ratios to the dense model timed beside them, so studies from earlier hours replay fine; a
change to the table's fit is compared by running this with both trees on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import optuna
import torch
from rich.console import Console
from rich.table import Table

from ranksearch.measure.timers import TorchTimer
from ranksearch.results import STORAGE_FILE
from ranksearch.results.record import MODEL, SETTINGS
from ranksearch.study import RunSettings
from ranksearch.study.objective import observations
from ranksearch.study.prepared import build_latency_table
from ranksearch.study.problem import load_space
from ranksearch.study.recovery import load_study_problem
from ranksearch.util import sqlite_url

GROUPS = ("all", "fast", "after the 20th", "first 10")


def load(directory: Path) -> optuna.Study:
    """The one study in ``directory``'s database."""
    url = sqlite_url(directory / STORAGE_FILE)
    (name,) = optuna.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", type=float, default=0.35, help="latency ratio below which a config counts as fast")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)
    console = Console(width=shutil.get_terminal_size((160, 24)).columns)  # logs get the CLI's width, not 80
    studies = [load(directory) for directory in args.studies]
    first = studies[0]
    recorded = SETTINGS.read(first)
    checkpoint = recorded.get("checkpoint") or MODEL.read(first).get("checkpoint")
    settings = RunSettings.from_flat(recorded, checkpoint=checkpoint, workers=1)
    context = load_study_problem(first, console)
    space = load_space(settings.search.space or "", context.timing_device, console)
    slots = space.layers(context.model, context.input_shapes)
    timer = TorchTimer(device=context.timing_device, threads=args.threads)
    table = build_latency_table(settings, context, slots, space.rank_multiple, timer, console)
    errors: dict[str, list[float]] = {group: [] for group in GROUPS}
    per_study = Table(title="median error of the replayed prediction, % of the measured latency")
    for column in ("study", "configs", *GROUPS):
        per_study.add_column(column, justify="left" if column == "study" else "right")
    for study in studies:
        measured = observations(study)
        mine: dict[str, list[float]] = {group: [] for group in GROUPS}
        for index, observation in enumerate(measured):
            ratio = observation.latency_ms / observation.reference_ms
            predicted = 1 / table.fitted(measured[:index]).speedup(observation.config)
            error = 100 * abs(predicted - ratio) / ratio
            groups = ["all"] + ["fast"] * (ratio < args.fast) + ["after the 20th"] * (index >= 20)
            for group in groups + ["first 10"] * (index < 10):
                mine[group].append(error)
                errors[group].append(error)
        per_study.add_row(study.study_name, str(len(measured)), *(_median(mine[group]) for group in GROUPS))
    per_study.add_row("all", str(len(errors["all"])), *(_median(errors[group]) for group in GROUPS))
    console.print(per_study)
    calibration, bytes_scale = getattr(table, "calibration", ()), getattr(table, "bytes_scale", 0.0)  # older trees
    console.print(
        f"table: {len(calibration)} calibration configs, bytes term {'on' if bytes_scale else 'off'}; "
        f"fast: faster than {args.fast:g} of the dense model ({len(errors['fast'])} configs)"
    )


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} (n={len(values)})" if values else "-"


if __name__ == "__main__":
    main()
