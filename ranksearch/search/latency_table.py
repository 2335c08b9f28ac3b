"""Per-layer latency lookup table: each searched layer's variants timed once on its real input.

A configuration's latency is predicted as ``scale * (its float layers' variant times, summed) + int8_scale * (its
int8 layers', summed) + overhead``.

Where the target can time layers inside the whole model (:class:`~ranksearch.measure.timers.InModelTiming`: eager
torch), each variant is timed there, with the layers before it evicting its weights from the caches as they do in a
trial: every layer of the model gets one of its variants in each round, and each variant's time is taken relative
to the dense layer's, timed inside the dense model in alternation with it, which cancels the machine's drift. The
table then adds the rest of the model (the dense model's time less its searched layers': stem, pooling, additions)
as ``overhead``. Elsewhere (ONNX Runtime, a remote target) each variant is timed alone, and the built table is
purely proportional (``overhead`` 0, ``scale`` = dense latency / dense layers' sum). During a search,
:meth:`LatencyTable.fitted` refits both terms on the configs measured so far.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ranksearch.compress import apply_config, compress_layer
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import RanksearchError
from ranksearch.measure.timers import InModelTiming, ModuleTimer
from ranksearch.search.space import LayerSlot
from ranksearch.util import atomic_write_text, read_json_cache

__all__ = ["LatencyTable", "Observation", "prediction_errors"]

TIMING = {"warmup": 3, "min_runs": 10, "target_seconds": 0.05, "max_attempts": 2}
"""A layer runs in well under a millisecond: short timing loops keep a table of ~600 distinct variants to ~20 s."""

IN_MODEL_TIMING = {"warmup": 2, "runs": 12}
"""Passes per round of in-model timing, each of the round's model and the dense model (a 28 px ResNet-18's 1,114
variants: 68 rounds, about 30 s on 2 cores)."""


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
    int8_scale: float | None = None
    """What int8 variants' times are multiplied by, where a fit found it differs from ``scale`` (None: ``scale``)."""
    dense_ms: float | None = None
    """The dense model's measured latency the table is scaled to: its timing when the table was built, or the median
    of the dense timings beside the configs it was fitted on (None: not scaled to a measurement)."""

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

        Timings are kept in ``cache_file`` (JSON, keyed by the layer's geometry and the variant; in-model timings as
        ratios to the dense layer's), so a table for the same target, threads and versions is built once; pick a
        file per target (:func:`cache_name`). ``progress(done, total)`` is called as variants are timed.
        """
        cache = _read_cache(cache_file)
        before = len(cache)
        if isinstance(timer, InModelTiming):
            layer_ms = _time_in_model(model, slots, input_shapes, example, timer, rank_multiple, cache, progress)
        else:
            layer_ms = _time_alone(model, slots, input_shapes, timer, rank_multiple, cache, progress)
        if cache_file is not None and len(cache) > before:
            atomic_write_text(cache_file, json.dumps(cache, sort_keys=True))
        dense = timer.median_ms(model, example)
        table = cls(layer_ms=layer_ms)
        if isinstance(timer, InModelTiming):  # the rest of the model, outside the searched layers
            table = replace(table, overhead_ms=max(dense - table.dense_layers_ms, 0.0))
        return table.calibrated(dense)

    @property
    def dense_layers_ms(self) -> float:
        """The searched layers' dense times, summed."""
        return self.layers_ms(CompressionConfig(layers={}))

    def layers_ms(self, config: CompressionConfig) -> float:
        """The sum of the variant times ``config`` picks (layers it leaves out: keep)."""
        return sum(self.split_ms(config))

    def split_ms(self, config: CompressionConfig) -> tuple[float, float]:
        """The variant times ``config`` picks, summed over its float layers and over its int8 layers."""
        float_ms = int8_ms = 0.0
        for name, times in self.layer_ms.items():
            choice = config.layers.get(name, LayerChoice("keep"))
            key = variant_key(choice)
            if key not in times:
                raise RanksearchError(
                    f"layer {name!r}: {choice.to_dict()} is not in the latency table; "
                    "build the table from the search space the config was drawn from"
                )
            if choice.int8:
                int8_ms += times[key]
            else:
                float_ms += times[key]
        return float_ms, int8_ms

    def faster_than_dense(self, layer: str, choice: LayerChoice) -> bool:
        """Whether ``choice`` runs faster than the dense ``layer`` alone."""
        times = self.layer_ms[layer]
        return times[variant_key(choice)] < times[variant_key(LayerChoice("keep"))]

    def predict(self, config: CompressionConfig) -> float:
        """The predicted latency (ms) of the model compressed by ``config``."""
        float_ms, int8_ms = self.split_ms(config)
        int8_scale = self.scale if self.int8_scale is None else self.int8_scale
        return self.scale * float_ms + int8_scale * int8_ms + self.overhead_ms

    def speedup(self, config: CompressionConfig) -> float:
        """The predicted speedup of ``config`` over the dense model as measured (:attr:`dense_ms`).

        A fitted line need not pass through the dense model's own point: in a search of a 28 px ResNet-18 (AMD EPYC,
        2 threads), the line through its 58 configs put the dense model at 0.89 of its measured time, so speedups
        taken against that prediction came out about 11 % low for every compressed config. Each config predicted
        from the ones measured before it, the latency error was a median 10.1 % that way, 8.0 % this way."""
        dense = self.predict(CompressionConfig(layers={})) if self.dense_ms is None else self.dense_ms
        return dense / self.predict(config)

    def calibrated(self, dense_ms: float) -> LatencyTable:
        """This table rescaled so that the dense model's prediction is ``dense_ms`` (a fresher or more
        robust measurement of it: a single one on a busy machine can be off by 20 %)."""
        factor = dense_ms / self.predict(CompressionConfig(layers={}))
        return replace(
            self,
            scale=self.scale * factor,
            int8_scale=None if self.int8_scale is None else self.int8_scale * factor,
            overhead_ms=self.overhead_ms * factor,
            dense_ms=dense_ms,
        )

    def fitted(self, observations: Sequence[Observation]) -> LatencyTable:
        """This table refitted on measured configs, calibrated on the median of their reference timings.

        Each latency is first divided by the dense latency timed beside it (which cancels the machine's
        drift), then ``scale`` and ``overhead`` are fitted by least squares (overhead >= 0) once
        :data:`MIN_FIT_POINTS` configs with two different layer sums are in; before that only the
        calibration applies. Once :data:`MIN_FIT_POINTS` of the configs have int8 layers and one has none, int8
        layers get a scale of their own (``int8_scale``) where that fit's terms all come out positive: the table's
        int8 times are off by another factor than its float times (in a seed-1 search of the default problem,
        configs with int8 layers measured 7 % faster than a single scale predicted and float ones 7 % slower).
        A config's predicted latency is then the fitted ratio times that median (:attr:`dense_ms`), and so is its
        predicted speedup (:meth:`speedup`).
        """
        if not observations:
            return self
        reference = statistics.median(o.reference_ms for o in observations)
        dense_sum = self.dense_layers_ms
        sums = [self.split_ms(o.config) for o in observations]
        xs = [(float_ms + int8_ms) / dense_sum for float_ms, int8_ms in sums]
        ys = [o.latency_ms / o.reference_ms for o in observations]
        if len(observations) < MIN_FIT_POINTS or max(xs) - min(xs) < 1e-9:
            return self.calibrated(reference)
        slope, intercept = _least_squares(xs, ys)
        if intercept < 0 or slope <= 0:  # the proportional model, fitted
            slope, intercept = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), 0.0
        table = replace(self, scale=slope / dense_sum, int8_scale=None, overhead_ms=intercept)
        split = _int8_fit([(f / dense_sum, q / dense_sum) for f, q in sums], ys)
        if split is not None:
            float_slope, int8_slope, intercept = split
            table = replace(
                self, scale=float_slope / dense_sum, int8_scale=int8_slope / dense_sum, overhead_ms=intercept
            )
        return replace(table.calibrated(reference * table.predict(CompressionConfig(layers={}))), dense_ms=reference)


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
    """A table file name for the timer's target (device or runtime), thread count and versions, and whether layers
    are timed inside the model."""
    slug = "".join(c if c.isalnum() or c == "." else "-" for c in timer.slug()).strip("-").lower()
    return f"latency-{slug}{'-in-model' if isinstance(timer, InModelTiming) else ''}.json"


def prediction_errors(predicted: list[float], measured: list[float]) -> dict[str, float]:
    """Median and max absolute error of predictions, in percent of the measured values."""
    errors = [100.0 * abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    return {"median_pct": statistics.median(errors), "max_pct": max(errors), "count": float(len(errors))}


def _int8_fit(sums: Sequence[tuple[float, float]], ys: Sequence[float]) -> tuple[float, float, float] | None:
    """Least-squares slopes of the float and the int8 layer sums (each over the dense layers' sum) and an intercept,
    fitted to ``ys``; without the intercept where it comes out negative; None with fewer than
    :data:`MIN_FIT_POINTS` configs with int8 layers, none without, or a slope that is not positive."""
    quantized = sum(int8 > 0 for _, int8 in sums)
    if quantized < MIN_FIT_POINTS or quantized == len(sums):
        return None
    features = np.array([[float_sum, int8_sum, 1.0] for float_sum, int8_sum in sums])
    targets = np.array(ys)
    coefficients = np.linalg.lstsq(features, targets, rcond=None)[0]
    if coefficients[2] < 0:
        coefficients = np.append(np.linalg.lstsq(features[:, :2], targets, rcond=None)[0], 0.0)
    float_slope, int8_slope, intercept = (float(c) for c in coefficients)
    return None if float_slope <= 0 or int8_slope <= 0 else (float_slope, int8_slope, intercept)


def _least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through (xs, ys)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


def _time_alone(
    model: nn.Module,
    slots: Mapping[str, LayerSlot],
    input_shapes: Mapping[str, tuple[int, ...]],
    timer: ModuleTimer,
    rank_multiple: int,
    cache: dict[str, float],
    progress: Callable[[int, int], None] | None,
) -> dict[str, dict[str, float]]:
    """Each variant's ms timed alone (:func:`_time_variant`), from ``cache`` where it has it (and added to it)."""
    modules = dict(model.named_modules())
    jobs = [(name, choice) for name, slot in slots.items() for choice in variants(slot)]
    layer_ms: dict[str, dict[str, float]] = {name: {} for name in slots}
    for done, (name, choice) in enumerate(jobs, start=1):
        layer, shape = modules[name], input_shapes[name]
        key = _cache_key(layer, shape, choice, rank_multiple)
        if key not in cache:
            cache[key] = _time_variant(layer, shape, choice, rank_multiple, timer)
        layer_ms[name][variant_key(choice)] = cache[key]
        if progress is not None:
            progress(done, len(jobs))
    return layer_ms


def _time_in_model(
    model: nn.Module,
    slots: Mapping[str, LayerSlot],
    input_shapes: Mapping[str, tuple[int, ...]],
    example: torch.Tensor,
    timer: InModelTiming,
    rank_multiple: int,
    cache: dict[str, float],
    progress: Callable[[int, int], None] | None,
) -> dict[str, dict[str, float]]:
    """Each variant's ms inside the model: in rounds, every layer with a variant still to time gets one (in a seeded
    random order, so each round mixes cheap and costly neighbours), built with random factors; the round's model and
    ``model`` run in alternation, and each variant's time over its dense layer's in the same round is cached. The
    dense layers' times, the median over the rounds, turn the ratios into ms. Layers of equal geometry and input
    share their variants' timings, as in :func:`_time_alone`."""
    modules = dict(model.named_modules())
    rng = random.Random(0)
    keys: dict[tuple[str, str], str] = {}
    todo: dict[str, list[LayerChoice]] = {}
    scheduled: set[str] = set()
    for name, slot in slots.items():
        todo[name] = []
        for choice in variants(slot):
            key = keys[name, variant_key(choice)] = _cache_key(modules[name], input_shapes[name], choice, rank_multiple)
            if not _is_dense(choice) and key not in cache and key not in scheduled:
                scheduled.add(key)
                todo[name].append(choice)
        rng.shuffle(todo[name])
    total = len(keys)
    done = total - sum(len(choices) for choices in todo.values())
    names = list(slots)
    dense_ms: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(max((len(choices) for choices in todo.values()), default=0)):
        layers = {name: choices[round_] for name, choices in todo.items() if round_ < len(choices)}
        config = CompressionConfig(layers=layers, rank_multiple=rank_multiple)
        candidate = apply_config(model, config, init="random", calib_inputs=example)
        inside, dense = timer.layers_in_models_ms([candidate, model], example, names, **IN_MODEL_TIMING)
        for name, choice in layers.items():
            cache[keys[name, variant_key(choice)]] = inside[name] / dense[name]
        for name in names:
            dense_ms[name].append(dense[name])
        done += len(layers)
        if progress is not None:
            progress(done, total)
    if names and not dense_ms[names[0]]:  # every variant cached: the dense layers alone
        timing = {"warmup": IN_MODEL_TIMING["warmup"], "runs": 4 * IN_MODEL_TIMING["runs"]}
        for name, ms in timer.layers_in_models_ms([model], example, names, **timing)[0].items():
            dense_ms[name].append(ms)
        if progress is not None:
            progress(total, total)
    keep = {name: statistics.median(samples) for name, samples in dense_ms.items()}
    return {
        name: {
            variant_key(choice): keep[name] * (1.0 if _is_dense(choice) else cache[keys[name, variant_key(choice)]])
            for choice in variants(slot)
        }
        for name, slot in slots.items()
    }


def _is_dense(choice: LayerChoice) -> bool:
    return choice.technique == "keep" and not choice.int8


def _time_variant(
    layer: nn.Module,
    input_shape: tuple[int, ...],
    choice: LayerChoice,
    rank_multiple: int,
    timer: ModuleTimer,
) -> float:
    """Median ms of the variant built with random factors (latency does not depend on the values)."""
    inputs = torch.randn(input_shape)
    if _is_dense(choice):
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
