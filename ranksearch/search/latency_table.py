"""Per-layer latency lookup table: each searched layer's variants timed once on its real input.

A configuration's latency is predicted as ``scale * (its float layers' variant times, summed) + int8_scale * (its
int8 layers', summed) + bytes_scale * (its layers' weight bytes, summed) + overhead``: every term adds up over the
layers, so a knapsack over the layers can use it (:meth:`LatencyTable.variant_ms`).

Where the target can time layers inside the whole model (:class:`~ranksearch.measure.timers.InModelTiming`: eager
torch), each variant is timed there, with the layers before it evicting its weights from the caches as they do in a
trial: every layer of the model gets one of its variants in each round, and each variant's time is taken relative
to the dense layer's, timed inside the dense model in alternation with it, which cancels the machine's drift. The
table then adds the rest of the model (the dense model's time less its searched layers': stem, pooling, additions)
as ``overhead``. Elsewhere (ONNX Runtime, a remote target) each variant is timed alone, and the built table is
purely proportional (``overhead`` 0, ``scale`` = dense latency / dense layers' sum).

Layer times add up badly at the fast end: in a 28 px ResNet-18 (AMD EPYC, 2 threads), configs that compress every
layer measured 0.20 of the dense model's latency where the summed layer times said 0.30, since a model whose weights
fit in the caches runs every layer (and the rest of the model) faster than the same layers beside dense neighbours.
So the build also times a few whole configs from the slowest to the fastest the layers offer (:data:`CALIBRATION`)
beside the dense model, and fits the terms on them (:meth:`LatencyTable.fitted`, which the search calls again with
the configs measured so far): the weight bytes carry what the layer times miss.
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
from scipy.optimize import nnls
from torch import nn

from ranksearch.compress import apply_config, compress_layer, layer_cost
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import RanksearchError
from ranksearch.measure.timers import InModelTiming, ModuleTimer
from ranksearch.search.space import LayerSlot
from ranksearch.util import atomic_write_text, read_json_cache

__all__ = ["LatencyTable", "Observation", "calibration_configs", "prediction_errors"]

TIMING = {"warmup": 3, "min_runs": 10, "target_seconds": 0.05, "max_attempts": 2}
"""A layer runs in well under a millisecond: short timing loops keep a table of ~600 distinct variants to ~20 s."""

IN_MODEL_TIMING = {"warmup": 2, "runs": 12}
"""Passes per round of in-model timing, each of the round's model and the dense model (a 28 px ResNet-18's 1,114
variants: 68 rounds, about 30 s on 2 cores)."""


MIN_FIT_POINTS = 3
"""Measured configs (with at least two different layer sums) before the overhead is fitted too."""

MIN_BYTES_FIT_POINTS = 6
"""Measured configs (calibration configs included) before the weight bytes get a term of their own."""

NEGLIGIBLE_SLOPE = 1e-9
"""A fitted time slope at or below this counts as 0: non-negative least squares leaves round-off (1e-15 was seen)
where the exact slope is 0, and the slopes are ratios to the dense model's times, so any that matters is far above."""

CALIBRATION = {"levels": (0.0, 0.2, 0.45, 0.7), "rounds": 5}
"""Whole configs the build times beside the dense model: at each level, every layer takes the variant at that
quantile of its variants faster than its dense layer (sorted by time; 0: the fastest), once among its float variants
and once among all (int8 included); each timed in ``rounds`` alternating rounds with the dense model."""


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
    layer_bytes: Mapping[str, Mapping[str, float]] | None = None
    """Weight bytes per (layer, variant): 4 a float parameter, 1 an int8 one (None: no bytes term)."""
    bytes_scale: float = 0.0
    """Milliseconds per weight byte, where a fit found the bytes explain what the layer times do not."""
    calibration: tuple[Observation, ...] = ()
    """Whole configs timed beside the dense model when the table was built; every fit includes them."""

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
        layer_bytes = _layer_bytes(model, slots, input_shapes, rank_multiple)
        table = cls(layer_ms=layer_ms, layer_bytes=layer_bytes)
        ratios = _time_calibration(model, table, slots, input_shapes, example, timer, rank_multiple, cache)
        if cache_file is not None and len(cache) > before:
            atomic_write_text(cache_file, json.dumps(cache, sort_keys=True))
        dense = timer.median_ms(model, example)
        if isinstance(timer, InModelTiming):  # the rest of the model, outside the searched layers
            table = replace(table, overhead_ms=max(dense - table.dense_layers_ms, 0.0))
        calibration = tuple(Observation(config, ratio * dense, dense) for config, ratio in ratios)
        return replace(table.calibrated(dense), calibration=calibration).fitted([])

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

    def weight_bytes(self, config: CompressionConfig) -> float:
        """The weight bytes of the variants ``config`` picks, summed (0 without :attr:`layer_bytes`)."""
        if self.layer_bytes is None:
            return 0.0
        return sum(
            sizes[variant_key(config.layers.get(name, LayerChoice("keep")))] for name, sizes in self.layer_bytes.items()
        )

    def variant_ms(self, layer: str, choice: LayerChoice) -> float:
        """What ``choice`` adds to :meth:`predict`'s latency in ``layer`` (the overhead aside): its time, scaled, and
        its weight bytes'. What a knapsack over the layers weighs."""
        key = variant_key(choice)
        scale = self.scale if self.int8_scale is None or not choice.int8 else self.int8_scale
        extra = 0.0 if self.layer_bytes is None else self.bytes_scale * self.layer_bytes[layer][key]
        return scale * self.layer_ms[layer][key] + extra

    def faster_than_dense(self, layer: str, choice: LayerChoice) -> bool:
        """Whether ``choice`` runs faster than the dense ``layer`` alone."""
        times = self.layer_ms[layer]
        return times[variant_key(choice)] < times[variant_key(LayerChoice("keep"))]

    def predict(self, config: CompressionConfig) -> float:
        """The predicted latency (ms) of the model compressed by ``config``."""
        float_ms, int8_ms = self.split_ms(config)
        int8_scale = self.scale if self.int8_scale is None else self.int8_scale
        return (
            self.scale * float_ms
            + int8_scale * int8_ms
            + self.bytes_scale * self.weight_bytes(config)
            + self.overhead_ms
        )

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
            bytes_scale=self.bytes_scale * factor,
            overhead_ms=self.overhead_ms * factor,
            dense_ms=dense_ms,
        )

    def fitted(self, observations: Sequence[Observation]) -> LatencyTable:
        """This table refitted on measured configs and its :attr:`calibration`, calibrated on the median of the measured
        configs' reference timings (the calibration's without any).

        Each latency is first divided by the dense latency timed beside it (which cancels the machine's drift), then
        the terms are fitted by non-negative least squares once :data:`MIN_FIT_POINTS` configs with two different
        layer sums are in; before that only the calibration applies. Once :data:`MIN_FIT_POINTS` of the configs have
        int8 layers and one has none, int8 layers get a scale of their own (``int8_scale``): the table's int8 times
        are off by another factor than its float times (in a seed-1 search of the default problem, configs with int8
        layers measured 7 % faster than a single scale predicted and float ones 7 % slower). Once
        :data:`MIN_BYTES_FIT_POINTS` are in, the weight bytes get a term too (``bytes_scale``; 0 where they explain
        nothing). A time term fitted to 0 is dropped with the terms after it (bytes, then the int8 split), so the
        layer times always count. A config's predicted latency is then the fitted ratio times that median
        (:attr:`dense_ms`), and so is its predicted speedup (:meth:`speedup`).
        """
        points = [*self.calibration, *observations]
        if not points:
            return self
        reference = statistics.median(o.reference_ms for o in observations or self.calibration)  # the machine now
        dense_sum = self.dense_layers_ms
        dense_bytes = self.weight_bytes(CompressionConfig(layers={}))
        sums = [self.split_ms(o.config) for o in points]
        floats = [float_ms / dense_sum for float_ms, _ in sums]
        int8s = [int8_ms / dense_sum for _, int8_ms in sums]
        layers = [f + q for f, q in zip(floats, int8s, strict=True)]
        ys = [o.latency_ms / o.reference_ms for o in points]
        if len(points) < MIN_FIT_POINTS or max(layers) - min(layers) < 1e-9:
            return self.calibrated(reference)
        quantized = sum(q > 0 for q in int8s)
        split = MIN_FIT_POINTS <= quantized < len(points)
        byte_sums = [self.weight_bytes(o.config) / dense_bytes for o in points] if dense_bytes else []
        with_bytes = len(points) >= MIN_BYTES_FIT_POINTS and bool(byte_sums) and max(byte_sums) > min(byte_sums)
        attempts = [(split, with_bytes), (split, False), (False, False)]
        for split, with_bytes in dict.fromkeys(attempts):
            times = [floats, int8s] if split else [layers]
            coefficients = _nonnegative_fit([*times, *([byte_sums] if with_bytes else [])], ys)
            if all(c > NEGLIGIBLE_SLOPE for c in coefficients[: len(times)]):
                break
        else:  # latency not rising with the layer times: proportional to them
            coefficients = [sum(x * y for x, y in zip(layers, ys, strict=True)) / sum(x * x for x in layers), 0.0]
            split = with_bytes = False
        slopes, intercept = coefficients[:-1], coefficients[-1]
        table = replace(
            self,
            scale=slopes[0] / dense_sum,
            int8_scale=slopes[1] / dense_sum if split else None,
            bytes_scale=slopes[-1] / dense_bytes if with_bytes else 0.0,
            overhead_ms=intercept,
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


def _nonnegative_fit(columns: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least-squares coefficients of ``columns`` and an intercept (last), all >= 0, fitted to ``ys``."""
    features = np.column_stack([*(np.asarray(column, dtype=float) for column in columns), np.ones(len(ys))])
    return [float(c) for c in nnls(features, np.asarray(ys, dtype=float))[0]]


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


def _layer_bytes(
    model: nn.Module, slots: Mapping[str, LayerSlot], input_shapes: Mapping[str, tuple[int, ...]], rank_multiple: int
) -> dict[str, dict[str, float]]:
    """Each variant's weight bytes, counted from its shapes: 4 a float parameter, 1 an int8 one."""
    modules = dict(model.named_modules())
    out: dict[str, dict[str, float]] = {}
    for name, slot in slots.items():
        out[name] = {}
        for choice in variants(slot):
            cost = layer_cost(
                modules[name],
                choice.technique,
                choice.rank,
                input_shapes[name],
                rank_multiple=rank_multiple,
                **choice.options,
            )
            out[name][variant_key(choice)] = float(cost.params * (1 if choice.int8 else 4))
    return out


def calibration_configs(
    table: LatencyTable, slots: Mapping[str, LayerSlot], rank_multiple: int
) -> list[CompressionConfig]:
    """The distinct whole configs of :data:`CALIBRATION`'s levels, from the slowest level to the fastest; a config
    that several levels give stands at the fastest of them, so the last is every layer at its fastest."""
    configs: dict[str, CompressionConfig] = {}
    for level in sorted(CALIBRATION["levels"], reverse=True):
        for with_int8 in (False, True):
            layers = {}
            for name, slot in slots.items():
                usable = [c for c in variants(slot) if (with_int8 or not c.int8) and table.faster_than_dense(name, c)]
                usable.sort(key=lambda c: table.layer_ms[name][variant_key(c)])
                if usable:
                    layers[name] = usable[min(int(level * len(usable)), len(usable) - 1)]
            config = CompressionConfig(layers=layers, rank_multiple=rank_multiple)
            key = json.dumps(config.to_dict(), sort_keys=True)
            configs.pop(key, None)  # e.g. the fastest level's config, given by a slower float-only level already
            configs[key] = config
    return [config for config in configs.values() if config.layers]


def _time_calibration(
    model: nn.Module,
    table: LatencyTable,
    slots: Mapping[str, LayerSlot],
    input_shapes: Mapping[str, tuple[int, ...]],
    example: torch.Tensor,
    timer: ModuleTimer,
    rank_multiple: int,
    cache: dict[str, float],
) -> list[tuple[CompressionConfig, float]]:
    """Each calibration config's latency over the dense model's (built with random factors), timed in alternation
    with it (one round where each timing exports the model: ONNX Runtime, a remote target), from ``cache`` where it
    has it (and added to it)."""
    modules = dict(model.named_modules())
    rounds = int(CALIBRATION["rounds"]) if isinstance(timer, InModelTiming) else 1
    out = []
    for config in calibration_configs(table, slots, rank_multiple):
        parts = [
            _cache_key(modules[name], input_shapes[name], config.layers.get(name, LayerChoice("keep")), rank_multiple)
            for name in slots
        ]
        key = "calibration-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]
        if key not in cache:
            candidate = apply_config(model, config, init="random", calib_inputs=example)
            ratios = [
                timer.median_ms(candidate, example, **TIMING) / timer.median_ms(model, example, **TIMING)
                for _ in range(rounds)
            ]
            cache[key] = statistics.median(ratios)
        out.append((config, cache[key]))
    return out


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
