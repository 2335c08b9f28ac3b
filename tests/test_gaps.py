"""Filling the measured front's widest gaps with knapsack configs (``--fill-gaps``)."""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import create_trial
from rich.console import Console
from test_knapsack import layer_ms, problem, sensitivity_of, table_of  # noqa: F401 (a fixture)

from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.results.record import CONFIG, GAP_FILL, RUNG, TrialRecord
from ranksearch.search import sample_config
from ranksearch.search.knapsack import knapsack_front
from ranksearch.study import PreparedSearch, RunContext, RunSettings
from ranksearch.study.budget import optimize_to_budget
from ranksearch.study.gaps import GapFill, next_gap_fill


def one_layer(cost: float) -> CompressionConfig:
    """A config whose cost fraction (``cost_of`` below) is its single layer's rank."""
    return CompressionConfig(layers={"a": LayerChoice("svd", cost)})


def cost_of(config: CompressionConfig) -> float:
    return float(config.layers["a"].rank)


def measured_study(*extra: tuple[float, float, float]) -> optuna.Study:
    """Trial: (accuracy, relative latency, cost), first rung and feasible unless said: 0 (0.90, 1.0, 0.99) the
    dense end; 1 (0.89, 0.6, 0.6); 2 (0.85, 0.3, 0.3); 3 (0.70, 0.2, 0.2); 4 (0.80, 0.7, 0.7) dominated;
    5 (0.95, 0.1, 0.1) infeasible; 6 (0.99, 0.05, 0.05) at the second rung; then ``extra`` ones."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    rows = [(0.90, 1.0, 0.99), (0.89, 0.6, 0.6), (0.85, 0.3, 0.3), (0.70, 0.2, 0.2), (0.80, 0.7, 0.7)]
    rows += [(0.95, 0.1, 0.1), (0.99, 0.05, 0.05), *extra]
    for number, (accuracy, latency, cost) in enumerate(rows):
        attrs: dict[str, object] = {CONFIG: one_layer(cost).to_dict()}
        attrs.update({RUNG: 1} if number == 6 else {})
        constraints = {"accuracy_drop": 1.0 if number == 5 else -1.0}
        study.add_trial(create_trial(values=[accuracy, latency], user_attrs=attrs, constraints=constraints))
    return study


def fill(study: optuna.Study, *costs: float) -> GapFill | None:
    return next_gap_fill(study.trials, [(c, one_layer(c)) for c in costs], cost_of=cost_of)


def test_the_widest_gap_holding_a_candidate_gets_the_config_nearest_its_middle() -> None:
    """Front, fastest first: 3, 2, 1, 0. Gaps (latency apart x accuracy apart): 3-2 0.1 x 0.15 = 0.015, 2-1
    0.3 x 0.04 = 0.012, 1-0 0.4 x 0.01 = 0.004. The infeasible, dominated and second-rung trials take no part."""
    study = measured_study()
    chosen = fill(study, 0.05, 0.22, 0.27, 0.45, 0.8)
    assert chosen is not None and chosen.between == (3, 2) and chosen.cost == 0.27  # the middle of 0.2-0.3 is 0.25
    assert chosen.config == one_layer(0.27)
    assert chosen.label("latency") == "knapsack gap, layer latency 27.0 % of dense, between trials 3 and 2"
    chosen = fill(study, 0.05, 0.45, 0.5, 0.8)
    assert chosen is not None and chosen.between == (2, 1) and chosen.cost == 0.45
    chosen = fill(study, 0.05, 0.8)
    assert chosen is not None and chosen.between == (1, 0)
    assert fill(study, 0.05, 0.6, 1.5) is None  # outside every gap, or on a member's own cost
    assert fill(optuna.create_study(directions=["maximize", "minimize"]), 0.5) is None


def test_trials_already_in_a_gap_narrow_it_and_the_next_fill_keeps_away_from_them() -> None:
    """Trial 7 (0.80, 0.35, cost 0.25), dominated by trial 2, already lies in gap 3-2: its width halves to 0.0075,
    under gap 2-1's 0.012. With only gap 3-2 to fill, the candidate farthest from 0.2, 0.25 and 0.3 is taken."""
    study = measured_study((0.80, 0.35, 0.25))
    chosen = fill(study, 0.22, 0.27, 0.45)
    assert chosen is not None and chosen.between == (2, 1) and chosen.cost == 0.45
    chosen = fill(measured_study((0.69, 0.25, 0.22)), 0.24, 0.26)  # 0.24 is nearer the middle, 0.26 farther from 0.22
    assert chosen is not None and chosen.between == (3, 2) and chosen.cost == 0.26


def test_a_gap_spans_the_members_costs_in_either_order() -> None:
    """The table can predict the faster member the costlier: trial 7 (0.885, 0.5, cost 0.25) and trial 8 (0.855,
    0.4, cost 0.5) join the front between trials 2 and 1. Gap 8-7 runs from cost 0.25 to 0.5 (width 0.1 x 0.03,
    halved by trial 2's cost 0.3 inside it), wider than gap 2-8 (0.1 x 0.005), which holds 0.4 too."""
    study = measured_study((0.885, 0.5, 0.25), (0.855, 0.4, 0.5))
    chosen = fill(study, 0.4)
    assert chosen is not None and chosen.between == (8, 7)


def test_the_hook_runs_once_before_each_trial_asked_for_and_never_past_the_budget() -> None:
    """``before_trial`` may enqueue the next trial: each one it queues runs, and it is not asked once the budget is
    spent."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    asked: list[int] = []

    def before_trial(study: optuna.Study) -> None:
        asked.append(len(study.trials))
        study.enqueue_trial({"x": 0.1 * len(study.trials)})

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 0.0, 1.0)
        return x, 1.0 - x

    optimize_to_budget(study, objective, budget=4, before_trial=before_trial, console=Console(quiet=True))
    assert asked == [0, 1, 2, 3]
    assert [t.params["x"] for t in study.trials] == pytest.approx([0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize("fill_gaps", [True, False])
def test_after_the_warm_starts_each_trial_fills_a_gap_until_none_is_left(problem, fill_gaps: bool) -> None:  # noqa: F811
    """A made-up study whose accuracy falls by the summed sensitivity and whose latency is the table's: every
    knapsack config is on the measured front, so the gaps take them one by one, each once, and then the sampler
    does."""
    model, space, slots, shapes = problem
    context = RunContext(
        settings=None, model=model, splits=None, device=torch.device("cpu"), example=None, input_shapes=shapes
    )
    settings = RunSettings.of(model="resnet18", warm_starts="knapsack", max_zero_shot_drop=50.0, fill_gaps=fill_gaps)
    table, sensitivity = table_of(slots), sensitivity_of(slots)
    search = PreparedSearch(settings, context, space, slots, None, None, {}, {}, table, sensitivity, (), None)
    dense = sum(table.variant_ms(name, LayerChoice("keep")) for name in slots)
    front = knapsack_front(sensitivity, slots, table.variant_ms, rank_multiple=space.rank_multiple, max_drop=50.0)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        config = sample_config(trial, slots, rank_multiple=space.rank_multiple)
        trial.set_user_attr(CONFIG, config.to_dict())
        penalty = sum(sensitivity.penalty(n, c) or 0.0 for n, c in config.layers.items() if c.technique != "keep")
        return 0.9 - penalty, layer_ms(table, config) / dense

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    search.enqueue_starts(study)
    queued = len(study.trials)
    for _ in range(queued + len(front) + 3):
        search.fill_gap(study)
        study.optimize(objective, n_trials=1)
    labels = [t.user_attrs.get(GAP_FILL, "") for t in study.trials]
    gaps = [t for t, label in zip(study.trials, labels) if label.startswith("knapsack gap, layer latency ")]
    assert not any(labels[:queued])  # the queue runs first
    assert not any(TrialRecord.of(t).protected for t in gaps)  # screened and rejected like sampled trials
    if not fill_gaps:
        assert gaps == []
        return
    configs = [c for _, c in front]
    assert len(gaps) > 3
    for trial in gaps:
        assert CompressionConfig.from_dict(trial.user_attrs[CONFIG]) in configs
    for trial in gaps:  # never a config tried before it
        earlier = {tuple(sorted(t.params.items())) for t in study.trials[: trial.number]}
        assert tuple(sorted(trial.params.items())) not in earlier
    assert labels[-1] == ""  # no gap holds an untried config any more: the sampler's trial
    untried = [c for c in configs if all(CompressionConfig.from_dict(t.user_attrs[CONFIG]) != c for t in study.trials)]
    assert untried == [] or all(  # what is left lies outside every gap: cheaper than the fastest member tried
        cost < min(layer_ms(table, CompressionConfig.from_dict(t.user_attrs[CONFIG])) / dense for t in study.trials)
        for cost, c in front
        if c in untried
    )


@pytest.mark.parametrize(("args", "expected"), [(["--fill-gaps"], True), ([], False), (["--no-fill-gaps"], False)])
def test_run_passes_fill_gaps_to_the_search(tmp_path, monkeypatch, args: list[str], expected: bool) -> None:
    from typer.testing import CliRunner

    import ranksearch.study
    from ranksearch.cli import app

    ran: list[RunSettings] = []
    monkeypatch.setattr(ranksearch.study, "run_search", lambda settings, **_: ran.append(settings))
    result = CliRunner().invoke(app, ["run", "--results-dir", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    assert [settings.search.fill_gaps for settings in ran] == [expected]
