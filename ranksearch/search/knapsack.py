"""Warm starts from an exact multiple-choice knapsack: per cost budget, the config of least summed sensitivity.

Each searched layer takes one option: keep (its dense cost, no penalty) or a float variant that the sensitivity
pass measured and that costs less than the dense layer (by the latency table's layer times, else by MACs), with its
:meth:`~ranksearch.search.sensitivity.Sensitivity.penalty` (the KL divergence it causes alone). Summed over layers,
cost approximates the config's latency and penalty its damage; for a budget, :func:`solve_knapsack` finds the
assignment of least summed penalty whose summed cost is within it.

The solution is exact, with costs as they are (nothing is rounded onto a grid): dynamic programming over the
Pareto front of (cost, penalty) of the layers so far, in the manner of Nemhauser and Ullmann. Adding a layer
combines each partial assignment on the front with each of the layer's options and keeps those no other one beats
on both. Swapping an optimal assignment's first layers for a partial assignment that beats them on both keeps it
optimal and within its budget, so the last front holds the optimum of every budget at once. The front can grow
exponentially in theory; for ResNet-18's 19 searched layers it stays at a few thousand assignments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.search.sensitivity import Sensitivity, float_variants
from ranksearch.search.space import LayerSlot

__all__ = [
    "KNAPSACK_BUDGETS",
    "budgets_within_reach",
    "config_cost",
    "knapsack_configs",
    "knapsack_front",
    "solve_knapsack",
]

KNAPSACK_BUDGETS = (0.8, 0.6, 0.45, 0.36, 0.3, 0.26, 0.23, 0.2, 0.17, 0.14)
"""Budgets of the knapsack warm starts, as fractions of the searched layers' dense cost, loosest first: dense at
the fast end, where a few percent of latency decide whether a config recovers within half a point (docs/search.md,
"A denser sweep at the fast end"). Where the options cannot reach the tightest, :func:`knapsack_configs` moves the
sweep up to what they reach."""


_Options = dict[str, list[tuple[LayerChoice, float, float]]]
"""Per searched layer, its knapsack options: (choice, cost, penalty), keep first."""


def solve_knapsack(
    groups: Sequence[Sequence[tuple[float, float]]], budgets: Sequence[float]
) -> list[tuple[int, ...] | None]:
    """Per budget, the index of one option per group whose summed penalty is least with summed cost at most the
    budget (of equal penalties, the cheaper), or None where no assignment fits. An option is a (cost, penalty)
    pair; every group needs one."""
    front = _KnapsackFront(groups)
    solutions: list[tuple[int, ...] | None] = []
    for budget in budgets:
        state = int(np.searchsorted(front.costs, budget, side="right")) - 1  # the penalty falls as cost rises
        solutions.append(None if state < 0 else front.assignment(state))
    return solutions


class _KnapsackFront:
    """Every assignment no other beats on both summed cost and summed penalty, cheapest first."""

    def __init__(self, groups: Sequence[Sequence[tuple[float, float]]]) -> None:
        if any(not group for group in groups):
            raise ValueError("every group needs at least one option")
        costs, penalties = np.zeros(1), np.zeros(1)
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []  # per group: each front state's previous state, option
        for group in groups:
            options = np.asarray(group, dtype=float)
            total_cost = (costs[:, None] + options[None, :, 0]).ravel()
            total_penalty = (penalties[:, None] + options[None, :, 1]).ravel()
            order = np.lexsort((total_penalty, total_cost))  # by cost, then penalty
            sorted_penalty = total_penalty[order]
            best_cheaper = np.minimum.accumulate(np.concatenate(([np.inf], sorted_penalty[:-1])))
            front = order[sorted_penalty < best_cheaper]  # beats every cheaper (or as cheap) assignment
            self.steps.append(np.divmod(front, len(group)))
            costs, penalties = total_cost[front], total_penalty[front]
        self.costs = costs

    def assignment(self, state: int) -> tuple[int, ...]:
        """The option index per group of the front's ``state``-th assignment."""
        picks = []
        for previous, option in reversed(self.steps):
            picks.append(int(option[state]))
            state = int(previous[state])
        return tuple(reversed(picks))


def knapsack_configs(
    sensitivity: Sensitivity,
    slots: Mapping[str, LayerSlot],
    cost: Callable[[str, LayerChoice], float],
    *,
    rank_multiple: int,
    budgets: Sequence[float] = KNAPSACK_BUDGETS,
    max_drop: float = math.inf,
) -> dict[float, CompressionConfig]:
    """Per budget (a fraction of the searched layers' summed dense ``cost``), the config of least summed
    :meth:`~Sensitivity.penalty` within it. A layer's options are keep and each float variant measured (finite
    penalty), at most ``max_drop`` points of zero-shot drop alone and cheaper than the dense layer.

    Where the cheapest assignment (every layer at its cheapest option) costs more than the tightest budget, the
    budgets are moved up onto the range it leaves, each keeping its share of the saving the tightest one asked for
    (:func:`budgets_within_reach`): the sweep then ends exactly at the fastest config the options allow and keeps all
    its budgets, rather than collapsing every budget below that floor into it (on a host where the floor sat at 44.7 %
    of dense, the ten budgets gave three configs, the fastest 2.10x where the floor's measured 2.36x). Budgets whose
    config an earlier budget gave are left out."""
    options, dense = _all_options(sensitivity, slots, cost, max_drop)
    groups = _groups(options)
    cheapest = sum(min(option_cost for option_cost, _ in group) for group in groups)
    floor = cheapest / dense if dense > 0 else 0.0
    fractions = list(dict.fromkeys(max(fraction, floor) for fraction in budgets_within_reach(budgets, floor)))
    out: dict[float, CompressionConfig] = {}
    limits = [max(fraction * dense, cheapest) for fraction in fractions]  # the floor's limit never rounds below it
    for fraction, solution in zip(fractions, solve_knapsack(groups, limits)):
        if solution is None:
            continue
        config = _config(options, solution, rank_multiple)
        if config not in out.values():
            out[fraction] = config
    return out


def budgets_within_reach(budgets: Sequence[float], floor: float) -> list[float]:
    """``budgets`` (fractions of the dense cost) as they are where ``floor``, the cheapest reachable fraction, is at
    most the tightest of them; otherwise mapped linearly onto [``floor``, 1] so that the tightest lands on the floor
    and each keeps its share of the saving (1 - budget) the tightest promised."""
    if not budgets or floor <= min(budgets):
        return list(budgets)
    tightest = min(budgets)
    return [1 - (1 - budget) * (1 - floor) / (1 - tightest) for budget in budgets]


def knapsack_front(
    sensitivity: Sensitivity,
    slots: Mapping[str, LayerSlot],
    cost: Callable[[str, LayerChoice], float],
    *,
    rank_multiple: int,
    max_drop: float = math.inf,
) -> list[tuple[float, CompressionConfig]]:
    """Every config on the knapsack's (summed cost, summed penalty) front, with its summed cost as a fraction of
    the searched layers' dense cost, cheapest first: the config of least penalty for every budget from its cost
    up to the next one's. The options per layer are :func:`knapsack_configs`'s."""
    options, dense = _all_options(sensitivity, slots, cost, max_drop)
    front = _KnapsackFront(_groups(options))
    return [
        (float(front.costs[state]) / dense, _config(options, front.assignment(state), rank_multiple))
        for state in range(len(front.costs))
    ]


def config_cost(
    config: CompressionConfig, slots: Mapping[str, LayerSlot], cost: Callable[[str, LayerChoice], float]
) -> float:
    """``config``'s summed layer ``cost`` over the searched layers (a layer it leaves out is kept), summed in the
    slots' order, as the knapsack sums it."""
    keep = LayerChoice("keep")
    return sum(cost(name, config.layers.get(name, keep)) for name in slots)


def _all_options(
    sensitivity: Sensitivity,
    slots: Mapping[str, LayerSlot],
    cost: Callable[[str, LayerChoice], float],
    max_drop: float,
) -> tuple[_Options, float]:
    """Every searched layer's options, and the summed dense cost."""
    options = {name: _layer_options(sensitivity, name, slot, cost, max_drop) for name, slot in slots.items()}
    return options, config_cost(CompressionConfig(layers={}), slots, cost)


def _groups(options: _Options) -> list[list[tuple[float, float]]]:
    """The (cost, penalty) pairs of each layer's options, as the knapsack takes them."""
    return [[(option_cost, penalty) for _, option_cost, penalty in layer] for layer in options.values()]


def _config(options: _Options, solution: Sequence[int], rank_multiple: int) -> CompressionConfig:
    """The config that takes, per layer, the option ``solution`` picks."""
    layers = {name: options[name][pick][0] for name, pick in zip(options, solution)}
    return CompressionConfig(layers=layers, rank_multiple=rank_multiple)


def _layer_options(
    sensitivity: Sensitivity,
    name: str,
    slot: LayerSlot,
    cost: Callable[[str, LayerChoice], float],
    max_drop: float,
) -> list[tuple[LayerChoice, float, float]]:
    """Keep and the layer's usable float variants, each with its cost and penalty."""
    keep = LayerChoice("keep")
    dense = cost(name, keep)
    options = [(keep, dense, 0.0)]
    for choice in float_variants(slot):
        penalty = sensitivity.penalty(name, choice)
        if penalty is None or not math.isfinite(penalty) or sensitivity.drop(name, choice) > max_drop:
            continue
        variant_cost = cost(name, choice)
        if variant_cost < dense:
            options.append((choice, variant_cost, penalty))
    return options
