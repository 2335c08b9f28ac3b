"""The objective on its own: what each kind of trial records, and when the search stops.

The search is prepared by hand around a tiny real model, with an evaluator whose scores follow a rule (a custom
evaluator, as a user would write one, implementing the zero-shot capability).
"""

from __future__ import annotations

import math

import optuna
import pytest
import torch
from optuna.trial import TrialState
from rich.console import Console
from torch import nn

from ranksearch.compress import dense_model_cost
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import CompressionError, RanksearchError
from ranksearch.evaluate import Evaluator, Metrics, ZeroShotScorer
from ranksearch.results.record import RETRY_OF, Outcome, TrialRecord, anchor_attrs
from ranksearch.search import SearchSpace, config_to_params, record_input_shapes
from ranksearch.search.latency_table import variant_key
from ranksearch.search.screens import HopelessVariant, ZeroShotDrop
from ranksearch.search.sensitivity import Sensitivity
from ranksearch.study import Objective, PreparedSearch, RunContext, RunSettings
from ranksearch.study.budget import optimize_to_budget
from ranksearch.study.objective import observations, time_saved

BASELINE = {"accuracy": 0.9, "latency_ms": 2.0}


class RuleEvaluator(Evaluator, ZeroShotScorer):
    """Accuracy drops 10 points per compressed layer at rank 0.25 and 1 point at 0.5; tucker2 on '2' diverges."""

    def __init__(self) -> None:
        self.evaluated: list[CompressionConfig] = []
        self.scored: list[CompressionConfig] = []
        self.raise_on_evaluate: Exception | None = None

    def _accuracy(self, config: CompressionConfig) -> float:
        return 0.9 - sum(
            0.10 if choice.rank == 0.25 else 0.01 for choice in config.layers.values() if choice.technique != "keep"
        )

    def evaluate(self, config, *, split="val"):
        self.evaluated.append(config)
        if self.raise_on_evaluate is not None:
            raise self.raise_on_evaluate
        if config.layers.get("2", LayerChoice("keep")).technique == "tucker2":
            raise FloatingPointError("loss diverged (nan)\nsecond line")
        compressed = sum(choice.technique != "keep" for choice in config.layers.values())
        return Metrics(
            accuracy=self._accuracy(config),
            latency_ms=2.0 - 0.5 * compressed,
            reference_latency_ms=2.2,
            extra={"time_finetune_s": 1.5, "time_latency_s": 0.5},
        )

    def zero_shot_accuracy(self, config: CompressionConfig) -> float:
        self.scored.append(config)
        return self._accuracy(config) - 0.02

    def zero_shot_baseline(self) -> float:
        return 0.88

    def zero_shot_key(self) -> dict[str, object]:
        return {"rule": 1}


@pytest.fixture
def search() -> PreparedSearch:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1)).eval()
    example = torch.randn(1, 32, 8, 8)
    shapes = record_input_shapes(model, example)
    space = SearchSpace.from_dict({"techniques": {"spatial_conv": ["keep", "svd", "tucker2"]}, "ranks": [0.25, 0.5]})
    settings = RunSettings.of(max_zero_shot_drop=15.0, max_accuracy_drop=5.0)
    context = RunContext(settings, model, None, torch.device("cpu"), example, shapes)
    drops = {"0": {variant_key(LayerChoice("svd", 0.25)): 30.0}}
    sensitivity = Sensitivity(baseline_accuracy=0.88, drops=drops)
    return PreparedSearch(
        settings=settings,
        context=context,
        space=space,
        slots=space.layers(model, shapes),
        evaluator=RuleEvaluator(),
        dense=dense_model_cost(model, example),
        baseline=BASELINE,
        fingerprint={},
        table=None,
        sensitivity=sensitivity,
        screens=(HopelessVariant(sensitivity=sensitivity, max_drop=15.0),),
        zero_shot=ZeroShotDrop(baseline_accuracy=0.88, max_drop=15.0),
    )


def run(search: PreparedSearch, layers: dict[str, LayerChoice], *, objective: Objective | None = None, **attrs):
    """One trial of ``layers`` (enqueued), with ``attrs`` as its user attributes; its record."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    config = CompressionConfig(layers=layers)
    study.enqueue_trial(config_to_params(config, search.slots), user_attrs=attrs)
    study.optimize(objective or Objective(search), n_trials=1)
    return TrialRecord.of(study.trials[0])


def test_a_complete_trial_records_its_config_cost_metrics_drop_speedup_and_constraint(search) -> None:
    record = run(search, {"0": LayerChoice("svd", 0.5), "2": LayerChoice("keep")})
    assert record.state == TrialState.COMPLETE and record.outcome == Outcome.COMPLETE and record.reason == ""
    assert record.layers["0"] == {"technique": "svd", "rank": 0.5}
    assert 0 < record.cost["params"] < search.dense.params and 0 < record.cost["macs"] < search.dense.macs
    assert record.metrics["accuracy"] == pytest.approx(0.89) and record.metrics["latency_ms"] == 1.5
    assert record.accuracy_drop_pp == pytest.approx(1.0)
    assert record.speedup == pytest.approx(2.2 / 1.5)  # against the dense model timed beside it
    assert record.constraints == {"accuracy_drop": pytest.approx(1.0 - 5.0)} and record.feasible
    assert search.evaluator.scored and search.evaluator.evaluated  # zero-shot checked, then evaluated


def test_a_hopeless_variant_is_screened_before_any_measurement(search) -> None:
    objective = Objective(search)
    record = run(search, {"0": LayerChoice("svd", 0.25), "2": LayerChoice("keep")}, objective=objective)
    assert record.state == TrialState.PRUNED and record.outcome == Outcome.SCREENED
    assert record.screen == "hopeless_variant" and not record.counts_toward_budget
    assert record.reason == (
        "rejected before evaluation: layer 0: svd@0.25 alone drops zero-shot accuracy 30.0 points, "
        "over --max-zero-shot-drop 15"
    )
    assert objective.screened_in_a_row == 1
    assert not search.evaluator.scored and not search.evaluator.evaluated


def test_anchors_pass_the_screens(search) -> None:
    record = run(search, {"0": LayerChoice("svd", 0.25), "2": LayerChoice("keep")}, **anchor_attrs("uniform"))
    assert record.outcome == Outcome.COMPLETE and record.anchor == "uniform"
    assert not search.evaluator.scored  # nor is an anchor rejected at zero shot


def test_a_retry_of_a_dead_processs_trial_passes_the_screens(search) -> None:
    """The screens admitted the trial it repeats: a retry is evaluated whatever they say now."""
    record = run(search, {"0": LayerChoice("svd", 0.25), "2": LayerChoice("keep")}, **{RETRY_OF: 3})
    assert record.outcome == Outcome.COMPLETE and record.screen == ""
    assert search.evaluator.evaluated and not search.evaluator.scored


def test_a_zero_shot_rejection_is_pruned_before_evaluation_and_counts(search) -> None:
    record = run(search, {"0": LayerChoice("tucker2", 0.25), "2": LayerChoice("svd", 0.25)})
    assert record.state == TrialState.PRUNED and record.outcome == Outcome.REJECTED_AT_ZERO_SHOT
    assert record.counts_toward_budget and record.screen == ""
    assert record.metrics["zero_shot_accuracy"] == pytest.approx(0.68) and record.metrics["time_zero_shot_s"] >= 0
    assert record.reason == (
        "rejected at zero shot: zero-shot accuracy 68.00 %, 20.0 points below the uncompressed model's "
        "(--max-zero-shot-drop 15)"
    )
    assert record.seconds_saved == 0.0  # no complete trial yet to take the median of
    assert not search.evaluator.evaluated


def test_an_evaluator_exception_fails_the_trial_with_its_first_line(search) -> None:
    record = run(search, {"0": LayerChoice("keep"), "2": LayerChoice("tucker2", 0.5)})
    assert record.state == TrialState.FAIL and record.outcome == Outcome.FAILED
    assert record.reason == "FloatingPointError: loss diverged (nan)"


def test_a_config_that_cannot_be_built_fails_its_trial_only(search) -> None:
    search.evaluator.raise_on_evaluate = CompressionError("layer 0: rank 99 above the full rank 3")
    record = run(search, {"0": LayerChoice("svd", 0.5), "2": LayerChoice("keep")})
    assert record.outcome == Outcome.FAILED and record.reason.startswith("CompressionError: layer 0")


def test_a_user_error_stops_the_search(search) -> None:
    search.evaluator.raise_on_evaluate = RanksearchError("--threads 0: must be positive")
    with pytest.raises(RanksearchError, match="--threads 0"):
        run(search, {"0": LayerChoice("svd", 0.5), "2": LayerChoice("keep")})


def test_a_search_whose_screens_reject_everything_stops(search) -> None:
    objective = Objective(search, max_screened_in_a_row=3)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    hopeless = config_to_params(CompressionConfig(layers={"0": LayerChoice("svd", 0.25)}), search.slots)
    for _ in range(3):
        study.enqueue_trial(hopeless)
    with pytest.raises(RanksearchError, match="3 configs in a row rejected before evaluation"):
        optimize_to_budget(study, objective, budget=5, console=Console(quiet=True))
    assert objective.screened_in_a_row == 3


def test_time_saved_and_observations_read_the_complete_trials(search) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for layers in ({"0": LayerChoice("svd", 0.5)}, {"2": LayerChoice("svd", 0.5)}):
        study.enqueue_trial(config_to_params(CompressionConfig(layers=layers), search.slots))
    study.optimize(Objective(search), n_trials=2)
    assert time_saved(study) == 2.0  # finetune 1.5 + latency 0.5, median over both
    seen = observations(study)
    assert [o.reference_ms for o in seen] == [2.2, 2.2] and all(not math.isnan(o.latency_ms) for o in seen)


def test_queued_configs_form_a_genetic_samplers_first_generations(search) -> None:
    """NSGA-II breeds from the anchors and warm starts: each queued trial takes its place in a generation, and the
    first sampled trial is a child of theirs, not a draw of a random first generation."""
    sampler = optuna.samplers.NSGAIISampler(seed=0, population_size=2)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for layers in (
        {"0": LayerChoice("svd", 0.5)},
        {"2": LayerChoice("svd", 0.5)},
        {"0": LayerChoice("svd", 0.5), "2": LayerChoice("svd", 0.5)},
        {"0": LayerChoice("keep"), "2": LayerChoice("keep")},
    ):
        study.enqueue_trial(config_to_params(CompressionConfig(layers=layers), search.slots))
    study.optimize(Objective(search), n_trials=5)
    generations = [sampler.get_trial_generation(study, trial) for trial in study.trials]
    assert generations == [0, 0, 1, 1, 2]
    assert len(sampler.get_parent_population(study, 2)) == 2  # bred from the queued configs' elite
