"""What the terminal shows: a progress bar while searching, the front and the time per phase at the end."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ranksearch.results import (
    baseline,
    best_speedup_within,
    front_rows,
    front_trials,
    latency_target,
    time_per_arithmetic,
    untrained_baseline,
)
from ranksearch.results.phases import phase_seconds
from ranksearch.results.record import SETTINGS, Outcome, records
from ranksearch.results.show import show_study
from ranksearch.search.latency_table import prediction_errors
from ranksearch.study.result import SearchResult
from ranksearch.study.settings import RunSettings


class SearchProgress:
    """A rich progress bar over evaluated trials (complete or rejected at zero shot): ETA, front size, best
    speedup within the accuracy budget."""

    def __init__(self, study: optuna.Study, settings: RunSettings, console: Console) -> None:
        self.study = study
        self.progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self.budget = settings.search.budget
        self.max_accuracy_drop = settings.search.max_accuracy_drop
        self.task = self.progress.add_task("search", total=self.budget, status="")
        self.console = console
        self.started = time.monotonic()
        self.reported = -1
        self.untrained = untrained_baseline(study) is not None

    def __enter__(self) -> SearchProgress:
        self.progress.start()
        self.update()
        return self

    def __exit__(self, *exc: object) -> None:
        self.update()
        self.progress.stop()

    def update(self) -> None:
        trials = records(self.study)
        done = sum(t.counts_toward_budget for t in trials)
        failed = sum(t.outcome == Outcome.FAILED for t in trials)
        zero_shot = sum(t.outcome == Outcome.REJECTED_AT_ZERO_SHOT for t in trials)
        skipped = sum(t.state == TrialState.PRUNED for t in trials) - zero_shot
        budget = self.max_accuracy_drop if self.max_accuracy_drop is not None else 1.0
        status = f"front {len(front_trials(self.study))}"
        if self.untrained:  # a "within N pp" claim would rest on an untrained model's noise
            status += " · dense model near chance: accuracy is noise"
        elif best := best_speedup_within(self.study, budget):
            status += f" · best {best:.2f}x within {budget:g} pp"
        status += f" · {failed} failed" if failed else ""
        status += f" · {zero_shot} rejected at zero shot" if zero_shot else ""
        status += f" · {skipped} skipped unevaluated" if skipped else ""
        self.progress.update(self.task, completed=min(done, self.budget), status=status)
        if not self.console.is_terminal and done != self.reported:  # logs get a line per completed trial
            self.reported = done
            elapsed = time.monotonic() - self.started
            self.console.print(f"trials {done}/{self.budget} · {elapsed / 60:.1f} min · {status}")


def print_summary(result: SearchResult, console: Console) -> None:
    """The front as ``ranksearch show`` prints it (fastest first) and where the time went."""
    show_study(result.study, console=console)
    times = Table(title="time per phase")
    times.add_column("phase")
    times.add_column("seconds", justify="right")
    for phase, seconds in {**result.phase_seconds, **phase_seconds(result.study)}.items():
        times.add_row(phase, f"{seconds:.1f}")
    console.print(times)
    prediction = latency_prediction(result.study)
    if prediction is not None:
        console.print(
            f"latency table: predicted vs measured latency, median error {prediction['median_pct']:.1f} %, "
            f"max {prediction['max_pct']:.1f} % over {prediction['count']:.0f} trials"
            + (
                f" (relative to the dense model timed beside each: median {prediction['beside_median_pct']:.1f} %, "
                f"max {prediction['beside_max_pct']:.1f} %)"
                if "beside_median_pct" in prediction
                else ""
            )
            + f"; {prediction['rejected']:.0f} configs rejected before evaluation"
        )
    arithmetic = time_per_arithmetic(front_rows(result.study), baseline(result.study).get("macs"))
    if arithmetic is not None:
        console.print(
            f"front: median speedup / MAC reduction {arithmetic['median']:.2f} over {arithmetic['members']:.0f} "
            f"compressed members (min {arithmetic['min']:.2f}, max {arithmetic['max']:.2f}): how much of the "
            f"arithmetic saved became time saved, in {latency_target(SETTINGS.read(result.study))}"
        )
    rejected = [t for t in records(result.study) if t.outcome == Outcome.REJECTED_AT_ZERO_SHOT]
    if rejected:
        saved = sum(t.seconds_saved or 0.0 for t in rejected)
        console.print(
            f"early rejection: {len(rejected)} configs rejected at zero shot before fine-tuning, "
            f"~{saved:.0f} s saved (the median fine-tune, int8 and measuring time of complete trials, per rejection)"
        )
    console.print(f"results: {result.directory}")


def latency_prediction(study: optuna.Study) -> dict[str, float] | None:
    """The latency table's prediction error over the complete trials, and how many configs it rejected
    (None when the study has no predictions)."""
    trials = records(study)
    measured = [
        t
        for t in trials
        if t.outcome == Outcome.COMPLETE and t.predicted_latency_ms is not None and "latency_ms" in t.metrics
    ]
    if not measured:
        return None
    rejected = sum(t.outcome == Outcome.SCREENED for t in trials)
    out = prediction_errors([t.predicted_latency_ms for t in measured], [t.metrics["latency_ms"] for t in measured])
    out["rejected"] = float(rejected)
    # the predicted speedup applied to the dense model timed beside each trial: the table's error without
    # the machine's drift between trials
    beside = [t for t in measured if t.predicted_speedup is not None]
    if beside:
        relative = prediction_errors(
            [t.metrics["reference_latency_ms"] / t.predicted_speedup for t in beside],
            [t.metrics["latency_ms"] for t in beside],
        )
        out |= {"beside_median_pct": relative["median_pct"], "beside_max_pct": relative["max_pct"]}
    return out


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """The progress bar reports trials; Optuna's per-trial log lines and experimental warnings would bury it.

    Its "Trial N failed" warnings repeat the line printed per failed trial (with a traceback after Ctrl-C).
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optimize_logger = logging.getLogger("optuna.study._optimize")
    optimize_logger.addFilter(_not_a_failed_trial)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optimize_logger.removeFilter(_not_a_failed_trial)
        optuna.logging.set_verbosity(verbosity)


def _not_a_failed_trial(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("Trial ") and " failed with " in message)
