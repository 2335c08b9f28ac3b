"""Per-layer sensitivity: each searched layer's zero-shot accuracy drop at each technique and rank, alone.

One layer at a time is replaced (float, plain decomposition), BatchNorm is recalibrated, and accuracy is
measured on a calibration subset without fine-tuning. Within a technique, ranks are measured from the
largest down; once one is hopeless (its drop exceeds ``hopeless``), the smaller ranks are taken as
hopeless too, unmeasured. Measurements are cached in a JSON file keyed by the weights and settings.

The result drives two things in a search: configs using a variant that is hopeless alone are not
evaluated, and :meth:`Sensitivity.greedy_configs` gives warm-start configs (equal sensitivity per
layer, at several levels: AIMET's greedy ratio selection, ALDS's error allocation).
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
from ranksearch.util import atomic_write_text

__all__ = ["GREEDY_LEVELS", "Sensitivity", "measure_sensitivity"]

GREEDY_LEVELS = (0.5, 1.0, 2.0, 4.0)
"""Per-layer zero-shot drops (points) of the greedy warm-start configs, mildest first."""


@dataclass(frozen=True)
class Sensitivity:
    """Zero-shot accuracy drop (points) per layer and float variant; ``inf`` where a larger rank of the same
    technique was already hopeless."""

    baseline_accuracy: float
    drops: Mapping[str, Mapping[str, float]]

    def drop(self, layer: str, choice: LayerChoice) -> float:
        """The drop of ``choice`` on ``layer`` alone (its float variant; 0 for keep and unmeasured layers)."""
        if choice.technique == "keep":
            return 0.0
        return self.drops.get(layer, {}).get(variant_key(_float(choice)), 0.0)

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
                    choice for choice in _float_variants(slot) if self.drop(name, choice) <= level
                ]
                layers[name] = min(candidates, key=lambda choice, name=name: cost(name, choice))
            config = CompressionConfig(layers=layers, rank_multiple=rank_multiple)
            if config not in out.values():
                out[level] = config
        return out

    def to_json(self) -> dict[str, object]:
        return {"baseline_accuracy": self.baseline_accuracy, "drops": self.drops}


def measure_sensitivity(
    model: nn.Module,
    slots: Mapping[str, LayerSlot],
    input_shapes: Mapping[str, tuple[int, ...]],
    *,
    zero_shot: Callable[[CompressionConfig], float],
    baseline_accuracy: float,
    hopeless: float,
    rank_multiple: int,
    worth: Callable[[str, LayerChoice], bool] | None = None,
    cache_file: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Sensitivity:
    """Measure each slot's float variants with ``zero_shot(config) -> accuracy`` (one layer replaced).

    Only variants ``worth(layer, choice)`` are measured (the search passes "faster than the dense layer
    in the latency table": a slower variant is dominated by keep); the others are left out of ``drops``.
    ``cache_file`` (JSON: layer -> variant -> accuracy) must be specific to the weights, data and
    zero-shot settings; it is rewritten after each layer, so an interrupted pass resumes.
    """
    cache = _read_cache(cache_file)
    modules = dict(model.named_modules())
    jobs = [(name, technique) for name, slot in slots.items() for technique in slot.techniques if technique != "keep"]
    total = sum(
        worth is None or worth(name, c)
        for name, technique in jobs
        for c in _float_variants(slots[name])
        if c.technique == technique
    )
    drops: dict[str, dict[str, float]] = {name: {} for name in slots}
    done = 0
    for name, technique in jobs:
        slot, layer = slots[name], modules[name]
        variants = [c for c in _float_variants(slot) if c.technique == technique and (worth is None or worth(name, c))]
        variants.sort(
            key=lambda c: (
                -layer_cost(layer, c.technique, c.rank, input_shapes[name], **_cost_kw(c, rank_multiple)).params
            )
        )
        beyond = fresh = False
        for choice in variants:
            key = variant_key(choice)
            if beyond:
                drops[name][key] = math.inf
            else:
                layer_cache = cache.setdefault(name, {})
                if key not in layer_cache:
                    config = CompressionConfig(layers={name: choice}, rank_multiple=rank_multiple)
                    layer_cache[key] = zero_shot(config)
                    fresh = True
                drops[name][key] = 100.0 * (baseline_accuracy - layer_cache[key])
                beyond = drops[name][key] > hopeless
            done += 1
            if progress is not None:
                progress(done, total)
        if cache_file is not None and fresh:
            atomic_write_text(cache_file, json.dumps(cache, sort_keys=True))
    return Sensitivity(baseline_accuracy=baseline_accuracy, drops=drops)


def _float_variants(slot: LayerSlot) -> list[LayerChoice]:
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


def _read_cache(path: Path | None) -> dict[str, dict[str, float]]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # an unreadable cache is measured again
    if not isinstance(data, dict):
        return {}
    return {str(k): {str(v): float(a) for v, a in d.items()} for k, d in data.items() if isinstance(d, dict)}
