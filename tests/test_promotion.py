"""Multi-fidelity promotion: the best fraction of each rung, by non-dominated sorting, earns a longer fine-tune."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from ranksearch.config import CompressionConfig
from ranksearch.evaluate import Evaluator, Metrics, MultiFidelity, PairedTiming
from ranksearch.measure.timing import Latency, PairedLatency
from ranksearch.results import front_trials, record
from ranksearch.results.front import study_speeds
from ranksearch.results.record import TrialRecord, promotion_attrs, records
from ranksearch.study.budget import trial_counts
from ranksearch.study.front import confirm_front_speedups
from ranksearch.study.promotion import (
    enqueue_promotions,
    promotion_candidates,
    rank_by_fronts,
    retime_contenders,
    run_promotions,
)


def test_rank_by_fronts_orders_fronts_then_crowding() -> None:
    points = {
        1: (0.90, 1.0),  # front 1, an extreme
        2: (0.80, 2.0),  # front 1, middle
        3: (0.70, 3.0),  # front 1, an extreme
        4: (0.85, 1.5),  # front 1 too (nothing beats it in both)
        5: (0.79, 1.9),  # front 2 (dominated by 2)
        6: (0.60, 0.5),  # front 3
    }
    order = rank_by_fronts(points)
    assert set(order[:4]) == {1, 2, 3, 4} and order[4:] == [5, 6]
    assert set(order[:2]) == {1, 3}  # extremes first (infinite crowding distance)
    assert rank_by_fronts({}) == []


def promotion_study(
    accuracies_speedups: list[tuple[float, float]], *, predicted: list[float] | None = None
) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="rungs")
    record.OBJECTIVES.write(study, {"latency": "relative"})
    distribution = {"x": CategoricalDistribution(list(range(len(accuracies_speedups))))}
    for number, (accuracy, speedup) in enumerate(accuracies_speedups):
        layers = {"conv": {"technique": "svd", "rank": number / 100}} if number else {}
        attrs = {"config": {"layers": layers}, "accuracy": accuracy, "speedup": speedup, "latency_ms": 1 / speedup}
        if predicted is not None:
            attrs["predicted_speedup"] = predicted[number]
        study.add_trial(
            create_trial(
                values=[accuracy, 1 / speedup], params={"x": number}, distributions=distribution, user_attrs=attrs
            )
        )
    return study


def test_the_best_fraction_is_promoted_once_and_counts_apart_from_the_budget() -> None:
    trials = [(0.90, 1.0), (0.89, 1.5), (0.85, 2.5), (0.80, 1.2), (0.70, 3.0), (0.88, 0.8), (0.60, 1.1), (0.86, 1.4)]
    study = promotion_study(trials)
    chosen = [r.number for r in promotion_candidates(study, rung=1, fraction=0.5)]
    assert len(chosen) == math.ceil(0.5 * len(trials))
    assert set(chosen) == {
        1,
        2,
        4,
        7,
    }  # the first front {1, 2, 4}, then the second's best (7); 0 is dense, 5 slower than it
    assert enqueue_promotions(study, rung=1, steps=300, fraction=0.5) == chosen
    assert enqueue_promotions(study, rung=1, steps=300, fraction=0.5) == []  # a rerun adds nothing
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"]["x"] for t in waiting] == chosen
    assert all(t.user_attrs["rung"] == 1 and t.user_attrs["finetune_steps"] == 300 for t in waiting)
    assert trial_counts(study)["spent"] == len(trials)  # promotions do not count towards the budget


def test_the_front_takes_each_config_at_its_highest_rung() -> None:
    study = promotion_study([(0.90, 1.0), (0.80, 2.0), (0.85, 1.5)])
    source = TrialRecord.of(study.trials[1])
    attrs = {**study.trials[1].user_attrs, **promotion_attrs(source, rung=1, finetune_steps=300), "accuracy": 0.89}
    study.add_trial(
        create_trial(
            values=[0.89, 0.5],
            params=study.trials[1].params,
            distributions=study.trials[1].distributions,
            user_attrs=attrs,
        )
    )
    front = [t.number for t in front_trials(study)]
    assert front == [3, 0]  # trial 1 counts as its promotion (0.89 at 2x), which dominates trial 2
    assert TrialRecord.of(study.trials[3]).promotes == 1 and not TrialRecord.of(study.trials[3]).counts_toward_budget


@pytest.mark.parametrize("fraction", [0.1, 0.34, 1.0])
def test_candidates_never_exceed_the_fraction(fraction) -> None:
    study = promotion_study([(0.9, 1.0)] + [(0.5 + i / 100, 1.1 + i / 10) for i in range(9)])
    assert len(promotion_candidates(study, rung=1, fraction=fraction)) == min(
        math.ceil(fraction * 10), 9
    )  # 9: all but dense


def test_the_tiny_search_promotes_rung_by_rung(tiny_search) -> None:
    """The shared tiny search (rungs of 6 and 12 steps, half of each rung promoted): each promotion re-evaluates its
    source's config with its steps, and the front holds each config once."""
    study = tiny_search[1].study
    trials = records(study)
    rung0 = [t for t in trials if t.rung == 0 and t.state == TrialState.COMPLETE]
    rung1 = [t for t in trials if t.rung == 1]
    rung2 = [t for t in trials if t.rung == 2]
    assert rung1 and len(rung1) <= math.ceil(0.5 * len(rung0)) and len(rung2) <= math.ceil(0.5 * len(rung1))
    by_number = {t.number: t for t in trials}
    baseline = record.BASELINE.read(study)  # promotions are scored on the whole validation split, rung 0 on 256 images
    for trial in rung0 + rung1 + rung2:
        assert trial.metrics["images"] == (6000 if trial.rung else 256)
        reference = baseline["full_val_accuracy" if trial.rung else "accuracy"]
        assert trial.accuracy_drop_pp == pytest.approx(100 * (reference - trial.metrics["accuracy"]))
    for promotion in rung1 + rung2:
        assert promotion.state == TrialState.COMPLETE and promotion.finetune_steps == (6 if promotion.rung == 1 else 12)
        assert promotion.config == by_number[promotion.promotes].config and promotion.metrics["time_finetune_s"] > 0
    assert {t.promotes for t in rung2} <= {t.promotes for t in rung1}
    assert sum(t.counts_toward_budget for t in trials) == tiny_search[0].search.budget
    configs = [json.dumps(TrialRecord.of(t).config, sort_keys=True) for t in front_trials(study)]
    assert len(configs) == len(set(configs))


class ConfigTimer(Evaluator, PairedTiming):
    """A custom evaluator whose re-timing of each config (keyed by its rank) measures a fixed speedup."""

    def __init__(self, speedups: dict[float, float]) -> None:
        self.speedups = speedups
        self.timed: list[float] = []

    def evaluate(self, config: CompressionConfig, *, split: str = "val") -> Metrics:
        raise AssertionError("re-timing must not evaluate")

    def time_beside_dense(self, config: CompressionConfig, *, rounds: int, target_seconds: float) -> PairedLatency:
        rank = config.layers["conv"].rank
        self.timed.append(rank)
        ratios = (self.speedups[rank],) * rounds
        return PairedLatency(reference=_latency(1.0), candidate=_latency(1 / ratios[0]), ratios=ratios)


def _latency(median: float) -> Latency:
    return Latency(median_ms=median, p10_ms=median, p90_ms=median, runs=10, attempts=1, device="cpu", threads=1)


def test_the_trials_near_the_cut_are_timed_again_before_it() -> None:
    """Trial 2 measured 1.5x in its trial (a loaded moment) but the latency table predicts 3.0x: it contends, and
    timed again beside trials 1 and 3 (the measured cut) it measures 3.0x and takes trial 3's place."""
    trials = [(0.90, 1.0), (0.89, 2.0), (0.88, 1.5), (0.87, 2.5), (0.80, 1.2)]
    study = promotion_study(trials, predicted=[1.0, 2.0, 3.0, 2.4, 1.2])
    assert [r.number for r in promotion_candidates(study, rung=1, fraction=0.4)] == [1, 3]
    timer = ConfigTimer({0.01: 2.0, 0.02: 3.0, 0.03: 2.5, 0.04: 1.2})
    console = Console(quiet=True)
    assert retime_contenders(study, timer, rung=1, fraction=0.4, console=console, rounds=10) == 3
    assert sorted(timer.timed) == [0.01, 0.02, 0.03]  # trial 4 is far from the cut either way
    assert [r.number for r in promotion_candidates(study, rung=1, fraction=0.4)] == [1, 2]
    assert retime_contenders(study, timer, rung=1, fraction=0.4, console=console) == 0  # a rerun times nothing
    assert enqueue_promotions(study, rung=1, steps=300, fraction=0.4) == [1, 2]


def test_a_trial_timed_again_slower_gives_its_place_to_the_next() -> None:
    """Trial 3 measured 2.5x by luck; timed again it is slower than trial 2, so trial 2 is promoted instead, and
    trial 2 (now in the cut) is timed again too before the choice is final."""
    study = promotion_study([(0.90, 1.0), (0.89, 2.0), (0.88, 1.8), (0.87, 2.5)])
    timer = ConfigTimer({0.01: 2.0, 0.02: 1.9, 0.03: 1.1})
    assert retime_contenders(study, timer, rung=1, fraction=0.5, console=Console(quiet=True), rounds=10) == 3
    assert timer.timed == [0.01, 0.03, 0.02]
    assert [r.number for r in promotion_candidates(study, rung=1, fraction=0.5)] == [1, 2]


def test_nothing_is_timed_again_without_a_paired_timer_or_paired_latency() -> None:
    study = promotion_study([(0.90, 1.0), (0.89, 2.0), (0.88, 1.5)], predicted=[1.0, 2.0, 3.0])
    console = Console(quiet=True)
    assert retime_contenders(study, object(), rung=1, fraction=0.5, console=console) == 0
    record.OBJECTIVES.write(study, {"latency": "ms"})
    assert retime_contenders(study, ConfigTimer({}), rung=1, fraction=0.5, console=console) == 0


def test_the_cut_is_the_same_on_a_rerun_after_later_timings() -> None:
    """A rerun (after a kill in rung 1, or of a finished study) makes the cut the first run made: the timings of the
    promotions and of the re-timings after the search pool into the front's speedups, not into the cut's."""
    study = promotion_study([(0.90, 1.0), (0.89, 2.0), (0.88, 1.8), (0.87, 2.5)])
    timer = ConfigTimer({0.01: 2.0, 0.02: 1.9, 0.03: 2.6})
    retime_contenders(study, timer, rung=1, fraction=0.5, console=Console(quiet=True), rounds=10)
    assert enqueue_promotions(study, rung=1, steps=300, fraction=0.5) == [1, 3]
    promoted = study.trials[1]
    attrs = {**promoted.user_attrs, **promotion_attrs(TrialRecord.of(promoted), rung=1, finetune_steps=300)}
    study.add_trial(
        create_trial(
            values=[0.89, 1 / 0.5],
            params=promoted.params,
            distributions=promoted.distributions,
            user_attrs={**attrs, "speedup": 0.5, "latency_rounds": 40},
        )
    )
    record.RETIMED.write(study, {"3": {"speedup": 1.02, "speedup_low": 1.0, "speedup_high": 1.1, "rounds": 40}})
    assert [r.number for r in promotion_candidates(study, rung=1, fraction=0.5)] == [1, 3]
    assert enqueue_promotions(study, rung=1, steps=300, fraction=0.5) == []


def test_a_config_sampled_twice_is_timed_and_promoted_once() -> None:
    study = promotion_study([(0.90, 1.0), (0.89, 2.0), (0.85, 3.0)])
    twin = study.trials[1]
    study.add_trial(
        create_trial(
            values=twin.values, params=twin.params, distributions=twin.distributions, user_attrs=twin.user_attrs
        )
    )
    timer = ConfigTimer({0.01: 2.0, 0.02: 3.0})
    assert retime_contenders(study, timer, rung=1, fraction=1.0, console=Console(quiet=True)) == 2
    assert sorted(timer.timed) == [0.01, 0.02]
    assert [r.number for r in promotion_candidates(study, rung=1, fraction=1.0)] == [1, 2]  # not the twin, 3


def test_a_timing_before_the_cut_counts_as_one_more_timing_not_as_the_verdict() -> None:
    """A slow round in the timing before the cut makes the config borderline, as a slow round in a trial does; the
    re-timing after the search then decides, and the config can still join the front."""
    study = promotion_study([(0.90, 1.0), (0.89, 1.3)])
    retime_contenders(study, ConfigTimer({0.01: 1.2}), rung=1, fraction=1.0, console=Console(quiet=True), rounds=4)
    stored = record.CUT_TIMINGS.read(study)["1"]
    assert stored["cut"] == 1 and stored["rounds"] == 4 and not record.RETIMED.read(study)
    speed = study_speeds(study)[1]
    assert speed.timings == 2 and not speed.retimed
    assert speed.speedup == pytest.approx(math.exp((math.log(1.3) + 4 * math.log(1.2)) / 5))
    record.CUT_TIMINGS.write(study, {"1": {**stored, "speedup_low": 0.95}})
    assert study_speeds(study)[1].borderline and 1 not in [t.number for t in front_trials(study)]
    assert confirm_front_speedups(study, ConfigTimer({0.01: 1.25}), Console(quiet=True)) == 1
    assert [t.number for t in front_trials(study)] == [1, 0]


def test_each_rung_times_its_own_contenders_again() -> None:
    study = promotion_study([(0.90, 1.0), (0.89, 2.0), (0.85, 3.0)])
    timer = ConfigTimer({0.01: 2.0, 0.02: 3.0})
    console = Console(quiet=True)
    assert retime_contenders(study, timer, rung=1, fraction=1.0, console=console) == 2
    for source in (study.trials[1], study.trials[2]):
        attrs = {**source.user_attrs, **promotion_attrs(TrialRecord.of(source), rung=1, finetune_steps=300)}
        study.add_trial(
            create_trial(
                values=source.values, params=source.params, distributions=source.distributions, user_attrs=attrs
            )
        )
    assert retime_contenders(study, timer, rung=2, fraction=0.5, console=console) == 1  # the cut to rung 2 keeps 1
    assert retime_contenders(study, timer, rung=1, fraction=1.0, console=console) == 0
    assert set(record.CUT_TIMINGS.read(study)) == {"1", "2", "3"}  # 3: trial 1's promotion, timed before rung 2


class PromotingTimer(ConfigTimer, MultiFidelity):
    """A :class:`ConfigTimer` that could promote: any evaluation fails the test."""

    def evaluate_at(self, config: CompressionConfig, *, finetune_steps: int, split: str = "val") -> Metrics:
        raise AssertionError("nothing is left to promote")


def test_a_cut_an_earlier_release_made_stands() -> None:
    """A finished study of the release before timings at the cut, run again: its promotions (made on each trial's
    own speedup) stand; nothing is timed or promoted on top of them."""
    study = promotion_study([(0.90, 1.0), (0.89, 2.0), (0.88, 1.5), (0.87, 2.5)], predicted=[1.0, 2.0, 3.0, 2.4])
    source = study.trials[1]
    attrs = {**source.user_attrs, **promotion_attrs(TrialRecord.of(source), rung=1, finetune_steps=300)}
    study.add_trial(
        create_trial(values=source.values, params=source.params, distributions=source.distributions, user_attrs=attrs)
    )
    timer = PromotingTimer({0.01: 2.0, 0.02: 3.0, 0.03: 2.5})
    evaluated = run_promotions(
        study, timer.evaluate, timer, steps=(300,), fraction=0.5, budget=4, console=Console(quiet=True)
    )
    assert evaluated == 0 and timer.timed == [] and len(study.trials) == 5
