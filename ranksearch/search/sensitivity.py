"""Per-layer sensitivity: what each searched layer's variants cost, each alone, before any fine-tuning.

One layer at a time is replaced (float, plain decomposition), BatchNorm is recalibrated, and the model is
measured on held-out images without fine-tuning: its zero-shot accuracy drop and, where the evaluator measures
it, the mean KL divergence of its outputs from the uncompressed model's. Within a technique, ranks are measured
from the largest down; once one is hopeless (its drop exceeds ``hopeless``), the smaller ranks are taken as
hopeless too, unmeasured. Measurements are cached in a JSON file keyed by the weights and settings.

The result drives two things in a search: configs using a variant that is hopeless alone are not evaluated
(by its accuracy drop), and warm-start configs are chosen on it: :func:`ranksearch.search.knapsack.knapsack_configs`
minimises the summed :meth:`Sensitivity.penalty` within latency budgets: the KL divergence, continuous on every
image where an accuracy drop counts the few images whose top class flips, so it is less noisy and adds up over
layers better; :meth:`Sensitivity.greedy_configs` gives equal sensitivity per layer (AIMET's greedy ratio
selection, ALDS's error allocation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ranksearch.compress import layer_cost
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.search.latency_table import variant_key
from ranksearch.search.space import LayerSlot
from ranksearch.util import atomic_write_text, read_json_cache

__all__ = ["GREEDY_LEVELS", "Sensitivity", "VariantScore", "float_variants", "measure_sensitivity"]

GREEDY_LEVELS = (0.5, 1.0, 2.0, 4.0)
"""Per-layer zero-shot drops (points) of the greedy warm-start configs, mildest first."""


@dataclass(frozen=True)
class VariantScore:
    """What the sensitivity pass measures of a config without fine-tuning (one layer replaced, or none)."""

    accuracy: float
    kl: float | None = None
    """Mean KL divergence of its outputs from the uncompressed model's (nats per image); None: not measured."""


@dataclass(frozen=True)
class Sensitivity:
    """Zero-shot accuracy drop (points) per layer and float variant, and (where measured) the KL divergence;
    ``inf`` where a larger rank of the same technique was already hopeless."""

    baseline_accuracy: float
    drops: Mapping[str, Mapping[str, float]]
    divergences: Mapping[str, Mapping[str, float]] | None = None
    """Per layer and float variant, the mean KL divergence alone; None where the evaluator measures none."""

    def drop(self, layer: str, choice: LayerChoice) -> float:
        """The drop of ``choice`` on ``layer`` alone (its float variant; 0 for keep and unmeasured layers)."""
        if choice.technique == "keep":
            return 0.0
        return self.drops.get(layer, {}).get(variant_key(_float(choice)), 0.0)

    def penalty(self, layer: str, choice: LayerChoice) -> float | None:
        """The additive sensitivity of ``choice`` on ``layer`` (its float variant): its KL divergence alone, or its
        drop in points where no divergence was measured; 0 for keep, None where the variant was not measured."""
        if choice.technique == "keep":
            return 0.0
        table = self.drops if self.divergences is None else self.divergences
        return table.get(layer, {}).get(variant_key(_float(choice)))

    def hopeless_layer(self, config: CompressionConfig, max_drop: float) -> tuple[str, float] | None:
        """The first layer of ``config`` whose variant alone drops more than ``max_drop`` points, with its drop."""
        for name, choice in config.layers.items():
            drop = self.drop(name, choice)
            if drop > max_drop:
                return name, drop
        return None

    def greedy_configs(
        self,
        slots: Mapping[str, LayerSlot],
        cost: Callable[[str, LayerChoice], float],
        *,
        rank_multiple: int,
        levels: Sequence[float] = GREEDY_LEVELS,
    ) -> dict[float, CompressionConfig]:
        """Per level: each layer takes its cheapest float variant (by ``cost``) whose drop alone is at most the
        level, or keep. Levels giving a config already listed are left out."""
        out: dict[float, CompressionConfig] = {}
        for level in levels:
            layers = {}
            for name, slot in slots.items():
                candidates = [LayerChoice("keep")] + [
                    choice for choice in float_variants(slot) if self.drop(name, choice) <= level
                ]
                layers[name] = min(candidates, key=lambda choice, name=name: cost(name, choice))
            config = CompressionConfig(layers=layers, rank_multiple=rank_multiple)
            if config not in out.values():
                out[level] = config
        return out

    def to_json(self) -> dict[str, object]:
        return {"baseline_accuracy": self.baseline_accuracy, "drops": self.drops, "divergences": self.divergences}


def measure_sensitivity(
    model: nn.Module,
    slots: Mapping[str, LayerSlot],
    input_shapes: Mapping[str, tuple[int, ...]],
    *,
    score: Callable[[CompressionConfig], VariantScore],
    baseline: VariantScore,
    hopeless: float,
    rank_multiple: int,
    worth: Callable[[str, LayerChoice], bool] | None = None,
    cache_file: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Sensitivity:
    """Measure each slot's float variants with ``score(config)`` (one layer replaced) against ``baseline``, the
    uncompressed model's score; divergences are kept when ``baseline.kl`` is measured.

    Only variants ``worth(layer, choice)`` are measured (the search passes "faster than the dense layer
    in the latency table": a slower variant is dominated by keep); the others are left out of ``drops``.
    ``cache_file`` (JSON: layer -> variant -> accuracy, or ``{"accuracy", "kl"}``) must be specific to the weights,
    data and scoring settings; it is rewritten after each layer, so an interrupted pass resumes. A cached entry
    without the divergence this pass measures, or unreadable, is measured again.
    """
    with_kl = baseline.kl is not None
    cache = _read_cache(cache_file)
    modules = dict(model.named_modules())
    jobs = [(name, technique) for name, slot in slots.items() for technique in slot.techniques if technique != "keep"]
    total = sum(
        worth is None or worth(name, c)
        for name, technique in jobs
        for c in float_variants(slots[name])
        if c.technique == technique
    )
    drops: dict[str, dict[str, float]] = {name: {} for name in slots}
    kls: dict[str, dict[str, float]] = {name: {} for name in slots}
    done = 0
    for name, technique in jobs:
        slot, layer = slots[name], modules[name]
        variants = [c for c in float_variants(slot) if c.technique == technique and (worth is None or worth(name, c))]
        variants.sort(
            key=lambda c: (
                -layer_cost(layer, c.technique, c.rank, input_shapes[name], **_cost_kw(c, rank_multiple)).params
            )
        )
        beyond = fresh = False
        for choice in variants:
            key = variant_key(choice)
            if beyond:
                drops[name][key] = kls[name][key] = math.inf
            else:
                layer_cache = cache.setdefault(name, {})
                measured = layer_cache.get(key)
                if measured is None or (with_kl and measured.kl is None):
                    measured = layer_cache[key] = score(
                        CompressionConfig(layers={name: choice}, rank_multiple=rank_multiple)
                    )
                    fresh = True
                drops[name][key] = 100.0 * (baseline.accuracy - measured.accuracy)
                if measured.kl is not None:
                    kls[name][key] = measured.kl
                beyond = drops[name][key] > hopeless
            done += 1
            if progress is not None:
                progress(done, total)
        if cache_file is not None and fresh:
            entries = {n: {k: _entry(v) for k, v in layer.items()} for n, layer in cache.items()}
            atomic_write_text(cache_file, json.dumps(entries, sort_keys=True))
    return Sensitivity(baseline_accuracy=baseline.accuracy, drops=drops, divergences=kls if with_kl else None)


def float_variants(slot: LayerSlot) -> list[LayerChoice]:
    """The slot's low-rank float variants (plain decomposition): what the sensitivity pass measures."""
    return [
        LayerChoice(technique, rank, options=dict(slot.options[technique]))
        for technique in slot.techniques
        if technique != "keep"
        for rank in slot.ranks[technique] or (None,)
    ]


def _float(choice: LayerChoice) -> LayerChoice:
    return LayerChoice(choice.technique, choice.rank, options=dict(choice.options))


def _cost_kw(choice: LayerChoice, rank_multiple: int) -> dict[str, object]:
    return {"rank_multiple": rank_multiple, **choice.options}


def _entry(measured: VariantScore) -> float | dict[str, float]:
    """A cache entry: the accuracy alone (the first release's format) or, with a divergence, both."""
    return measured.accuracy if measured.kl is None else {"accuracy": measured.accuracy, "kl": measured.kl}


def _read_cache(path: Path | None) -> dict[str, dict[str, VariantScore]]:
    """The cached scores by layer and variant; entries of another shape are left out (measured again)."""
    data = read_json_cache(path)  # None when missing or unreadable: measured again
    if not isinstance(data, dict):
        return {}
    cache: dict[str, dict[str, VariantScore]] = {}
    for layer, entries in data.items():
        if isinstance(entries, dict):
            scores = {str(key): _score(entry) for key, entry in entries.items()}
            cache[str(layer)] = {key: score for key, score in scores.items() if score is not None}
    return cache


def _score(entry: object) -> VariantScore | None:
    if isinstance(entry, int | float) and not isinstance(entry, bool):
        return VariantScore(float(entry))
    if isinstance(entry, dict) and isinstance(entry.get("accuracy"), int | float):
        kl = entry.get("kl")
        return VariantScore(float(entry["accuracy"]), float(kl) if isinstance(kl, int | float) else None)
    return None
