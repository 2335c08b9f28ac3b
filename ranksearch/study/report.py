"""What the terminal shows: a progress bar while searching, the front and the time per phase at the end."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ranksearch.evaluate.latency_table import prediction_errors
from ranksearch.results import best_speedup_within, front_rows, front_trials
from ranksearch.study.settings import RunSettings

if TYPE_CHECKING:
    from ranksearch.study.runner import SearchResult


class SearchProgress:
    """A rich progress bar over completed trials: ETA, front size, best speedup within the accuracy budget."""

    def __init__(self, study: optuna.Study, settings: RunSettings, console: Console) -> None:
        self.study = study
        self.settings = settings
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
        self.task = self.progress.add_task("search", total=settings.budget, status="")
        self.console = console
        self.started = time.monotonic()
        self.reported = -1

    def __enter__(self) -> SearchProgress:
        self.progress.start()
        self.update()
        return self

    def __exit__(self, *exc: object) -> None:
        self.update()
        self.progress.stop()

    def update(self) -> None:
        done = len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        failed = len(self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        rejected = len(self.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
        budget = self.settings.max_accuracy_drop if self.settings.max_accuracy_drop is not None else 1.0
        best = best_speedup_within(self.study, budget)
        status = f"front {len(front_trials(self.study))}"
        status += f" · best {best:.2f}x within {budget:g} pp" if best else ""
        status += f" · {failed} failed" if failed else ""
        status += f" · {rejected} pruned" if rejected else ""
        self.progress.update(self.task, completed=min(done, self.settings.budget), status=status)
        if not self.console.is_terminal and done != self.reported:  # logs get a line per completed trial
            self.reported = done
            elapsed = time.monotonic() - self.started
            self.console.print(f"trials {done}/{self.settings.budget} · {elapsed / 60:.1f} min · {status}")


def phase_seconds(study: optuna.Study) -> dict[str, float]:
    """Seconds spent per evaluator phase, summed over all trials."""
    totals: dict[str, float] = defaultdict(float)
    for trial in study.get_trials(deepcopy=False):
        for key, value in trial.user_attrs.items():
            if key.startswith("time_") and key.endswith("_s"):
                totals[key[5:-2]] += value
        if trial.duration is not None:
            totals["trials (wall)"] += trial.duration.total_seconds()
    return dict(totals)


def print_summary(result: SearchResult, settings: RunSettings, console: Console) -> None:
    """The front as a table (fastest first) and where the time went."""
    base = result.baseline
    table = Table(
        title=f"Pareto front of {result.study.study_name} (baseline: "
        f"val {100 * base['accuracy']:.2f}%, test {100 * base.get('test_accuracy', float('nan')):.2f}%, "
        f"{base['latency_ms']:.2f} ms, {base['params'] / 1e6:.2f} M params)"
    )
    for column in (
        "trial",
        "val acc %",
        "test acc %",
        "drop pp",
        "latency ms",
        "speedup",
        "params M",
        "MMACs",
        "techniques",
    ):
        table.add_column(column, justify="left" if column == "techniques" else "right")
    for row in front_rows(result.study):
        test = "—" if row["test_accuracy"] is None else f"{100 * row['test_accuracy']:.2f}"
        table.add_row(
            f"{row['trial']}" + (f" ({row['anchor']})" if row["anchor"] else ""),
            f"{100 * row['accuracy']:.2f}",
            test,
            f"{row['accuracy_drop_pp']:+.2f}",
            f"{row['latency_ms']:.3f}",
            f"{row['speedup']:.2f}x",
            f"{row['params'] / 1e6:.2f}",
            f"{row['macs'] / 1e6:.1f}",
            row["techniques"] + (f" +int8x{row['int8_layers']}" if row["int8_layers"] else ""),
        )
    console.print(table)
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
            f"max {prediction['max_pct']:.1f} % over {prediction['count']:.0f} trials; "
            f"{prediction['rejected']:.0f} configs rejected before evaluation"
        )
    console.print(f"results: {result.directory}")


def latency_prediction(study: optuna.Study) -> dict[str, float] | None:
    """The latency table's prediction error over the complete trials, and how many configs it rejected
    (None when the study has no predictions)."""
    pairs = [
        (t.user_attrs["predicted_latency_ms"], t.user_attrs["latency_ms"])
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "predicted_latency_ms" in t.user_attrs and "latency_ms" in t.user_attrs
    ]
    if not pairs:
        return None
    rejected = sum(
        t.user_attrs.get("fail_reason", "").startswith("rejected before evaluation")
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    )
    return {**prediction_errors(*map(list, zip(*pairs))), "rejected": float(rejected)}
