"""Where a study's trials spent their time: the evaluator phases each trial recorded, summed."""

from __future__ import annotations

from collections import defaultdict

import optuna

from ranksearch.results.record import records

WALL = "trials (wall)"
""":func:`phase_seconds`' key for the total of the trials' wall time."""


def phase_seconds(study: optuna.Study) -> dict[str, float]:
    """Seconds spent per evaluator phase, summed over all trials."""
    totals: dict[str, float] = defaultdict(float)
    for trial in records(study):
        for phase, seconds in trial.time_phases().items():
            totals[phase] += seconds
        if trial.duration_s is not None:
            totals[WALL] += trial.duration_s
    return dict(totals)
