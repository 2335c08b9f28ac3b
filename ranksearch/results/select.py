"""Pick one trial of a study: by number, or by rule (the fastest within an accuracy drop, the most accurate within
a latency), with an error naming the closest trial when none fits."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch.errors import RanksearchError
from ranksearch.results.front import compresses_nothing, front_with_speeds
from ranksearch.results.record import StudyRecord, TrialRecord

__all__ = ["rule_drop", "select_trial"]

TOLERANCE = 1e-9
"""Slack in the rules' comparisons, so a bound equal to a printed metric includes it despite rounding."""


def select_trial(
    study: optuna.Study,
    *,
    trial: int | None = None,
    max_accuracy_drop: float | None = None,
    max_latency_ms: float | None = None,
    confident: bool = False,
) -> FrozenTrial:
    """One complete trial: ``trial`` by number, or by rule among the complete feasible trials (in a study with paired
    latency, among the front's: the dense model and the trials measurably faster than it).

    ``max_accuracy_drop`` (validation accuracy drop against the baseline, in percentage points: after its recovery
    fine-tune where one measured it, :func:`rule_drop`) picks the fastest trial within it (by the speedup measured
    beside the dense model; never the dense model itself); ``confident``: within it with 95 % confidence (the upper
    end of the drop's paired interval), which only recovered trials measured;
    ``max_latency_ms`` alone picks the most accurate trial within it; both pick the fastest trial within both (the
    drop is the accuracy floor, the latency a ceiling). Ties go to the better other objective, then the earlier
    trial. When no trial fits, the error names the closest one (the smallest overshoot, each bound's overshoot
    relative to that bound, the drop's to at least 1 pp) and the bounds it would need.
    """
    name = study.study_name
    rules = max_accuracy_drop is not None or max_latency_ms is not None
    if trial is not None and rules:
        raise RanksearchError(f"--trial {trial} and a rule (--max-accuracy-drop/--max-latency-ms) given; pass one")
    if trial is None and not rules:
        raise RanksearchError("no trial chosen; pass --trial N, --max-accuracy-drop D or --max-latency-ms L")
    if confident and max_accuracy_drop is None:
        raise RanksearchError("--confident applies to --max-accuracy-drop; pass one, or leave --confident out")
    if trial is not None:
        return _trial_by_number(study, trial)
    if max_accuracy_drop is not None and not max_accuracy_drop >= 0:
        raise RanksearchError(f"--max-accuracy-drop {max_accuracy_drop}: must be >= 0 percentage points")
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise RanksearchError(f"--max-latency-ms {max_latency_ms}: must be positive")
    stored = StudyRecord.of(study)
    relative = stored.relative_latency
    if relative:  # the front and its speeds from one read: workers may complete trials meanwhile
        trials, pooled = front_with_speeds(study)
    else:
        trials, pooled = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), {}
    candidates = {t.number: t for t in trials}
    pool = [
        r
        for r in map(TrialRecord.of, candidates.values())
        if r.feasible and _finite_number(r.accuracy_drop_pp) and _finite_number(r.metrics.get("latency_ms"))
    ]
    if not pool:
        raise RanksearchError(
            f"study {name!r} has no complete feasible trial yet; run the search longer or relax its constraints"
        )
    if confident:  # the dense model stays: it is the reference, and the closest-trial message may name it
        pool = [t for t in pool if compresses_nothing(t) or stored.recovered_validation_drop(t.number) is not None]
        if all(map(compresses_nothing, pool)):
            raise RanksearchError(
                f"--confident: no trial of study {name!r} has a validation drop with an interval (only recoveries "
                f"measure one); recover some with `ranksearch finetune {name} --trial N`, or leave --confident out"
            )
    speeds = {number: speed.speedup or 0.0 for number, speed in pooled.items()}
    drops = {t.number: rule_drop(stored, t, confident=confident) for t in pool}

    def slowness(trial: TrialRecord) -> float:
        """What "fastest" minimises: 1 / the speedup measured beside the dense model, or milliseconds (earlier
        releases' studies)."""
        return 1.0 / speeds[trial.number] if relative else _latency(trial)

    overshoot = _overshoot(drops, max_accuracy_drop, max_latency_ms)
    fits = [t for t in pool if overshoot(t) == 0]
    if relative and max_accuracy_drop is not None:  # never recommend the dense model, or anything not faster
        fits = [t for t in fits if not compresses_nothing(t)]
        if not fits:
            raise RanksearchError(
                f"no config of study {name!r} within a validation drop of {max_accuracy_drop:g} pp"
                f"{' with 95 % confidence' if confident else ''} is measurably faster than the dense model; keep the "
                "dense model, raise --max-accuracy-drop, or search longer"
            )
    if fits:
        if max_accuracy_drop is not None:
            return candidates[min(fits, key=lambda t: (slowness(t), -_accuracy(t), t.number)).number]
        return candidates[min(fits, key=lambda t: (-_accuracy(t), slowness(t), t.number)).number]
    closest = min(pool, key=lambda t: (overshoot(t), t.number))
    drop, latency = drops[closest.number], _latency(closest)
    needs = []
    if max_accuracy_drop is not None and drop > max_accuracy_drop + TOLERANCE:
        needs.append(f"--max-accuracy-drop {math.ceil(drop * 100 - 1e-6) / 100:.2f}")
    if max_latency_ms is not None and latency > max_latency_ms + TOLERANCE:
        needs.append(f"--max-latency-ms {math.ceil(latency * 1000 - 1e-6) / 1000:.3f}")
    within = " and ".join(
        f"{option} {value:g}"
        for option, value in (("--max-accuracy-drop", max_accuracy_drop), ("--max-latency-ms", max_latency_ms))
        if value is not None
    )
    raise RanksearchError(
        f"no complete feasible trial of study {name!r} is within {within}; the closest, trial {closest.number} "
        f"(drop {drop:.2f} pp, {latency:.3f} ms), would need {' and '.join(needs)}"
    )


def _trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    name = study.study_name
    if number not in trials:
        known = f"0..{max(trials)}" if trials else "none yet"
        raise RanksearchError(f"--trial {number}: study {name!r} has no such trial (trials: {known})")
    chosen = trials[number]
    if chosen.state != TrialState.COMPLETE:
        reason = TrialRecord.of(chosen).reason
        raise RanksearchError(
            f"--trial {number}: trial {number} of study {name!r} is {chosen.state.name}"
            + (f" ({reason})" if reason else "")
            + f", not COMPLETE; pick a complete one (`ranksearch show {name} --all`)"
        )
    return chosen


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _accuracy(trial: TrialRecord) -> float:
    return float(trial.metrics["accuracy"])


def rule_drop(stored: StudyRecord, trial: TrialRecord, *, confident: bool = False) -> float:
    """The validation drop an accuracy rule reads for ``trial`` (in points): after its recovery fine-tune where that
    measured the validation split (what the user's training will reach, on every validation image), else the search's
    (a short fine-tune, which understates the fast end). ``confident``: the upper end of the recovered drop's paired
    95 % interval (the search's drop, which has none, is read as it is)."""
    recovered = stored.recovered_validation_drop(trial.number)
    if recovered is not None:
        return float(recovered["high_pp" if confident else "drop_pp"])
    return float(cast(float, trial.accuracy_drop_pp))  # the pool holds trials with a finite drop only


def _latency(trial: TrialRecord) -> float:
    return float(trial.metrics["latency_ms"])


def _overshoot(
    drops: Mapping[int, float], max_drop: float | None, max_latency: float | None
) -> Callable[[TrialRecord], float]:
    """How far a trial is outside the bounds (its drop from ``drops``), each overshoot relative to its bound (0 when
    within both)."""

    def overshoot(trial: TrialRecord) -> float:
        total = 0.0
        if max_drop is not None:
            total += max(drops[trial.number] - max_drop - TOLERANCE, 0.0) / max(max_drop, 1.0)
        if max_latency is not None:
            total += max(_latency(trial) - max_latency - TOLERANCE, 0.0) / max_latency
        return total

    return overshoot
