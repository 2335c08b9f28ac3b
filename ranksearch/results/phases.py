"""Where a study's trials spent their time: the evaluator phases each trial recorded, summed."""

from __future__ import annotations

from collections import defaultdict

import optuna

WALL = "trials (wall)"
""":func:`phase_seconds`' key for the total of the trials' wall time."""


def phase_seconds(study: optuna.Study) -> dict[str, float]:
    """Seconds spent per evaluator phase, summed over all trials."""
    totals: dict[str, float] = defaultdict(float)
    for trial in study.get_trials(deepcopy=False):
        for key, value in trial.user_attrs.items():
            if key.startswith("time_") and key.endswith("_s"):
                totals[key[5:-2]] += value
        if trial.duration is not None:
            totals[WALL] += trial.duration.total_seconds()
    return dict(totals)
