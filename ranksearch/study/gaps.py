"""Trials that fill the measured front's widest gaps with knapsack configs (``--fill-gaps``).

Once the warm starts ran, the sampler's own trials rarely reach the front: in four default studies of 2026-12-01/02
none of the 136 TPE trials completed after the warm starts did (docs/search.md, "Filling the front's gaps"). With
``--fill-gaps``, each trial the budget leaves takes instead, while one is left, a config of the knapsack's front
(:func:`~ranksearch.search.knapsack.knapsack_front`) in the widest gap of the front measured so far. Gaps lie between
neighbouring members of the first rung's front and are ranked by their rectangle (latency apart x accuracy apart),
divided by one plus the trials already made between the two members' summed layer costs, so that fills that came out
dominated do not draw every later trial into the same gap. In the widest gap that holds an untried knapsack config,
the one farthest (in cost) from the two members and the trials between them is taken. It is enqueued with its own
label (:func:`~ranksearch.results.record.gap_fill_attrs`): the screens and early rejection apply to it as to a sampled
trial, and it is recorded, retried and resumed like any queued trial. Where no gap holds an untried config, the
sampler takes the trial.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from ranksearch.config import CompressionConfig
from ranksearch.results.record import CONFIG, TrialRecord

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
        """What the trial records: its cost in ``measure`` (latency or MACs) and the gap's two members."""
        faster, slower = self.between
        return f"knapsack gap, layer {measure} {100 * self.cost:.1f} % of dense, between trials {faster} and {slower}"


def next_gap_fill(
    trials: Sequence[FrozenTrial],
    candidates: Sequence[tuple[float, CompressionConfig]],
    *,
    cost_of: Callable[[CompressionConfig], float],
) -> GapFill | None:
    """The config for the widest gap of the first-rung front of ``trials`` that holds one of ``candidates``, or
    None.

    ``candidates``: (cost fraction, config) of the knapsack's front not yet tried; ``cost_of``: a trial's config's
    cost fraction on the same scale.
    """
    first_rung = [
        (trial, record, cost_of(record.compression_config()))
        for trial in trials
        if (record := TrialRecord.of(trial)).rung == 0 and CONFIG in trial.user_attrs
    ]
    tried_costs = [cost for _, _, cost in first_rung]
    front = _front(
        _Member(trial.number, trial.values[0], trial.values[1], cost)
        for trial, record, cost in first_rung
        if trial.state == TrialState.COMPLETE and record.feasible and trial.values is not None
    )
    gaps = []
    for faster, slower in itertools.pairwise(front):
        low, high = sorted((faster.cost, slower.cost))
        inside = [cost for cost in tried_costs if low < cost < high]
        width = (slower.latency - faster.latency) * (slower.accuracy - faster.accuracy) / (1 + len(inside))
        gaps.append((width, faster, slower, (low, high, *inside)))
    for _, faster, slower, taken in sorted(gaps, key=lambda gap: -gap[0]):
        inside = [(cost, config) for cost, config in candidates if taken[0] < cost < taken[1]]
        if inside:
            cost, config = _farthest(inside, taken)
            return GapFill(config=config, cost=cost, between=(faster.number, slower.number))
    return None


def _farthest(
    candidates: Sequence[tuple[float, CompressionConfig]], taken: tuple[float, ...]
) -> tuple[float, CompressionConfig]:
    """The candidate farthest in cost from every cost ``taken`` (the gap's ends first), then nearest its middle."""
    middle = (taken[0] + taken[1]) / 2
    return min(candidates, key=lambda c: (-min(abs(c[0] - cost) for cost in taken), abs(c[0] - middle)))


@dataclass(frozen=True)
class _Member:
    """A measured first-rung trial: accuracy, latency relative to the dense model, and predicted cost fraction."""

    number: int
    accuracy: float
    latency: float
    cost: float


def _front(members: Iterable[_Member]) -> list[_Member]:
    """The members no other beats on both accuracy and latency, fastest first."""
    front: list[_Member] = []
    for member in sorted(members, key=lambda member: (member.latency, -member.accuracy)):
        if not front or member.accuracy > front[-1].accuracy:
            front.append(member)
    return front
