"""Multi-fidelity promotion: successive halving over the fine-tune budget.

Once the budget's trials are evaluated (rung 0, ``--finetune-steps`` each), the best fraction of them (by
non-dominated sorting on validation accuracy and measured speedup, then crowding distance) is evaluated again with a
longer fine-tune (rung 1), the best fraction of those again with a longer one (rung 2), and so on. A promotion is an
enqueued trial of its own (the same config, its rung and steps in its user attributes), so it is recorded, retried
after a kill and resumed like any trial; a rerun enqueues only what is missing. The front takes each config at the
highest rung it reached (:func:`~ranksearch.results.front_trials`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from rich.console import Console

from ranksearch.evaluate import MultiFidelity
from ranksearch.results.front import Speed, compresses_nothing, config_key, config_speeds
from ranksearch.results.record import CUT_TIMINGS, OBJECTIVES, TrialRecord, promotion_attrs, records
from ranksearch.study.budget import BudgetGuard, Objective
from ranksearch.study.front import RETIME_ROUNDS, RETIME_SECONDS, paired_timer, retime_trial
from ranksearch.study.heartbeat import fail_silent_trials
from ranksearch.study.storage import POLL_S

__all__ = ["promotion_candidates", "rank_by_fronts", "retime_contenders", "run_promotions"]


def rank_by_fronts(points: Mapping[int, tuple[float, float]]) -> list[int]:
    """The keys ordered by non-dominated sorting of their (higher is better, higher is better) points: the first
    front, then the second... and within a front by crowding distance, extremes first (NSGA-II's order)."""
    remaining = dict(points)
    order: list[int] = []
    while remaining:
        front = [
            key
            for key, (a, b) in remaining.items()
            if not any(x >= a and y >= b and (x > a or y > b) for other, (x, y) in remaining.items() if other != key)
        ]
        distance = _crowding({key: remaining[key] for key in front})
        order += sorted(front, key=lambda key: (-distance[key], key))
        for key in front:
            del remaining[key]
    return order


def _crowding(points: Mapping[int, tuple[float, float]]) -> dict[int, float]:
    distance = dict.fromkeys(points, 0.0)
    for axis in (0, 1):
        ranked = sorted(points, key=lambda key: (points[key][axis], key))
        span = points[ranked[-1]][axis] - points[ranked[0]][axis]
        distance[ranked[0]] = distance[ranked[-1]] = math.inf
        for before, key, after in zip(ranked, ranked[1:-1], ranked[2:], strict=False):
            if span > 0:
                distance[key] += (points[after][axis] - points[before][axis]) / span
    return distance


def promotion_candidates(study: optuna.Study, *, rung: int, fraction: float) -> list[TrialRecord]:
    """The trials of rung ``rung - 1`` that earn rung ``rung``: the best ``ceil(fraction * n)`` of its ``n``
    complete trials by :func:`rank_by_fronts` on (validation accuracy, speedup), among the feasible ones that
    compress something and are faster than the dense model, one trial per config. The speedup is the config's pooled
    over its timings as they stood at the cut: those of the rungs below and of the re-timings before the cuts up to
    this one. Those already promoted are included (the choice is the same on every rerun)."""
    cut = _Cut.of(study, rung=rung, fraction=fraction)
    return [cut.pool[n] for n in cut.chosen()]


def retime_contenders(
    study: optuna.Study,
    evaluator: object,
    *,
    rung: int,
    fraction: float,
    console: Console,
    rounds: int = RETIME_ROUNDS,
    target_seconds: float = RETIME_SECONDS,
) -> int:
    """Before the cut to rung ``rung``, time again beside the dense model each rung ``rung - 1`` trial that makes the
    cut by its measured speedup or by the latency table's predicted one where that is higher, until every trial that
    does has been timed again before this cut (:func:`~ranksearch.study.front.retime_trial`, ``before_cut``). One
    few-second timing decides a trial's speedup at rung 0: on a 2-core host the same fast configs measured 2.9-3.2x
    in one study and 4.0-4.5x in another (the table predicted 3.4-3.9x) and were promoted in the second only; timed
    again side by side, the configs near the cut are compared under one machine load. Needs a paired timer
    (:func:`~ranksearch.study.front.paired_timer`); returns the number of trials timed again."""
    timer = paired_timer(study, evaluator)
    if timer is None:
        return 0
    count = 0
    while True:
        cut = _Cut.of(study, rung=rung, fraction=fraction)
        contenders = dict.fromkeys(cut.chosen() + cut.chosen(or_predicted=True))
        pending = [n for n in contenders if n not in cut.timed_before]
        if not pending:
            return count
        for number in pending:
            retime_trial(
                study, timer, cut.pool[number], console, before_cut=rung, rounds=rounds, target_seconds=target_seconds
            )
            count += 1


@dataclass(frozen=True)
class _Cut:
    """The trials of one rung that compete for promotion, and how many of them are promoted."""

    pool: Mapping[int, TrialRecord]
    """The feasible complete trials of the rung that compress something and whose speedup is known, one per config
    (its first trial)."""
    speeds: Mapping[int, Speed]
    """Each trial's speed as it stood at the cut: pooled over the timings of the rungs below the promotion's and of
    the cuts up to it, not over later ones (a rerun makes the same cut)."""
    timed_before: frozenset[int]
    """The trials timed again before this cut."""
    size: int
    """How many are promoted: the fraction of the rung's complete trials, rounded up."""

    @classmethod
    def of(cls, study: optuna.Study, *, rung: int, fraction: float) -> _Cut:
        below = [r for r in records(study, states=(TrialState.COMPLETE,)) if r.rung < rung]
        cut_timings = {n: t for n, t in CUT_TIMINGS.read(study).items() if t.get("cut", 0.0) <= rung}
        relative = OBJECTIVES.read(study).get("latency") == "relative"
        speeds = config_speeds(below, {}, pool=relative, cut_timings=cut_timings)
        complete = [r for r in below if r.rung == rung - 1]
        pool: dict[str, TrialRecord] = {}
        for r in complete:
            if r.feasible and not compresses_nothing(r) and speeds[r.number].speedup is not None:
                pool.setdefault(config_key(r), r)
        return cls(
            pool={r.number: r for r in pool.values()},
            speeds=speeds,
            timed_before=frozenset(int(n) for n, t in cut_timings.items() if t.get("cut") == rung),
            size=math.ceil(fraction * len(complete)),
        )

    def chosen(self, *, or_predicted: bool = False) -> list[int]:
        """The promoted trials: the best :attr:`size` of those faster than the dense model by :func:`rank_by_fronts`
        on (accuracy, speedup). ``or_predicted``: were each one's speedup the latency table's prediction where that
        is higher."""
        points = {
            n: (float(r.metrics["accuracy"]), self._speedup(r, or_predicted=or_predicted)) for n, r in self.pool.items()
        }
        return rank_by_fronts({n: point for n, point in points.items() if point[1] > 1.0})[: self.size]

    def _speedup(self, record: TrialRecord, *, or_predicted: bool) -> float:
        measured = float(self.speeds[record.number].speedup or 0.0)
        if or_predicted and record.predicted_speedup is not None:
            return max(measured, record.predicted_speedup)
        return measured


def enqueue_promotions(study: optuna.Study, *, rung: int, steps: int, fraction: float) -> list[int]:
    """Enqueue the promotions to ``rung`` that no trial holds yet (in any state); return the promoted trials."""
    held = {(r.promotes, r.rung) for r in records(study) if r.rung > 0}
    added = []
    for source in promotion_candidates(study, rung=rung, fraction=fraction):
        origin = source.promotes or source.number
        if (origin, rung) in held:
            continue
        params = _params_of(study, source.number)
        study.enqueue_trial(params, user_attrs=promotion_attrs(source, rung=rung, finetune_steps=steps))
        added.append(source.number)
    return added


def run_promotions(
    study: optuna.Study,
    objective: Objective,
    evaluator: object,
    *,
    steps: Sequence[int],
    fraction: float,
    budget: int,
    console: Console,
    after_trial: Callable[[], None] | None = None,
    heartbeat: int | None = None,
) -> int:
    """Promote rung by rung (``steps[r - 1]`` fine-tune steps at rung ``r``) and evaluate the promotions in this
    process, waiting for those other processes run; returns how many this process evaluated. Needs a
    :class:`~ranksearch.evaluate.MultiFidelity` evaluator. ``heartbeat``: as for
    :func:`~ranksearch.study.budget.optimize_to_budget`."""
    if not steps or not isinstance(evaluator, MultiFidelity):
        return 0
    guard = BudgetGuard(study=study, objective=objective, budget=budget, heartbeat=heartbeat)
    evaluated = 0
    for rung, rung_steps in enumerate(steps, start=1):
        if not _cut_by_earlier_release(study, evaluator, rung=rung):
            retime_contenders(study, evaluator, rung=rung, fraction=fraction, console=console)
            added = enqueue_promotions(study, rung=rung, steps=rung_steps, fraction=fraction)
            if added:
                console.print(f"promotion to rung {rung} ({rung_steps} fine-tune steps): trials {_numbers(added)}")
        while True:
            pending = [
                r for r in records(study) if r.rung == rung and r.state in (TrialState.WAITING, TrialState.RUNNING)
            ]
            if not pending:
                break
            if not any(r.state == TrialState.WAITING for r in pending):
                fail_silent_trials(study)  # a dead process's promotion is failed and re-queued
                time.sleep(POLL_S)
                continue
            study.optimize(guard, n_trials=1)
            evaluated += 1
            if after_trial is not None:
                after_trial()
    return evaluated


def _cut_by_earlier_release(study: optuna.Study, evaluator: object, *, rung: int) -> bool:
    """Whether an earlier release made the cut to ``rung``: it holds promotions, and none of its trials was timed
    before it although they could be. That cut stands (it was made on the trials' own speedups and may have promoted
    a config twice); making it again now would promote more than ``--promote-fraction``."""
    if paired_timer(study, evaluator) is None or not any(r.rung == rung for r in records(study)):
        return False
    return not any(t.get("cut") == rung for t in CUT_TIMINGS.read(study).values())


def _params_of(study: optuna.Study, number: int) -> dict[str, object]:
    return dict(next(t for t in study.get_trials(deepcopy=False) if t.number == number).params)


def _numbers(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers))
