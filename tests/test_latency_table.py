"""The per-layer latency lookup table: every variant timed, predictions add up, the cache is reused."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ranksearch.compress import compress_layer
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import RanksearchError
from ranksearch.measure.timers import InModelTiming, ModuleTimer, OnnxRuntimeTimer, TorchTimer, cpu_name, processor_name
from ranksearch.search import SearchSpace, latency_table
from ranksearch.search.latency_table import (
    LatencyTable,
    Observation,
    cache_name,
    prediction_errors,
    variant_key,
    variants,
)
from ranksearch.search.space import record_input_shapes
from ranksearch.techniques.int8 import int8_available

CPU = TorchTimer(device=torch.device("cpu"), threads=1)


class AloneTimer(ModuleTimer):
    """Eager torch with each variant timed alone: the path of timers that cannot time inside the model."""

    def median_ms(self, module: nn.Module, inputs: torch.Tensor, **timing: Any) -> float:
        return CPU.median_ms(module, inputs, **timing)

    def slug(self) -> str:
        return "alone"


ALONE = AloneTimer()

SPACE = {
    "layers": {"include": ["1", "3", "4"], "types": ["Conv2d"]},
    "techniques": {"spatial_conv": ["keep", "svd", "tucker2"], "pointwise_conv": ["keep", "svd"]},
    "ranks": [0.25, 0.5],
    "int8": True,
}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.Conv2d(32, 32, 3, padding=1),  # 1: searched
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),  # 3: same geometry and input as 1
        nn.Conv2d(32, 64, 1),  # 4: pointwise
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()


@pytest.fixture(scope="module")
def problem() -> tuple[nn.Module, dict, dict, torch.Tensor]:
    model, example = net(), torch.randn(1, 1, 32, 32)  # compute, not per-call overhead, decides which variant is faster
    shapes = record_input_shapes(model, example)
    space = SearchSpace.from_dict(SPACE)
    return model, space.layers(model, shapes), shapes, example


def build(problem, cache_file: Path | None = None, **kwargs) -> LatencyTable:
    model, slots, shapes, example = problem
    return LatencyTable.build(
        model,
        slots,
        shapes,
        example,
        timer=kwargs.pop("timer", CPU),
        rank_multiple=8,
        cache_file=cache_file,
        **kwargs,
    )


def bare(problem) -> LatencyTable:
    """A built table without its calibration configs: fits see only the observations a test makes."""
    return replace(build(problem), calibration=())


@pytest.mark.parametrize("timer", [CPU, ALONE, OnnxRuntimeTimer(threads=1)], ids=["torch", "alone", "onnxruntime"])
def test_every_target_times_every_variant(problem, timer: ModuleTimer) -> None:
    """In torch (inside the model, or each variant alone) and in ONNX Runtime (each variant exported, int8 ones as
    QDQ), every variant gets a time, and the table is calibrated on the whole model timed by the same timer."""
    model, slots, _, example = problem
    table = build(problem, timer=timer)
    for name, slot in slots.items():
        assert set(table.layer_ms[name]) == {variant_key(v) for v in variants(slot)}
        assert all(ms > 0 for ms in table.layer_ms[name].values())
    if int8_available():
        assert any(json_key.endswith("true]") for json_key in table.layer_ms["1"])
    dense = table.predict(CompressionConfig(layers={}))
    whole = timer.median_ms(model, example)
    assert 0.3 < dense / whole < 3  # calibrated on the dense model timed by the same timer (two noisy timings)


def test_variants_cover_technique_rank_and_int8(problem) -> None:
    _, slots, _, _ = problem
    keys = {variant_key(v) for v in variants(slots["1"])}
    techniques_and_ranks = {(v.technique, v.rank) for v in variants(slots["1"])}
    assert ("keep", None) in techniques_and_ranks and ("tucker2", 0.25) in techniques_and_ranks
    assert len(keys) == 2 * len(techniques_and_ranks)  # each with and without int8
    assert {v.technique for v in variants(slots["4"])} == {"keep", "svd"}


@pytest.mark.parametrize("timer", [CPU, ALONE], ids=["in-model", "alone"])
def test_table_times_every_variant_and_predicts_sums(problem, tmp_path: Path, timer: ModuleTimer) -> None:
    _, slots, _, _ = problem
    calls: list[tuple[int, int]] = []
    table = build(
        problem, tmp_path / "table.json", timer=timer, progress=lambda done, total: calls.append((done, total))
    )
    for name, slot in slots.items():
        assert set(table.layer_ms[name]) == {variant_key(v) for v in variants(slot)}
        assert all(ms > 0 for ms in table.layer_ms[name].values())
    total = sum(len(variants(s)) for s in slots.values())
    assert calls and {t for _, t in calls} == {total} and calls[-1][0] == total
    svd = LayerChoice("svd", 0.25, True, False, {})
    config = CompressionConfig(layers={"1": svd, "4": LayerChoice("svd", 0.5)})
    layers = (
        table.layer_ms["1"][variant_key(svd)]
        + table.layer_ms["3"][variant_key(LayerChoice("keep"))]
        + table.layer_ms["4"][variant_key(LayerChoice("svd", 0.5))]
    )
    assert table.layers_ms(config) == pytest.approx(layers)
    added = sum(table.variant_ms(name, config.layers.get(name, LayerChoice("keep"))) for name in slots)
    assert table.predict(config) == pytest.approx(added + table.overhead_ms)  # what a knapsack adds up
    data_aware = CompressionConfig(layers={"1": LayerChoice("svd", 0.25, True, True, {"ignored": 1})})
    assert table.predict(data_aware) == table.predict(CompressionConfig(layers={"1": svd}))


class Sleep(nn.Module):
    """Passes its input on after ``seconds``: a layer of known duration."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seconds:  # time.sleep(0) yields the CPU, which a busy host may not give back for a while
            time.sleep(self.seconds)
        return x


class WithSpare(nn.Module):
    """A module whose forward never calls its ``spare``."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


@pytest.mark.serial
def test_layers_are_timed_inside_the_models_in_alternation() -> None:
    """Each named layer's own time inside each model, whatever runs around it."""
    first = nn.Sequential(nn.Conv2d(1, 4, 3), Sleep(0.004), Sleep(0.0))
    second = nn.Sequential(nn.Conv2d(1, 4, 3), Sleep(0.0), Sleep(0.002))
    times = CPU.layers_in_models_ms([first, second], torch.randn(1, 1, 8, 8), ["1", "2"], runs=5, warmup=1)
    # the no-op layer is bounded relative to its neighbour: on a busy host any layer may lose a millisecond
    assert 4.0 <= times[0]["1"] < 40 and times[0]["2"] < times[0]["1"] / 2
    assert 2.0 <= times[1]["2"] < 20 and times[1]["1"] < times[1]["2"] / 2
    assert not first[1]._forward_hooks and not first[1]._forward_pre_hooks  # the stopwatches are removed
    assert first.training and second.training  # timed in eval mode, each module's mode restored
    with pytest.raises(RanksearchError, match=r"layer 'spare' never runs in the model's forward pass"):
        CPU.layers_in_models_ms([WithSpare()], torch.randn(1), ["spare"], runs=1, warmup=0)


@pytest.mark.serial
def test_the_rest_of_the_model_is_the_overhead() -> None:
    """Timed inside the model, the layers outside the search (here a 3 ms one) make the table's overhead, which a
    compressed config does not shrink."""
    model = nn.Sequential(Sleep(0.003), nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)).eval()
    example = torch.randn(1, 16, 8, 8)
    shapes = record_input_shapes(model, example)
    space = SearchSpace.from_dict(
        {
            "layers": {"include": ["1", "2"], "types": ["Conv2d"]},
            "techniques": {"spatial_conv": ["keep", "svd"]},
            "ranks": [0.25],
        }
    )
    slots = space.layers(model, shapes)
    table = LatencyTable.build(model, slots, shapes, example, timer=CPU, rank_multiple=8)
    assert 2.5 < table.overhead_ms < 30 and table.scale == pytest.approx(1.0, rel=0.6)
    assert table.predict(CompressionConfig(layers={})) > table.overhead_ms + table.dense_layers_ms * 0.3


def test_cache_is_reused_and_shared_by_equal_layers(problem, tmp_path: Path, monkeypatch) -> None:
    """Timed alone: each (layer geometry, variant) once; a second build reads them all from the cache."""
    cache = tmp_path / cache_name(ALONE)
    timed: list[str] = []
    real = latency_table._time_variant

    def counting(layer, shape, choice, *args, **kwargs):
        timed.append(variant_key(choice))
        return real(layer, shape, choice, *args, **kwargs)

    monkeypatch.setattr(latency_table, "_time_variant", counting)
    first = build(problem, cache, timer=ALONE)
    _, slots, _, _ = problem
    # layers 1 and 3 share geometry and input shape: timed once for both
    assert len(timed) == len(variants(slots["1"])) + len(variants(slots["4"]))
    assert first.layer_ms["1"] == first.layer_ms["3"]
    timed.clear()
    second = build(problem, cache, timer=ALONE)
    assert timed == [] and second.layer_ms == first.layer_ms
    cache.write_text("{ not json")
    build(problem, cache, timer=ALONE)
    assert len(timed) == len(variants(slots["1"])) + len(variants(slots["4"]))  # a corrupt cache is rebuilt


def test_in_model_cache_is_reused_and_shared_by_equal_layers(problem, tmp_path: Path, monkeypatch) -> None:
    """Timed inside the model: every variant but the dense layer gets into one round's model once (layers of equal
    geometry share), in as many rounds as the layer with most variants has; a second build times only the dense
    layers, to turn the cached ratios into this machine's ms."""
    cache = tmp_path / cache_name(CPU)
    rounds: list[dict[str, str]] = []
    real = latency_table.apply_config

    def recording(model, config, **kwargs):
        rounds.append({name: variant_key(choice) for name, choice in config.layers.items()})
        return real(model, config, **kwargs)

    monkeypatch.setattr(latency_table, "apply_config", recording)
    monkeypatch.setitem(latency_table.CALIBRATION, "levels", ())  # whole configs: their own test
    first = build(problem, cache)
    _, slots, _, _ = problem
    timed = [(name, key) for layers in rounds for name, key in layers.items()]
    dense = variant_key(LayerChoice("keep"))
    assert sorted(timed) == sorted(
        (name, variant_key(v)) for name in ("1", "4") for v in variants(slots[name]) if variant_key(v) != dense
    )
    assert len(rounds) == len(variants(slots["1"])) - 1
    ratio = {key: first.layer_ms["1"][key] / first.layer_ms["1"][dense] for key in first.layer_ms["1"]}
    assert ratio == pytest.approx({key: first.layer_ms["3"][key] / first.layer_ms["3"][dense] for key in ratio})
    rounds.clear()
    second = build(problem, cache)
    assert rounds == [] and set(second.layer_ms) == set(first.layer_ms)
    assert "-in-model" in cache.name and "-in-model" not in cache_name(ALONE)
    assert isinstance(CPU, InModelTiming) and not isinstance(OnnxRuntimeTimer(threads=1), InModelTiming)


def test_a_table_file_names_the_processor_it_was_timed_on() -> None:
    """Hosts of one instance type differ (an AVX2 AMD, an AVX-512 Intel): a table timed on one is not reused on the
    other."""
    name = cpu_name()
    assert name and "@" not in name and "(R)" not in name and name == name.strip()
    slug = "".join(c if c.isalnum() or c == "." else "-" for c in name).lower()
    assert cache_name(CPU).startswith(f"latency-cpu-{slug}-threads1-torch")
    assert slug in cache_name(OnnxRuntimeTimer(threads=1))


@pytest.mark.parametrize(
    ("cpuinfo", "name"),
    [
        (
            "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n",
            "AMD EPYC family 25 model 17",
        ),
        (
            "cpu family\t: 6\nmodel\t\t: 106\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\n",
            "Intel Xeon Platinum 8375C family 6 model 106",
        ),
        ("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n", ""),  # no model name (an ARM host)
    ],
)
def test_a_processor_is_named_with_its_family_and_model_where_given(cpuinfo: str, name: str) -> None:
    """Virtual machines of several generations all say "AMD EPYC": the family and model numbers tell them apart."""
    assert processor_name(cpuinfo) == name


def test_choice_outside_the_table_is_named(problem) -> None:
    table = build(problem)
    with pytest.raises(RanksearchError, match=r"layer '1'.*cp.*not in the latency table"):
        table.predict(CompressionConfig(layers={"1": LayerChoice("cp", 0.25)}))


def test_cache_name_and_errors() -> None:
    name = cache_name(TorchTimer(device=torch.device("cpu"), threads=2))
    assert name.startswith("latency-cpu-") and "-threads2-torch" in name and name.endswith(".json")
    name = cache_name(OnnxRuntimeTimer(threads=2))
    assert name.startswith("latency-onnxruntime") and "-threads2-torch" in name and name.endswith(".json")
    errors = prediction_errors([1.1, 2.0, 2.7], [1.0, 2.0, 3.0])
    assert errors["median_pct"] == pytest.approx(10.0) and errors["max_pct"] == pytest.approx(10.0)


def test_calibration_rescales_the_prediction(problem) -> None:
    table = replace(build(problem), overhead_ms=0.5)
    config = CompressionConfig(layers={"1": LayerChoice("svd", 0.25)})
    recalibrated = table.calibrated(7.5)
    dense = CompressionConfig(layers={})
    assert recalibrated.predict(dense) == pytest.approx(7.5)
    assert recalibrated.predict(config) / table.predict(config) == pytest.approx(7.5 / table.predict(dense))
    assert recalibrated.layer_ms == table.layer_ms


def test_fitted_recovers_a_linear_latency_model(problem) -> None:
    """Latencies made from a known scale and overhead, under a drifting machine (the dense timing beside
    each varies), are fitted back; the prediction is scaled by the median dense timing."""
    table = bare(problem)
    dense = CompressionConfig(layers={})
    configs = [
        dense,
        CompressionConfig(layers={"1": LayerChoice("svd", 0.25)}),
        CompressionConfig(layers={"1": LayerChoice("tucker2", 0.25), "4": LayerChoice("svd", 0.5)}),
        CompressionConfig(layers={"3": LayerChoice("svd", 0.25, True)}),
    ]
    scale, overhead = 0.7, 0.3  # the true ratio to the dense model: 0.7 * layer-sum ratio + 0.3
    drift = [2.0, 2.4, 1.8, 2.2]
    observations = [
        Observation(c, d * (scale * table.layers_ms(c) / table.dense_layers_ms + overhead), d)
        for c, d in zip(configs, drift, strict=True)
    ]
    assert table.fitted(observations[:2]).predict(dense) == pytest.approx(2.2)  # too few: calibration only
    fitted = table.fitted(observations)
    assert fitted.overhead_ms == pytest.approx(overhead * 2.1)
    for config in configs:
        expected = 2.1 * (scale * table.layers_ms(config) / table.dense_layers_ms + overhead)
        assert fitted.predict(config) == pytest.approx(expected)
    assert table.fitted([]) == table


def test_fitted_never_takes_a_negative_overhead(problem) -> None:
    table = bare(problem)
    configs = [
        CompressionConfig(layers={}),
        CompressionConfig(layers={"1": LayerChoice("svd", 0.25)}),
        CompressionConfig(layers={"1": LayerChoice("tucker2", 0.25)}),
    ]
    # latency falling faster than the layer sums: a line through them would cross zero above x = 0
    observations = [
        Observation(c, 2.0 * (1.5 * table.layers_ms(c) / table.dense_layers_ms - 0.5), 2.0) for c in configs
    ]
    fitted = table.fitted(observations)
    assert fitted.overhead_ms == 0 and fitted.scale > 0


def test_speedup_is_taken_against_the_measured_dense_model(problem) -> None:
    """A fitted line that misses the dense model's own point (here 0.9 at the dense layer sum) predicts each
    config's ratio to the dense model timed beside it, not its ratio to the line's value at the dense model."""
    table = bare(problem)
    configs = [
        CompressionConfig(layers={"1": LayerChoice("svd", 0.25)}),
        CompressionConfig(layers={"1": LayerChoice("tucker2", 0.25), "4": LayerChoice("svd", 0.5)}),
        CompressionConfig(layers={"3": LayerChoice("svd", 0.25, True)}),
        CompressionConfig(layers={"1": LayerChoice("svd", 0.5), "3": LayerChoice("svd", 0.5)}),
    ]

    def ratio(config: CompressionConfig) -> float:  # latency over the dense model's, as measured
        return 0.8 * table.layers_ms(config) / table.dense_layers_ms + 0.1

    drift = [2.0, 2.4, 1.8, 2.2]
    fitted = table.fitted([Observation(c, d * ratio(c), d) for c, d in zip(configs, drift, strict=True)])
    assert fitted.dense_ms == pytest.approx(2.1)  # the median dense timing
    for config in configs:
        assert fitted.speedup(config) == pytest.approx(1 / ratio(config))
        assert fitted.predict(config) == pytest.approx(2.1 * ratio(config))
    assert fitted.predict(CompressionConfig(layers={})) == pytest.approx(2.1 * 0.9)
    built = table.calibrated(3.0)  # before any config is measured: against its build-time dense timing
    assert built.dense_ms == 3.0 and built.speedup(CompressionConfig(layers={})) == pytest.approx(1.0)


INT8_CONFIGS = [
    CompressionConfig(layers={"1": LayerChoice("svd", 0.25)}),
    CompressionConfig(layers={"1": LayerChoice("tucker2", 0.25), "4": LayerChoice("svd", 0.5)}),
    CompressionConfig(layers={"3": LayerChoice("svd", 0.25, True)}),
    CompressionConfig(layers={"1": LayerChoice("svd", 0.5, True), "3": LayerChoice("svd", 0.5)}),
    CompressionConfig(layers={"1": LayerChoice("keep", None, True), "4": LayerChoice("svd", 0.25, True)}),
]


@pytest.mark.parametrize(("float_slope", "int8_slope", "intercept"), [(0.7, 0.45, 0.2), (1.1, 0.6, -0.1)])
def test_int8_layers_get_a_scale_of_their_own(problem, float_slope: float, int8_slope: float, intercept: float) -> None:
    """Latencies made from a float slope, an int8 slope and an intercept are fitted back (with a negative intercept:
    the two slopes through the origin, the least-squares fit without it)."""
    table = bare(problem)
    if not any(table.split_ms(c)[1] for c in INT8_CONFIGS[2:]):
        pytest.skip("no int8 kernels here")

    def ratio(config: CompressionConfig) -> float:
        float_ms, int8_ms = table.split_ms(config)
        return (float_slope * float_ms + int8_slope * int8_ms) / table.dense_layers_ms + intercept

    drift = [2.0, 2.4, 1.8, 2.2, 2.1]
    fitted = table.fitted([Observation(c, d * ratio(c), d) for c, d in zip(INT8_CONFIGS, drift, strict=True)])
    assert fitted.int8_scale is not None and fitted.dense_ms == pytest.approx(2.1)
    if intercept >= 0:
        assert fitted.int8_scale / fitted.scale == pytest.approx(int8_slope / float_slope)
        for config in INT8_CONFIGS:
            assert fitted.speedup(config) == pytest.approx(1 / ratio(config))
    else:
        assert fitted.overhead_ms == 0 and fitted.scale > 0 and fitted.int8_scale > 0
    recalibrated = fitted.calibrated(4.2)
    assert recalibrated.int8_scale == pytest.approx(fitted.int8_scale * 4.2 / fitted.predict(CompressionConfig({})))


@pytest.mark.parametrize("observed", [slice(0, 4), slice(2, 5)], ids=["two int8 configs", "no float config"])
def test_int8_scale_needs_configs_of_both_kinds(problem, observed: slice) -> None:
    table = bare(problem)
    observations = [Observation(c, 1.5 - 0.1 * i, 2.0) for i, c in enumerate(INT8_CONFIGS[observed])]
    assert table.fitted(observations).int8_scale is None


def test_calibration_configs_run_from_the_slowest_to_the_fastest(problem) -> None:
    """Every layer at one quantile of its variants faster than its dense layer, float only and int8 included; the
    last is every layer at its fastest."""
    _, slots, _, _ = problem
    table = bare(problem)
    configs = latency_table.calibration_configs(table, slots, 8)
    assert len(configs) == len({json.dumps(c.to_dict(), sort_keys=True) for c in configs}) >= 2
    for config in configs:
        assert all(table.faster_than_dense(name, choice) for name, choice in config.layers.items())
    usable = {name: [v for v in variants(slot) if table.faster_than_dense(name, v)] for name, slot in slots.items()}
    fastest = {
        name: min(options, key=lambda v: table.layer_ms[name][variant_key(v)])
        for name, options in usable.items()
        if options
    }
    assert table.layers_ms(configs[-1]) == pytest.approx(table.layers_ms(CompressionConfig(layers=fastest)))
    assert table.layers_ms(configs[0]) >= table.layers_ms(configs[-1])


def test_the_last_calibration_config_is_every_layer_at_its_fastest_where_levels_repeat(problem) -> None:
    """Times a loaded machine gave (CI saw the last config keep int8 layers): a float variant is each layer's fastest
    and fewer than five float variants beat the dense layer, so the float-only level 0.2 already gives the fastest
    config, and int8 variants make the levels between it and the fastest level differ from it."""
    _, slots, _, _ = problem
    faster = {
        "1": {("tucker2", 0.25, False): 0.13, ("keep", None, True): 0.22, ("tucker2", 0.5, False): 0.23},
        "3": {("tucker2", 0.25, False): 0.13, ("keep", None, True): 0.21, ("tucker2", 0.5, False): 0.22},
        "4": {("svd", 0.25, False): 0.1},
    }
    faster["1"] |= {("svd", 0.5, False): 0.24, ("svd", 0.5, True): 0.241, ("svd", 0.25, False): 0.25}
    faster["3"] |= {("svd", 0.5, False): 0.23, ("svd", 0.5, True): 0.231, ("svd", 0.25, False): 0.24}
    layer_ms = {}
    for name, slot in slots.items():
        times = {variant_key(v): 2.0 for v in variants(slot)} | {variant_key(LayerChoice("keep")): 1.0}
        layer_ms[name] = times | {json.dumps(list(key)): ms for key, ms in faster[name].items()}
    table = LatencyTable(layer_ms=layer_ms)
    configs = latency_table.calibration_configs(table, slots, 8)
    fastest = {name: LayerChoice("tucker2", 0.25) for name in ("1", "3")} | {"4": LayerChoice("svd", 0.25)}
    assert {name: variant_key(c) for name, c in configs[-1].layers.items()} == {
        name: variant_key(c) for name, c in fastest.items()
    }
    assert any(c.int8 for config in configs for c in config.layers.values())  # the int8 levels are there, before it


def test_the_build_is_fitted_on_its_calibration_configs(problem, tmp_path: Path, monkeypatch) -> None:
    """The whole configs are timed beside the dense model once (cached with the layers), and the built table is its
    layer times fitted on them."""
    _, slots, _, _ = problem
    cache = tmp_path / cache_name(CPU)
    table = build(problem, cache)
    configs = latency_table.calibration_configs(replace(table, calibration=()), slots, 8)
    assert [o.config for o in table.calibration] == configs
    assert all(o.latency_ms > 0 and o.reference_ms > 0 for o in table.calibration)
    assert table.fitted([]) == table
    first = table.calibration[0]
    measured = Observation(first.config, 9.0 * first.latency_ms / first.reference_ms, 9.0)
    assert table.fitted([measured]).dense_ms == 9.0  # scaled to the machine as the trials find it, not as it was
    assert sum(key.startswith("calibration-") for key in json.loads(cache.read_text())) == len(configs)
    built: list[CompressionConfig] = []
    real = latency_table.apply_config
    monkeypatch.setattr(
        latency_table, "apply_config", lambda model, config, **kw: built.append(config) or real(model, config, **kw)
    )
    again = build(problem, cache)
    assert built == [] and [o.latency_ms / o.reference_ms for o in again.calibration] == pytest.approx(
        [o.latency_ms / o.reference_ms for o in table.calibration]
    )


def test_weight_bytes_are_counted_on_the_built_layers(problem) -> None:
    """4 bytes a float parameter of the built replacement, 1 an int8 one."""
    model, slots, _, _ = problem
    table = bare(problem)
    assert table.layer_bytes is not None
    for name in ("1", "4"):
        layer = model.get_submodule(name)
        for choice in variants(slots[name]):
            if choice.technique == "keep":
                module = layer
            else:
                module = compress_layer(layer, choice.technique, choice.rank, rank_multiple=8, init="random")
            params = sum(p.numel() for p in module.parameters())
            assert table.layer_bytes[name][variant_key(choice)] == params * (1 if choice.int8 else 4)
    dense = CompressionConfig(layers={})
    assert table.weight_bytes(dense) == sum(4 * p.numel() for n in ("1", "3", "4") for p in model[int(n)].parameters())


BYTES_CONFIGS = [
    CompressionConfig(layers={}),
    CompressionConfig(layers={"1": LayerChoice("svd", 0.25)}),
    CompressionConfig(layers={"1": LayerChoice("tucker2", 0.25), "4": LayerChoice("svd", 0.5)}),
    CompressionConfig(layers={"1": LayerChoice("svd", 0.5), "3": LayerChoice("svd", 0.5)}),
    CompressionConfig(layers={"1": LayerChoice("tucker2", 0.5), "3": LayerChoice("svd", 0.25)}),
    CompressionConfig(layers={"3": LayerChoice("tucker2", 0.25), "4": LayerChoice("svd", 0.25)}),
    CompressionConfig(
        layers={"1": LayerChoice("svd", 0.25), "3": LayerChoice("svd", 0.25), "4": LayerChoice("svd", 0.25)}
    ),
]


def test_the_weight_bytes_term_is_fitted_back(problem) -> None:
    """Latencies made from the layer times, the weight bytes and an intercept, under a drifting machine, are fitted
    back once enough configs are in; each layer's share (what a knapsack weighs) adds up to the prediction."""
    table = bare(problem)
    dense = CompressionConfig(layers={})

    def ratio(config: CompressionConfig) -> float:
        return (
            0.6 * table.layers_ms(config) / table.dense_layers_ms
            + 0.3 * table.weight_bytes(config) / table.weight_bytes(dense)
            + 0.1
        )

    drift = [2.0, 2.4, 1.8, 2.2, 2.1, 1.9, 2.3]
    observations = [Observation(c, d * ratio(c), d) for c, d in zip(BYTES_CONFIGS, drift, strict=True)]
    assert table.fitted(observations[: latency_table.MIN_BYTES_FIT_POINTS - 1]).bytes_scale == 0
    fitted = table.fitted(observations)
    assert fitted.bytes_scale > 0 and fitted.dense_ms == pytest.approx(2.1)
    for config in BYTES_CONFIGS:
        assert fitted.speedup(config) == pytest.approx(1 / ratio(config))
        shares = sum(fitted.variant_ms(name, config.layers.get(name, LayerChoice("keep"))) for name in table.layer_ms)
        assert shares + fitted.overhead_ms == pytest.approx(fitted.predict(config))


def test_the_layer_times_always_count(problem) -> None:
    """Where the weight bytes alone explain the latencies (the layer times' slope fitted to 0), the fit drops the
    bytes term rather than the layer times."""
    table = bare(problem)
    dense_bytes = table.weight_bytes(CompressionConfig(layers={}))
    observations = [Observation(c, 2.0 * (0.8 * table.weight_bytes(c) / dense_bytes + 0.2), 2.0) for c in BYTES_CONFIGS]
    fitted = table.fitted(observations)
    assert fitted.scale > 0 and fitted.bytes_scale == 0
