"""The Pareto front a user can trust: on accuracy and the speedup measured beside the dense model.

In a study with paired latency (:data:`~ranksearch.results.record.OBJECTIVES`), the dense model is always a member,
and another trial is a member only when it is measurably faster than the dense model: every round of its paired
timing measured it faster (a sign test: a config no faster than dense passes 4 rounds with probability 1/16 at most,
10 rounds with 1/1024). Borderline members, and members whose rounds disagree by more than
:data:`MAX_ROUND_SPREAD`, are timed again after the search (:data:`RETIMED`); the re-timing then decides.
Studies of earlier releases keep Optuna's front on (accuracy, milliseconds).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch.results.record import BASELINE, OBJECTIVES, RETIMED, TrialRecord

__all__ = ["MAX_ROUND_SPREAD", "Speed", "compresses_nothing", "front_trials", "highest_fidelity", "speed_of"]

MAX_ROUND_SPREAD = 2.0
"""The fastest round's speedup over the slowest's beyond which a trial's speedup is timed again after the search.
On a quiet machine a trial's four rounds agree within 1.1-1.3x; beside a test suite one measured 1.01x to 11.4x."""


@dataclass(frozen=True)
class Speed:
    """What is known of a trial's speedup against the dense model."""

    speedup: float | None
    low: float | None
    """The slowest round's speedup (None when the evaluator timed no rounds)."""
    high: float | None
    retimed: bool
    """Whether ``speedup``/``low``/``high`` come from the re-timing after the search."""

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


def speed_of(record: TrialRecord, retimed: Mapping[str, Mapping[str, float]]) -> Speed:
    """``record``'s speed: its re-timing where there is one, else what its trial measured."""
    again = retimed.get(str(record.number))
    if again is not None:
        return Speed(again["speedup"], again["speedup_low"], again["speedup_high"], retimed=True)
    low, high = record.metrics.get("speedup_low"), record.metrics.get("speedup_high")
    return Speed(record.speedup, low, high, retimed=False)


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
        try:
            front = study.best_trials
        except ValueError:
            return []
        return sorted(front, key=lambda t: (t.values[1], -t.values[0]))
    retimed = RETIMED.read(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    records = highest_fidelity(
        [r for r in map(TrialRecord.of, trials.values()) if r.feasible and "accuracy" in r.metrics]
    )
    dense = [r for r in records if compresses_nothing(r)][:1]
    speeds = {r.number: speed_of(r, retimed) for r in records}
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
        key = json.dumps(record.config, sort_keys=True)
        if key not in best or (record.rung, record.number) > (best[key].rung, best[key].number):
            best[key] = record
    return sorted(best.values(), key=lambda r: r.number)


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
