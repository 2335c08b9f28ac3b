"""Per-layer latency lookup table: each searched layer's variants timed once, in isolation, on its real input.

A configuration's latency is predicted as ``scale * (sum of its layers' variant times) + overhead``.
Built, the table is purely proportional (``overhead`` 0, ``scale`` = dense latency / dense layers' sum):
a layer runs slower inside the model than alone (cold caches, the unsearched BatchNorms and
activations around it grow and shrink with it), and for uniform configs the measured ratio to the
dense model follows the ratio of layer sums to within a few percent. During a search,
:meth:`LatencyTable.fitted` refits both terms on the configs measured so far.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ranksearch.compress import compress_layer
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import RanksearchError
from ranksearch.measure.timers import ModuleTimer
from ranksearch.search.space import LayerSlot
from ranksearch.util import atomic_write_text, read_json_cache

__all__ = ["LatencyTable", "Observation", "prediction_errors"]

TIMING = {"warmup": 3, "min_runs": 10, "target_seconds": 0.05, "max_attempts": 2}
"""A layer runs in well under a millisecond: short timing loops keep a table of ~600 distinct variants to ~20 s."""


MIN_FIT_POINTS = 3
"""Measured configs (with at least two different layer sums) before the overhead is fitted too."""


@dataclass(frozen=True)
class Observation:
    """One measured config: its latency and the dense model's latency timed right beside it."""

    config: CompressionConfig
    latency_ms: float
    reference_ms: float


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds per (layer, variant), and how their sum maps to a whole model's latency."""

    layer_ms: Mapping[str, Mapping[str, float]]
    scale: float = 1.0
    overhead_ms: float = 0.0

    @classmethod
    def build(
        cls,
        model: nn.Module,
        slots: Mapping[str, LayerSlot],
        input_shapes: Mapping[str, tuple[int, ...]],
        example: torch.Tensor,
        *,
        timer: ModuleTimer,
        rank_multiple: int,
        cache_file: Path | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> LatencyTable:
        """Time every variant the slots offer (technique x rank x int8) of each layer of ``model`` with ``timer``
        (where the trials are timed: torch, ONNX Runtime, a remote target), and the whole model on ``example``.

        Timings are kept in ``cache_file`` (JSON, keyed by the layer's geometry and the variant),
        so a table for the same target, threads and versions is built once; pick a file per
        target (:func:`cache_name`). ``progress(done, total)`` is called after each variant.
        """
        cache = _read_cache(cache_file)
        modules = dict(model.named_modules())
        jobs = [(name, choice) for name, slot in slots.items() for choice in variants(slot)]
        layer_ms: dict[str, dict[str, float]] = {name: {} for name in slots}
        fresh = 0
        for done, (name, choice) in enumerate(jobs, start=1):
            layer, shape = modules[name], input_shapes[name]
            key = _cache_key(layer, shape, choice, rank_multiple)
            if key not in cache:
                cache[key] = _time_variant(layer, shape, choice, rank_multiple, timer)
                fresh += 1
            layer_ms[name][variant_key(choice)] = cache[key]
            if progress is not None:
                progress(done, len(jobs))
        if cache_file is not None and fresh:
            atomic_write_text(cache_file, json.dumps(cache, sort_keys=True))
        dense = timer.median_ms(model, example)
        return cls(layer_ms=layer_ms).calibrated(dense)

    @property
    def dense_layers_ms(self) -> float:
        """The searched layers' dense times, summed."""
        return self.layers_ms(CompressionConfig(layers={}))

    def layers_ms(self, config: CompressionConfig) -> float:
        """The sum of the variant times ``config`` picks (layers it leaves out: keep)."""
        total = 0.0
        for name, times in self.layer_ms.items():
            choice = config.layers.get(name, LayerChoice("keep"))
            key = variant_key(choice)
            if key not in times:
                raise RanksearchError(
                    f"layer {name!r}: {choice.to_dict()} is not in the latency table; "
                    "build the table from the search space the config was drawn from"
                )
            total += times[key]
        return total

    def faster_than_dense(self, layer: str, choice: LayerChoice) -> bool:
        """Whether ``choice`` runs faster than the dense ``layer`` alone."""
        times = self.layer_ms[layer]
        return times[variant_key(choice)] < times[variant_key(LayerChoice("keep"))]

    def predict(self, config: CompressionConfig) -> float:
        """The predicted latency (ms) of the model compressed by ``config``."""
        return self.scale * self.layers_ms(config) + self.overhead_ms

    def calibrated(self, dense_ms: float) -> LatencyTable:
        """This table rescaled so that the dense model's prediction is ``dense_ms`` (a fresher or more
        robust measurement of it: a single one on a busy machine can be off by 20 %)."""
        factor = dense_ms / self.predict(CompressionConfig(layers={}))
        return replace(self, scale=self.scale * factor, overhead_ms=self.overhead_ms * factor)

    def fitted(self, observations: Sequence[Observation]) -> LatencyTable:
        """This table refitted on measured configs, calibrated on the median of their reference timings.

        Each latency is first divided by the dense latency timed beside it (which cancels the machine's
        drift), then ``scale`` and ``overhead`` are fitted by least squares (overhead >= 0) once
        :data:`MIN_FIT_POINTS` configs with two different layer sums are in; before that only the
        calibration applies.
        """
        if not observations:
            return self
        reference = statistics.median(o.reference_ms for o in observations)
        dense_sum = self.dense_layers_ms
        xs = [self.layers_ms(o.config) / dense_sum for o in observations]
        ys = [o.latency_ms / o.reference_ms for o in observations]
        if len(observations) < MIN_FIT_POINTS or max(xs) - min(xs) < 1e-9:
            return self.calibrated(reference)
        slope, intercept = _least_squares(xs, ys)
        if intercept < 0 or slope <= 0:  # the proportional model, fitted
            slope, intercept = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), 0.0
        table = replace(self, scale=slope / dense_sum, overhead_ms=intercept)
        return table.calibrated(reference * table.predict(CompressionConfig(layers={})))


def variants(slot: LayerSlot) -> list[LayerChoice]:
    """Every structurally different replacement a slot offers (data-aware factors have the same shapes)."""
    out = []
    for technique in slot.techniques:
        for rank in slot.ranks[technique] or (None,):
            for int8 in (False, True) if slot.int8 else (False,):
                out.append(LayerChoice(technique, rank, int8, False, dict(slot.options[technique])))
    return out


def variant_key(choice: LayerChoice) -> str:
    """A variant within one search space: technique, rank, int8 (a space gives each technique one set of options)."""
    return json.dumps([choice.technique, choice.rank, choice.int8])


def cache_name(timer: ModuleTimer) -> str:
    """A table file name for the timer's target (device or runtime), thread count and versions."""
    slug = "".join(c if c.isalnum() or c == "." else "-" for c in timer.slug()).strip("-").lower()
    return f"latency-{slug}.json"


def prediction_errors(predicted: list[float], measured: list[float]) -> dict[str, float]:
    """Median and max absolute error of predictions, in percent of the measured values."""
    errors = [100.0 * abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    return {"median_pct": statistics.median(errors), "max_pct": max(errors), "count": float(len(errors))}


def _least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through (xs, ys)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


def _time_variant(
    layer: nn.Module,
    input_shape: tuple[int, ...],
    choice: LayerChoice,
    rank_multiple: int,
    timer: ModuleTimer,
) -> float:
    """Median ms of the variant built with random factors (latency does not depend on the values)."""
    inputs = torch.randn(input_shape)
    if choice.technique == "keep" and not choice.int8:
        module = layer
    else:
        module = compress_layer(
            layer,
            choice.technique,
            choice.rank,
            int8=choice.int8,
            calib_inputs=inputs,
            rank_multiple=rank_multiple,
            init="random",
            **choice.options,
        )
    return timer.median_ms(module, inputs, **TIMING)


def _cache_key(layer: nn.Module, input_shape: tuple[int, ...], choice: LayerChoice, rank_multiple: int) -> str:
    geometry = [
        list(layer.weight.shape),
        *(str(getattr(layer, attr, None)) for attr in ("stride", "padding", "dilation", "groups")),
        layer.bias is not None,
    ]
    variant = [variant_key(choice), dict(choice.options)]
    text = json.dumps([type(layer).__name__, geometry, list(input_shape), variant, rank_multiple], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_cache(path: Path | None) -> dict[str, float]:
    data = read_json_cache(path)  # None when missing or unreadable: rebuilt
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
