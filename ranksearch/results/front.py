"""The Pareto front a user can trust: on accuracy and the speedup measured beside the dense model.

In a study with paired latency (:data:`~ranksearch.results.record.OBJECTIVES`), the dense model is always a member,
and another trial is a member only when it is measurably faster than the dense model: every round of its paired
timing measured it faster (a sign test: a config no faster than dense passes 4 rounds with probability 1/16 at most,
10 rounds with 1/1024). Borderline members, and members whose rounds disagree by more than
:data:`MAX_ROUND_SPREAD`, are timed again after the search (:data:`RETIMED`); the re-timing then decides, the
speedup as well as the verdict.
A config timed more than once (before a promotion cut, :data:`~ranksearch.results.record.CUT_TIMINGS`, and by the
promotion at each rung) has one speedup, pooled over all its timings (:func:`config_speeds`): on a 2-core host one
config measured 3.61x, then 2.58x minutes later.
Studies of earlier releases keep Optuna's front on (accuracy, milliseconds).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch.results.record import BASELINE, CUT_TIMINGS, OBJECTIVES, RETIMED, TrialRecord

__all__ = [
    "MAX_ROUND_SPREAD",
    "Speed",
    "compresses_nothing",
    "config_key",
    "config_speeds",
    "front_trials",
    "front_with_speeds",
    "highest_fidelity",
    "study_speeds",
]

MAX_ROUND_SPREAD = 2.0
"""The fastest round's speedup over the slowest's beyond which a trial's speedup is timed again after the search.
On a quiet machine a trial's four rounds agree within 1.1-1.3x; beside a test suite one measured 1.01x to 11.4x."""


@dataclass(frozen=True)
class Speed:
    """What is known of a config's speedup against the dense model."""

    speedup: float | None
    """Pooled over the config's timings that decide: their rounds-weighted geometric mean."""
    low: float | None
    """The slowest round's speedup, over the same timings (None when the evaluator timed no rounds)."""
    high: float | None
    retimed: bool
    """Whether the config was timed again after the search; its re-timings alone then decide ``speedup``, ``low``
    and ``high``: the timings before were found not faster in some round or too far apart to mean much."""
    timings: int = 1
    """How many timings ``speedup`` pools: its re-timings after the search where there are any, else the config's
    trials (at every rung) and its timings before promotion cuts."""

    @property
    def measurably_faster(self) -> bool:
        """Faster than the dense model in every round (point estimate alone when no rounds were timed)."""
        if self.speedup is None or self.speedup <= 1.0:
            return False
        return self.low is None or self.low > 1.0

    @property
    def unsettled(self) -> bool:
        """Its rounds disagree by more than :data:`MAX_ROUND_SPREAD`: the machine was too loaded for the speedup's
        size to mean much, even where every round found it faster."""
        return self.low is not None and self.high is not None and self.high > MAX_ROUND_SPREAD * self.low

    @property
    def borderline(self) -> bool:
        """Faster at the point estimate, not yet timed again, and either not faster in every round or
        :attr:`unsettled`."""
        if self.retimed or self.speedup is None or self.speedup <= 1.0:
            return False
        return not self.measurably_faster or self.unsettled


@dataclass(frozen=True)
class _Timing:
    speedup: float
    low: float | None
    high: float | None
    rounds: float


def config_speeds(
    records: Sequence[TrialRecord],
    retimed: Mapping[str, Mapping[str, float]],
    *,
    pool: bool = True,
    cut_timings: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[int, Speed]:
    """Each record's :class:`Speed`, the same for every record of one config: the speedup pooled over the config's
    re-timings after the search (``retimed``) where there are any (they decide), else over every other timing of
    the config (each of its trials, at whatever rung, and each timing before a promotion cut, ``cut_timings``),
    weighted by rounds, with the slowest and fastest rounds of the same timings. A record without a config (a
    custom study's), and with ``pool=False`` every record, is a config of its own."""
    groups: defaultdict[str, list[TrialRecord]] = defaultdict(list)
    for record in records:
        groups[config_key(record) if pool and record.config else f"trial {record.number}"].append(record)
    speeds: dict[int, Speed] = {}
    for group in groups.values():
        measured = [
            _Timing(
                float(r.speedup),
                r.metrics.get("speedup_low"),
                r.metrics.get("speedup_high"),
                float(r.metrics.get("latency_rounds", 1.0)),
            )
            for r in group
            if r.speedup is not None and r.speedup > 0
        ]
        measured += _stored_timings(group, cut_timings or {})
        again = _stored_timings(group, retimed)
        speed = _pooled(again or measured, retimed=bool(again))
        speeds.update({r.number: speed for r in group})
    return speeds


def _stored_timings(group: Sequence[TrialRecord], stored: Mapping[str, Mapping[str, float]]) -> list[_Timing]:
    return [
        _Timing(t["speedup"], t["speedup_low"], t["speedup_high"], float(t.get("rounds", 1.0)))
        for t in (stored[str(r.number)] for r in group if str(r.number) in stored)
    ]


def _pooled(timings: Sequence[_Timing], *, retimed: bool) -> Speed:
    if not timings:
        return Speed(None, None, None, retimed=retimed, timings=0)
    weight = sum(t.rounds for t in timings)
    speedup = (
        timings[0].speedup
        if len(timings) == 1
        else math.exp(sum(t.rounds * math.log(t.speedup) for t in timings) / weight)
    )
    lows = [t.low for t in timings if t.low is not None]
    highs = [t.high for t in timings if t.high is not None]
    return Speed(
        speedup,
        min(lows) if lows else None,
        max(highs) if highs else None,
        retimed=retimed,
        timings=len(timings),
    )


def study_speeds(study: optuna.Study) -> dict[int, Speed]:
    """:func:`config_speeds` over ``study``'s complete trials; in a study of an earlier release (latency in ms, not
    paired) each trial's own, as that release showed it."""
    return _speeds(study, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), RETIMED.read(study))


def _speeds(
    study: optuna.Study, complete: Sequence[FrozenTrial], retimed: Mapping[str, Mapping[str, float]]
) -> dict[int, Speed]:
    relative = OBJECTIVES.read(study).get("latency") == "relative"
    records = [TrialRecord.of(t) for t in complete]
    return config_speeds(records, retimed, pool=relative, cut_timings=CUT_TIMINGS.read(study))


def compresses_nothing(record: TrialRecord) -> bool:
    """Whether ``record``'s config is the dense model: every layer kept, none in int8."""
    return all(choice.get("technique") == "keep" and not choice.get("int8") for choice in record.layers.values())


def front_trials(study: optuna.Study, *, confirmed: bool = True) -> list[FrozenTrial]:
    """The feasible Pareto front, fastest first.

    With paired latency: non-dominated on (validation accuracy, speedup) among the complete feasible trials that are
    measurably faster than the dense model, plus the dense model itself; a config promoted to longer fine-tunes
    counts at the highest rung it reached. Promotions are scored on other images (the whole validation split), so
    accuracies are compared as :func:`comparable_accuracy` gives them. ``confirmed=False`` also admits borderline
    trials (faster at the point estimate, not yet timed again): the members to time again.
    """
    if OBJECTIVES.read(study).get("latency") != "relative":
        return _legacy_front(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return _relative_front(study, complete, RETIMED.read(study), confirmed=confirmed)


def front_with_speeds(study: optuna.Study, *, confirmed: bool = True) -> tuple[list[FrozenTrial], dict[int, Speed]]:
    """:func:`front_trials` and :func:`study_speeds` from one reading of the study's trials, so that every member
    has its speed while other workers complete trials."""
    if OBJECTIVES.read(study).get("latency") != "relative":
        front = _legacy_front(study)
        # Read after the front: complete trials only accrue, so every member is among them.
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return front, _speeds(study, complete, RETIMED.read(study))
    complete, retimed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), RETIMED.read(study)
    return _relative_front(study, complete, retimed, confirmed=confirmed), _speeds(study, complete, retimed)


def _legacy_front(study: optuna.Study) -> list[FrozenTrial]:
    """Optuna's front on (accuracy, milliseconds), fastest first: studies of earlier releases."""
    try:
        front = study.best_trials
    except ValueError:
        return []
    return sorted(front, key=lambda t: (t.values[1], -t.values[0]))


def _relative_front(
    study: optuna.Study,
    complete: Sequence[FrozenTrial],
    retimed: Mapping[str, Mapping[str, float]],
    *,
    confirmed: bool,
) -> list[FrozenTrial]:
    trials = {t.number: t for t in complete}
    measured = [r for r in map(TrialRecord.of, trials.values()) if r.feasible and "accuracy" in r.metrics]
    speeds = config_speeds(measured, retimed, cut_timings=CUT_TIMINGS.read(study))
    records = highest_fidelity(measured)
    dense = [r for r in records if compresses_nothing(r)][:1]
    eligible = [
        r
        for r in records
        if not compresses_nothing(r)
        and (speeds[r.number].measurably_faster or (not confirmed and speeds[r.number].borderline))
    ]
    dense_accuracy = BASELINE.read(study).get("accuracy") if BASELINE.stored(study) else None
    points = {
        r.number: (comparable_accuracy(r, dense_accuracy), float(speeds[r.number].speedup or 1.0)) for r in eligible
    }
    points.update({r.number: (comparable_accuracy(r, dense_accuracy), 1.0) for r in dense})
    members = [n for n in _non_dominated(points) if n not in {r.number for r in dense}]
    members += [r.number for r in dense]
    return [trials[n] for n in sorted(members, key=lambda n: (-points[n][1], -points[n][0], n))]


def comparable_accuracy(record: TrialRecord, dense_accuracy: float | None) -> float:
    """``record``'s validation accuracy on rung 0's images: the dense model's there minus the drop the trial measured
    against the dense model on its own images (its measured accuracy where either is unknown)."""
    if dense_accuracy is None or record.accuracy_drop_pp is None:
        return float(record.metrics["accuracy"])
    return float(dense_accuracy) - float(record.accuracy_drop_pp) / 100.0


def highest_fidelity(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Each config once: at the highest rung it was evaluated at (its latest trial there), in trial order."""
    best: dict[str, TrialRecord] = {}
    for record in records:
        key = config_key(record)
        if key not in best or (record.rung, record.number) > (best[key].rung, best[key].number):
            best[key] = record
    return sorted(best.values(), key=lambda r: r.number)


def config_key(record: TrialRecord) -> str:
    """What identifies ``record``'s config: trials with the same key evaluated the same config."""
    return json.dumps(record.config, sort_keys=True)


def _non_dominated(points: Mapping[int, tuple[float, float]]) -> Sequence[int]:
    """The keys whose (accuracy, speedup) no other point matches or beats in both with one strictly better."""
    return [
        key
        for key, (accuracy, speedup) in points.items()
        if not any(
            a >= accuracy and s >= speedup and (a > accuracy or s > speedup)
            for other, (a, s) in points.items()
            if other != key
        )
    ]
