"""Trials that fill the measured front's widest gaps with knapsack configs (``--fill-gaps``).

Once the warm starts ran, the sampler's own trials rarely reach the front: in four default studies of 2026-12-01/02
none of the 136 TPE trials completed after the warm starts did (docs/search.md, "Filling the front's gaps"). With
``--fill-gaps``, each trial the budget leaves takes instead, while one is left, a config of the knapsack's front
(:func:`~ranksearch.search.knapsack.knapsack_front`) in the widest gap of the front measured so far: of the
neighbouring members of the first rung's front, the pair whose rectangle (latency apart x accuracy apart) is largest
and whose summed layer costs hold an untried knapsack config between them; of those, the config nearest the middle of
the two costs. It is enqueued as a warm start labelled with its cost and the two members, so it is recorded, retried
and resumed like one. Where no gap holds an untried config, the sampler takes the trial.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from ranksearch.config import CompressionConfig
from ranksearch.results.record import TrialRecord

__all__ = ["GapFill", "next_gap_fill"]


@dataclass(frozen=True)
class GapFill:
    """The knapsack config chosen for a gap of the measured front."""

    config: CompressionConfig
    cost: float
    """Its summed layer cost, as a fraction of the searched layers' dense cost."""
    between: tuple[int, int]
    """The front members on either side: the faster, then the slower."""

    def label(self, measure: str) -> str:
        faster, slower = self.between
        return f"knapsack gap, layer {measure} {100 * self.cost:.1f} % of dense, between trials {faster} and {slower}"


def next_gap_fill(
    study: optuna.Study,
    candidates: Sequence[tuple[float, CompressionConfig]],
    *,
    cost_of: Callable[[CompressionConfig], float],
) -> GapFill | None:
    """The config for the widest gap of ``study``'s first-rung front that holds one of ``candidates``, or None.

    ``candidates``: (cost fraction, config) of the knapsack's front not yet tried in the study; ``cost_of``: a
    measured config's cost fraction on the same scale.
    """
    front = _first_rung_front(study)
    gaps = sorted(
        itertools.pairwise(front),
        key=lambda pair: -(pair[1].latency - pair[0].latency) * (pair[1].accuracy - pair[0].accuracy),
    )
    for faster, slower in gaps:
        low, high = sorted((cost_of(faster.config), cost_of(slower.config)))
        inside = [(cost, config) for cost, config in candidates if low < cost < high]
        if inside:
            middle = (low + high) / 2
            cost, config = min(inside, key=lambda candidate: abs(candidate[0] - middle))
            return GapFill(config=config, cost=cost, between=(faster.number, slower.number))
    return None


@dataclass(frozen=True)
class _Member:
    number: int
    accuracy: float
    latency: float
    config: CompressionConfig


def _first_rung_front(study: optuna.Study) -> list[_Member]:
    """The feasible first-rung trials no other beats on both accuracy and relative latency, fastest first."""
    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        record = TrialRecord.of(trial)
        if record.rung == 0 and record.feasible and trial.values is not None:
            accuracy, latency = trial.values
            points.append(_Member(trial.number, accuracy, latency, record.compression_config()))
    front: list[_Member] = []
    for point in sorted(points, key=lambda point: (point.latency, -point.accuracy)):
        if not front or point.accuracy > front[-1].accuracy:
            front.append(point)
    return front
