"""The knapsack warm starts: the solver against brute force, the configs it gives within their budgets, and the
distinct warm starts the search queues from them."""

from __future__ import annotations

import itertools
import math
import random
import re

import optuna
import pytest
import torch
import torchvision
from torch import nn

from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.results.record import ANCHOR, WARM_START
from ranksearch.search import (
    SearchSpace,
    default_space_path,
    sample_config,
    uniform_config,
)
from ranksearch.search.knapsack import (
    KNAPSACK_BUDGETS,
    budgets_within_reach,
    config_cost,
    knapsack_configs,
    knapsack_front,
    solve_knapsack,
)
from ranksearch.search.latency_table import LatencyTable, variant_key, variants
from ranksearch.search.sensitivity import Sensitivity, float_variants
from ranksearch.search.space import record_input_shapes
from ranksearch.study import PreparedSearch, RunContext, RunSettings

SPACE = {
    "layers": {"include": ["*"], "types": ["Conv2d"]},
    "techniques": {"spatial_conv": ["keep", "svd", "tucker2"], "pointwise_conv": ["keep", "svd"]},
    "ranks": [0.25, 0.5, 0.75],
}


def brute_force(groups: list[list[tuple[float, float]]], budget: float) -> float | None:
    """The least summed penalty of any assignment within ``budget``, or None."""
    best = None
    for picks in itertools.product(*groups):
        if sum(cost for cost, _ in picks) <= budget:
            penalty = sum(penalty for _, penalty in picks)
            best = penalty if best is None else min(best, penalty)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_solver_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    integral = seed % 2 == 0  # whole costs and penalties: many ties
    draw = (lambda: float(rng.randint(0, 6))) if integral else (lambda: rng.uniform(0, 5))
    groups = [[(draw(), draw()) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 5))]
    least = sum(min(cost for cost, _ in group) for group in groups)
    most = sum(max(cost for cost, _ in group) for group in groups)
    budgets = [least - 0.5, least, (least + most) / 2, most, *(rng.uniform(least, most) for _ in range(4))]
    for budget, solution in zip(budgets, solve_knapsack(groups, budgets), strict=True):
        expected = brute_force(groups, budget)
        if expected is None:
            assert solution is None
            continue
        assert solution is not None and len(solution) == len(groups)
        picks = [group[pick] for group, pick in zip(groups, solution, strict=True)]
        assert sum(cost for cost, _ in picks) <= budget
        assert sum(penalty for _, penalty in picks) == pytest.approx(expected)


def test_a_group_without_options_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one option"):
        solve_knapsack([[(1.0, 0.0)], []], [2.0])


@pytest.fixture(scope="module")
def problem():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 1)
    )
    shapes = record_input_shapes(model, torch.randn(1, 3, 8, 8))
    space = SearchSpace.from_dict(SPACE)
    return model, space, space.layers(model, shapes), shapes


def sensitivity_of(slots, *, divergences: bool = True) -> Sensitivity:
    """Made-up measurements: smaller ranks lose more; layer '2' is the sensitive one; tucker2@0.25 on '2' was beyond
    hopeless, and svd@0.75 on '2' unmeasured (as if slower than the dense layer)."""
    drops: dict[str, dict[str, float]] = {}
    kls: dict[str, dict[str, float]] = {}
    for name, slot in slots.items():
        drops[name], kls[name] = {}, {}
        for choice in float_variants(slot):
            weight = 8.0 if name == "2" else 1.0
            loss = weight * (1 - choice.rank) ** 2 * (1.5 if choice.technique == "tucker2" else 1.0)
            drops[name][variant_key(choice)] = 10 * loss
            kls[name][variant_key(choice)] = loss / 10
    for table in (drops, kls):
        table["2"][variant_key(LayerChoice("tucker2", 0.25))] = math.inf
        del table["2"][variant_key(LayerChoice("svd", 0.75))]
    return Sensitivity(baseline_accuracy=0.9, drops=drops, divergences=kls if divergences else None)


def table_of(slots) -> LatencyTable:
    """Made-up layer times: the dense layer 1 ms (layer '2': 3 ms), a variant its rank's share, tucker2 a little
    more; tucker2@0.5 on '0' slower than dense."""
    layer_ms: dict[str, dict[str, float]] = {}
    for name, slot in slots.items():
        dense = 3.0 if name == "2" else 1.0
        layer_ms[name] = {
            variant_key(c): dense
            if c.technique == "keep"
            else dense * (c.rank + (0.1 if c.technique == "tucker2" else 0))
            for c in variants(slot)
        }
    layer_ms["0"][variant_key(LayerChoice("tucker2", 0.5))] = 1.2
    return LatencyTable(layer_ms=layer_ms)


def layer_ms(table: LatencyTable, config: CompressionConfig) -> float:
    return sum(table.layer_ms[name][variant_key(choice)] for name, choice in config.layers.items())


@pytest.mark.parametrize("divergences", [True, False], ids=["kl", "drops"])
def test_knapsack_configs_are_the_least_sensitive_within_their_budgets(problem, divergences: bool) -> None:
    _, space, slots, _ = problem
    sensitivity, table = sensitivity_of(slots, divergences=divergences), table_of(slots)

    def cost(name: str, choice: LayerChoice) -> float:
        return table.layer_ms[name][variant_key(choice)]

    configs = knapsack_configs(sensitivity, slots, cost, rank_multiple=space.rank_multiple, max_drop=50.0)
    assert len(configs) > 2 and len(set(map(repr, configs.values()))) == len(configs)
    assert list(configs) == sorted(configs, reverse=True)
    dense = table.dense_layers_ms

    def penalty(config: CompressionConfig) -> float:
        return sum(sensitivity.penalty(name, choice) for name, choice in config.layers.items())

    allowed = {  # what each layer may take: keep, measured, not beyond hopeless, faster than dense, within max_drop
        name: [LayerChoice("keep")]
        + [
            c
            for c in float_variants(slot)
            if sensitivity.penalty(name, c) is not None
            and math.isfinite(sensitivity.penalty(name, c))
            and sensitivity.drop(name, c) <= 50.0
            and cost(name, c) < cost(name, LayerChoice("keep"))
        ]
        for name, slot in slots.items()
    }
    floor = sum(min(cost(name, c) for c in choices) for name, choices in allowed.items()) / dense
    assert floor > min(KNAPSACK_BUDGETS)  # so the sweep is moved up onto what the options reach
    assert layer_ms(table, configs[min(configs)]) == pytest.approx(floor * dense)  # the sweep ends at the fastest
    assert set(configs) <= set(budgets_within_reach(KNAPSACK_BUDGETS, floor)) | {min(configs)}
    for budget, config in configs.items():
        assert layer_ms(table, config) <= budget * dense * (1 + 1e-9)  # the floor: the cheapest cost itself
        for name, choice in config.layers.items():
            assert choice in allowed[name]
        best = min(
            penalty(candidate)
            for candidate in (
                CompressionConfig(layers=dict(zip(allowed, picks, strict=True)), rank_multiple=space.rank_multiple)
                for picks in itertools.product(*allowed.values())
            )
            if layer_ms(table, candidate) <= budget * dense * (1 + 1e-9)
        )
        assert penalty(config) == pytest.approx(best)
    loosest = next(iter(configs.values()))
    assert loosest.layers["2"].technique == "keep"  # the sensitive layer is the last one compressed


def test_max_drop_leaves_hopeless_variants_out(problem) -> None:
    _, space, slots, _ = problem
    sensitivity, table = sensitivity_of(slots), table_of(slots)

    def cost(name: str, choice: LayerChoice) -> float:
        return table.layer_ms[name][variant_key(choice)]

    configs = knapsack_configs(sensitivity, slots, cost, rank_multiple=space.rank_multiple, max_drop=10.0)
    assert configs
    assert all(sensitivity.drop(n, c) <= 10.0 for config in configs.values() for n, c in config.layers.items())
    loose = knapsack_configs(sensitivity, slots, cost, rank_multiple=space.rank_multiple, max_drop=50.0)
    assert any(sensitivity.drop(n, c) > 10.0 for config in loose.values() for n, c in config.layers.items())
    harsh = knapsack_configs(
        sensitivity, slots, cost, rank_multiple=space.rank_multiple, budgets=(0.15,), max_drop=10.0
    )
    # nothing within 10 points fits 15 % of the dense layers' time: the budget is raised to the cheapest assignment
    ((budget, config),) = harsh.items()
    dense = table.dense_layers_ms
    usable = {
        name: [cost(name, LayerChoice("keep"))]
        + [
            cost(name, c)
            for c in float_variants(slot)
            if math.isfinite(sensitivity.penalty(name, c) or math.inf) and sensitivity.drop(name, c) <= 10.0
        ]
        for name, slot in slots.items()
    }
    cheapest = sum(min(costs) for costs in usable.values())
    assert budget == pytest.approx(cheapest / dense) and budget > 0.15
    assert layer_ms(table, config) == pytest.approx(cheapest)  # every layer at its cheapest option: the fastest


@pytest.mark.parametrize("with_table", [True, False], ids=["latency", "macs"])
def test_enqueue_starts_queues_distinct_knapsack_configs_within_their_budgets(problem, with_table: bool) -> None:
    model, space, slots, shapes = problem
    context = RunContext(
        settings=None, model=model, splits=None, device=torch.device("cpu"), example=None, input_shapes=shapes
    )
    settings = RunSettings.of(model="resnet18", warm_starts="knapsack", max_zero_shot_drop=50.0)
    table = table_of(slots) if with_table else None
    sensitivity = sensitivity_of(slots)
    search = PreparedSearch(settings, context, space, slots, None, None, {}, {}, table, sensitivity, (), None)
    study = optuna.create_study()
    search.enqueue_starts(study)
    queued: list[tuple[str | None, CompressionConfig]] = []

    def objective(trial: optuna.Trial) -> float:  # the queued trials run first, in order
        queued.append(
            (trial.user_attrs.get(WARM_START), sample_config(trial, slots, rank_multiple=space.rank_multiple))
        )
        return 0.0

    study.optimize(objective, n_trials=len(study.trials))
    assert len({repr(c) for _, c in queued}) == len(queued)  # nothing queued twice
    starts = [(label, c) for label, c in queued if label is not None]
    anchors = [c for label, c in queued if label is None]
    assert len(starts) > 2 and len(anchors) == 5
    cost = search.variant_cost()
    dense = sum(cost(name, LayerChoice("keep")) for name in slots)
    measure = "latency" if with_table else "MACs"
    for label, config in starts:
        found = re.fullmatch(rf"knapsack, layer {measure} <= (\d+(?:\.\d)?) % of dense", label)
        assert found, label
        assert sum(cost(name, choice) for name, choice in config.layers.items()) <= float(found[1]) / 100 * dense
    expected = knapsack_configs(sensitivity, slots, cost, rank_multiple=space.rank_multiple, max_drop=50.0)
    assert [c for _, c in starts] == [c for c in expected.values() if c not in anchors]


def test_the_anchors_reach_the_shipped_spaces_fastest_uniform_config() -> None:
    """On ResNet-18 with its shipped space the study starts with the baseline and five uniform configs, the last
    Tucker-2 at 0.125 of full rank on every searched layer (the fastest the space offers uniformly)."""
    with torch.device("meta"):
        model = torchvision.models.resnet18(num_classes=10)
        shapes = record_input_shapes(model, torch.empty(1, 3, 64, 64, device="meta"))
    space = SearchSpace.load(default_space_path("resnet"))
    slots = space.layers(model, shapes)
    context = RunContext(
        settings=None, model=model, splits=None, device=torch.device("cpu"), example=None, input_shapes=shapes
    )
    search = PreparedSearch(
        RunSettings.of(model="resnet18"), context, space, slots, None, None, {}, {}, None, None, (), None
    )
    study = optuna.create_study()
    search.enqueue_starts(study)
    labels = [trial.user_attrs[ANCHOR] for trial in study.get_trials(deepcopy=False)]
    assert labels == [
        "baseline",
        "uniform svd@0.5",
        "uniform tucker2@0.5",
        "uniform svd@0.25",
        "uniform tucker2@0.25",
        "uniform tucker2@0.125",
    ]
    queued: list[CompressionConfig] = []

    def objective(trial: optuna.Trial) -> float:
        queued.append(sample_config(trial, slots, rank_multiple=space.rank_multiple))
        return 0.0

    study.optimize(objective, n_trials=len(labels))
    fastest = uniform_config(slots, "tucker2", 0.125, rank_multiple=space.rank_multiple)
    assert queued[-1] == fastest
    assert {choice.technique for choice in fastest.layers.values()} == {"tucker2"}


@pytest.mark.parametrize("kind", ["greedy", "none"])
def test_warm_starts_can_be_the_greedy_levels_or_none(problem, kind: str) -> None:
    model, space, slots, shapes = problem
    context = RunContext(
        settings=None, model=model, splits=None, device=torch.device("cpu"), example=None, input_shapes=shapes
    )
    settings = RunSettings.of(model="resnet18", warm_starts=kind)
    sensitivity = sensitivity_of(slots)
    search = PreparedSearch(settings, context, space, slots, None, None, {}, {}, None, sensitivity, (), None)
    study = optuna.create_study()
    search.enqueue_starts(study)
    labels = [t.user_attrs[WARM_START] for t in study.trials if WARM_START in t.user_attrs]
    if kind == "none":
        assert labels == [] and len(study.trials) == 5
    else:
        greedy = sensitivity.greedy_configs(slots, search.variant_cost(), rank_multiple=space.rank_multiple)
        assert labels and all(label.startswith("greedy, each layer <= ") for label in labels)
        assert len(labels) <= len(greedy)


@pytest.mark.parametrize("budget", [50, 9], ids=["room-for-all", "room-for-4"])
def test_knapsack_and_greedy_warm_starts_interleave_by_cost(problem, budget: int) -> None:
    """``knapsack+greedy`` queues the knapsack's configs and the greedy levels not already queued, mildest first;
    a budget too small for them all keeps both ends of the merged sweep."""
    model, space, slots, shapes = problem
    context = RunContext(
        settings=None, model=model, splits=None, device=torch.device("cpu"), example=None, input_shapes=shapes
    )
    settings = RunSettings.of(model="resnet18", warm_starts="knapsack+greedy", budget=budget, max_zero_shot_drop=50.0)
    sensitivity = sensitivity_of(slots)
    search = PreparedSearch(settings, context, space, slots, None, None, {}, {}, table_of(slots), sensitivity, (), None)
    study = optuna.create_study()
    search.enqueue_starts(study)
    queued: list[tuple[str | None, CompressionConfig]] = []

    def objective(trial: optuna.Trial) -> float:
        queued.append(
            (trial.user_attrs.get(WARM_START), sample_config(trial, slots, rank_multiple=space.rank_multiple))
        )
        return 0.0

    study.optimize(objective, n_trials=len(study.trials))
    anchors = [c for label, c in queued if label is None]
    starts = [(label, c) for label, c in queued if label is not None]
    cost = search.variant_cost()
    costs = [config_cost(c, slots, cost) for _, c in starts]
    assert costs == sorted(costs, reverse=True) and len({repr(c) for _, c in queued}) == len(queued)
    knapsack = knapsack_configs(sensitivity, slots, cost, rank_multiple=space.rank_multiple, max_drop=50.0)
    greedy = sensitivity.greedy_configs(slots, cost, rank_multiple=space.rank_multiple)
    merged = {repr(c): c for c in [*knapsack.values(), *greedy.values()] if c not in anchors}
    assert len(merged) > 4 and not {repr(c) for c in greedy.values()} <= {repr(c) for c in knapsack.values()}
    if budget == 50:
        assert {repr(c) for _, c in starts} == set(merged)
        labels = [label for label, _ in starts]
        assert sum(label.startswith("knapsack, layer latency <= ") for label in labels) >= 2
        assert sum(label.startswith("greedy, each layer <= ") for label in labels) >= 1
    else:
        assert len(starts) == budget - len(anchors) == 4
        merged_costs = sorted((config_cost(c, slots, cost) for c in merged.values()), reverse=True)
        assert costs[0] == pytest.approx(merged_costs[0]) and costs[-1] == pytest.approx(merged_costs[-1])


def test_the_knapsack_front_holds_each_budgets_config_cheapest_first(problem) -> None:
    """Every config on the front is the least-penalty one for the budgets from its cost to the next one's: the
    warm starts are among them, costs rise and summed penalties fall along it."""
    _, space, slots, _ = problem
    table, sensitivity = table_of(slots), sensitivity_of(slots)
    front = knapsack_front(sensitivity, slots, table.variant_ms, rank_multiple=space.rank_multiple, max_drop=50.0)
    dense = sum(table.variant_ms(name, LayerChoice("keep")) for name in slots)
    costs = [cost for cost, _ in front]
    penalties = [
        sum(
            sensitivity.penalty(name, choice) or 0.0
            for name, choice in config.layers.items()
            if choice.technique != "keep"
        )
        for _, config in front
    ]
    assert len(front) > 5 and costs == sorted(costs) and len(set(costs)) == len(costs)
    assert all(b < a for a, b in itertools.pairwise(penalties))
    for cost, config in front:
        assert layer_ms(table, config) / dense == pytest.approx(cost)
    starts = knapsack_configs(sensitivity, slots, table.variant_ms, rank_multiple=space.rank_multiple, max_drop=50.0)
    for budget, config in starts.items():
        within = [c for cost, c in front if cost <= budget + 1e-9]
        assert within[-1] == config  # the floor budget is the cheapest cost itself: never empty


def test_the_fastest_warm_start_is_the_cheapest_assignment_however_it_rounds(problem) -> None:
    """A floor off a whole percent is the sweep's last budget as it is, not rounded up (the slack would buy
    accuracy back with speed), and its label's bound still holds."""
    model, space, slots, shapes = problem
    context = RunContext(
        settings=None, model=model, splits=None, device=torch.device("cpu"), example=None, input_shapes=shapes
    )
    table = table_of(slots)
    # the floor, unlike any anchor: tucker2@0.25 on '0', svd@0.25 on '2' and '3', (0.2417 + 0.75 + 0.25) / 5 = 24.834 %
    table.layer_ms["0"][variant_key(LayerChoice("tucker2", 0.25))] = 0.2417
    settings = RunSettings.of(model="resnet18", max_zero_shot_drop=50.0)
    search = PreparedSearch(settings, context, space, slots, None, None, {}, {}, table, sensitivity_of(slots), (), None)
    study = optuna.create_study()
    search.enqueue_starts(study)
    queued: list[CompressionConfig] = []
    study.optimize(
        lambda trial: queued.append(sample_config(trial, slots, rank_multiple=space.rank_multiple)) or 0.0,
        n_trials=len(study.trials),
    )
    assert study.trials[-1].user_attrs[WARM_START] == "knapsack, layer latency <= 24.9 % of dense"
    assert layer_ms(table, queued[-1]) == pytest.approx(1.2417)  # every layer at its cheapest option


def test_budgets_below_the_floor_move_up_onto_what_the_options_reach() -> None:
    """Reachable budgets stay; otherwise the tightest lands on the floor, the loosest stays near dense, and the steps
    keep their order and shares: the sweep keeps its ten points instead of collapsing into the floor."""
    assert budgets_within_reach(KNAPSACK_BUDGETS, 0.1) == list(KNAPSACK_BUDGETS)
    assert budgets_within_reach((), 0.5) == []
    moved = budgets_within_reach(KNAPSACK_BUDGETS, 0.447)
    assert moved[-1] == pytest.approx(0.447) and moved == sorted(moved, reverse=True)
    assert len(set(moved)) == len(KNAPSACK_BUDGETS) and 0.8 < moved[0] < 1
    shares = [(1 - b) / (1 - 0.447) for b in moved]
    assert shares == pytest.approx([(1 - b) / (1 - min(KNAPSACK_BUDGETS)) for b in KNAPSACK_BUDGETS])


def test_a_high_floor_still_gets_a_sweep_of_configs(problem) -> None:
    """Every variant at least 55 % of its dense layer: the budgets under that would all give the floor's config."""
    _, space, slots, _ = problem
    table, sensitivity = table_of(slots), sensitivity_of(slots)
    for times in table.layer_ms.values():
        dense = times[variant_key(LayerChoice("keep"))]
        for key, ms in times.items():
            times[key] = dense if ms == dense else 0.55 * dense + 0.4 * ms
    configs = knapsack_configs(sensitivity, slots, table.variant_ms, rank_multiple=space.rank_multiple, max_drop=50.0)
    fractions = [layer_ms(table, config) / table.dense_layers_ms for config in configs.values()]
    assert min(fractions) > 0.6 and len(configs) >= 5  # the unmoved budgets would give at most 0.8, 0.6 and the floor
