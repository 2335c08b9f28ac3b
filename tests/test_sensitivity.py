"""Per-layer sensitivity: measurement order, hopeless cut-off, cache (and its older format), KL divergences, greedy
configs; the evaluator's zero-shot check, its output divergence, and the order in which it measures a compressed
model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.data import load_dataset
from ranksearch.evaluate import classification
from ranksearch.evaluate.classification import ClassificationEvaluator, EvaluatorOptions
from ranksearch.models import build_model, load_checkpoint
from ranksearch.search import SearchSpace
from ranksearch.search.latency_table import variant_key
from ranksearch.search.sensitivity import Sensitivity, VariantScore, measure_sensitivity
from ranksearch.search.space import record_input_shapes

SPACE = {
    "layers": {"include": ["*"], "types": ["Conv2d"]},
    "techniques": {"spatial_conv": ["keep", "svd", "tucker2"], "pointwise_conv": ["keep", "svd"]},
    "ranks": [0.25, 0.5, 0.75],
}


@pytest.fixture(scope="module")
def problem():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 1)
    )
    shapes = record_input_shapes(model, torch.randn(1, 3, 8, 8))
    slots = SearchSpace.from_dict(SPACE).layers(model, shapes)
    return model, slots, shapes


def fraction(choice: LayerChoice) -> float:
    return float(choice.rank)


def synthetic_accuracy(config: CompressionConfig) -> float:
    """A made-up zero-shot accuracy: layer '2' is sensitive, the others are not; lower ranks lose more."""
    ((name, choice),) = config.layers.items()
    weight = 40.0 if name == "2" else 2.0
    return 0.9 - weight * (0.75 - fraction(choice)) / 100 - (0.01 if choice.technique == "tucker2" else 0.0)


def synthetic_score(config: CompressionConfig) -> VariantScore:
    return VariantScore(synthetic_accuracy(config))


def synthetic_divergence(config: CompressionConfig) -> VariantScore:
    """The made-up accuracy, and a KL divergence of a tenth of its drop (in points)."""
    accuracy = synthetic_accuracy(config)
    return VariantScore(accuracy, 10 * (0.9 - accuracy))


def test_measures_largest_rank_first_and_stops_once_hopeless(problem, tmp_path: Path) -> None:
    model, slots, shapes = problem
    calls: list[tuple[str, str]] = []

    def zero_shot(config: CompressionConfig) -> VariantScore:
        ((name, choice),) = config.layers.items()
        calls.append((name, variant_key(choice)))
        return synthetic_score(config)

    cache = tmp_path / "sensitivity.json"
    result = measure_sensitivity(
        model,
        slots,
        shapes,
        score=zero_shot,
        baseline=VariantScore(0.9),
        hopeless=5.0,
        rank_multiple=8,
        cache_file=cache,
    )
    svd = {fraction: result.drops["2"][variant_key(LayerChoice("svd", fraction))] for fraction in (0.75, 0.5, 0.25)}
    assert svd[0.75] == pytest.approx(0.0)
    assert svd[0.5] == pytest.approx(10.0)  # hopeless (> 5): the smaller rank is not measured
    assert math.isinf(svd[0.25]) and ("2", variant_key(LayerChoice("svd", 0.25))) not in calls
    assert [r for n, r in calls if n == "2"][:2] == [
        variant_key(LayerChoice("svd", 0.75)),
        variant_key(LayerChoice("svd", 0.5)),
    ]
    assert result.drops["3"][variant_key(LayerChoice("svd", 0.25))] == pytest.approx(1.0)
    assert json.loads(cache.read_text())["2"][variant_key(LayerChoice("svd", 0.75))] == pytest.approx(0.9)

    again = measure_sensitivity(
        model,
        slots,
        shapes,
        score=lambda config: pytest.fail("measured again despite the cache"),
        baseline=VariantScore(0.9),
        hopeless=5.0,
        rank_multiple=8,
        cache_file=cache,
    )
    assert again == result


def test_only_variants_worth_measuring_are_measured(problem) -> None:
    model, slots, shapes = problem
    result = measure_sensitivity(
        model,
        slots,
        shapes,
        score=synthetic_score,
        baseline=VariantScore(0.9),
        hopeless=50.0,
        rank_multiple=8,
        worth=lambda name, choice: choice.technique == "svd",
    )
    assert all(json.loads(key)[0] == "svd" for drops in result.drops.values() for key in drops)
    assert result.drop("0", LayerChoice("tucker2", 0.25)) == 0.0  # unmeasured: no verdict


def test_hopeless_layer_and_greedy_configs(problem) -> None:
    model, slots, shapes = problem
    result = measure_sensitivity(
        model, slots, shapes, score=synthetic_score, baseline=VariantScore(0.9), hopeless=50.0, rank_multiple=8
    )
    mild = CompressionConfig(layers={"0": LayerChoice("svd", 0.25), "2": LayerChoice("svd", 0.75)})
    harsh = CompressionConfig(layers={"0": LayerChoice("svd", 0.75), "2": LayerChoice("svd", 0.25, int8=True)})
    assert result.hopeless_layer(mild, 5.0) is None
    assert result.hopeless_layer(harsh, 5.0) == ("2", pytest.approx(20.0))  # int8 takes its float variant's drop

    def params(name: str, choice: LayerChoice) -> float:  # cost: smaller rank is cheaper, keep the dearest
        return 1.0 if choice.technique == "keep" else fraction(choice) + (0.01 if choice.technique == "tucker2" else 0)

    levels = (0.5, 1.0, 12.0)
    greedy = result.greedy_configs(slots, params, rank_multiple=8, levels=levels)
    assert list(greedy) == list(levels)
    for level, config in greedy.items():
        for name, choice in config.layers.items():  # the cheapest variant within the level, else keep
            allowed = [LayerChoice("keep")] + [
                LayerChoice(t, r) for t in slots[name].techniques if t != "keep" for r in slots[name].ranks[t]
            ]
            allowed = [c for c in allowed if result.drop(name, c) <= level]
            assert params(name, choice) == min(params(name, c) for c in allowed)
    total = [sum(params(n, c) for n, c in config.layers.items()) for config in greedy.values()]
    assert total == sorted(total, reverse=True) and total[0] > total[-1]
    sensitive = greedy[0.5].layers["2"]
    assert sensitive.technique == "keep" or fraction(sensitive) > min(slots["2"].ranks["svd"])
    assert len(result.greedy_configs(slots, params, rank_multiple=8, levels=(1.1, 1.2))) == 1  # duplicates dropped


def test_sensitivity_roundtrips_through_json(problem) -> None:
    result = Sensitivity(baseline_accuracy=0.9, drops={"0": {variant_key(LayerChoice("svd", 0.5)): 1.5}})
    assert Sensitivity(**json.loads(json.dumps(result.to_json()))) == result
    with_kl = Sensitivity(
        baseline_accuracy=0.9,
        drops={"0": {variant_key(LayerChoice("svd", 0.5)): math.inf}},
        divergences={"0": {variant_key(LayerChoice("svd", 0.5)): math.inf}},
    )
    assert Sensitivity(**json.loads(json.dumps(with_kl.to_json()))) == with_kl


def test_divergences_are_measured_cached_and_are_the_penalty(problem, tmp_path: Path) -> None:
    """With a divergence measured, the penalty is the KL divergence; the cache keeps both numbers, and a pass that
    measures accuracy only reads the accuracies from it (its penalty is then the drop in points)."""
    model, slots, shapes = problem
    cache = tmp_path / "sensitivity-kl.json"
    settings = dict(hopeless=5.0, rank_multiple=8, cache_file=cache)
    result = measure_sensitivity(
        model, slots, shapes, score=synthetic_divergence, baseline=VariantScore(0.9, 0.0), **settings
    )
    svd = variant_key(LayerChoice("svd", 0.5))
    assert result.drops["2"][svd] == pytest.approx(10.0) and result.divergences["2"][svd] == pytest.approx(1.0)
    assert math.isinf(result.divergences["2"][variant_key(LayerChoice("svd", 0.25))])  # beyond hopeless
    assert result.penalty("2", LayerChoice("svd", 0.5, int8=True)) == pytest.approx(1.0)  # its float variant's
    assert result.penalty("2", LayerChoice("keep")) == 0.0
    assert Sensitivity(baseline_accuracy=0.9, drops={}).penalty("2", LayerChoice("svd", 0.5)) is None  # unmeasured
    assert json.loads(cache.read_text())["2"][svd] == {"accuracy": pytest.approx(0.8), "kl": pytest.approx(1.0)}

    def unexpected(config: CompressionConfig) -> VariantScore:
        pytest.fail("measured again despite the cache")

    again = measure_sensitivity(model, slots, shapes, score=unexpected, baseline=VariantScore(0.9, 0.0), **settings)
    assert again == result
    accuracy_only = measure_sensitivity(model, slots, shapes, score=unexpected, baseline=VariantScore(0.9), **settings)
    assert accuracy_only.divergences is None and accuracy_only.drops == result.drops
    assert accuracy_only.penalty("2", LayerChoice("svd", 0.5)) == pytest.approx(10.0)


def test_a_cache_without_divergences_is_measured_again(problem, tmp_path: Path) -> None:
    """A cache of the first release's format (accuracies only), or with entries of no known shape, does not stop a
    pass that measures divergences: what it lacks is measured and written in the new format."""
    model, slots, shapes = problem
    cache = tmp_path / "sensitivity.json"
    settings = dict(hopeless=50.0, rank_multiple=8, cache_file=cache)
    measure_sensitivity(model, slots, shapes, score=synthetic_score, baseline=VariantScore(0.9), **settings)
    old = json.loads(cache.read_text())
    svd = variant_key(LayerChoice("svd", 0.5))
    assert isinstance(old["2"][svd], float)  # the first release's format
    old["0"]["not a variant"], old["elsewhere"] = "junk", 3
    cache.write_text(json.dumps(old))
    measured: list[CompressionConfig] = []

    def divergence(config: CompressionConfig) -> VariantScore:
        measured.append(config)
        return synthetic_divergence(config)

    result = measure_sensitivity(model, slots, shapes, score=divergence, baseline=VariantScore(0.9, 0.0), **settings)
    assert len(measured) == sum(len(drops) for drops in result.drops.values())
    assert result.divergences["2"][svd] == pytest.approx(1.0)
    assert json.loads(cache.read_text())["2"][svd] == {"accuracy": pytest.approx(0.8), "kl": pytest.approx(1.0)}
    cache.write_text("[1, 2]")  # unreadable: measured again
    again = measure_sensitivity(model, slots, shapes, score=divergence, baseline=VariantScore(0.9, 0.0), **settings)
    assert again == result and len(measured) == 2 * sum(len(drops) for drops in result.drops.values())


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory) -> ClassificationEvaluator:
    splits = load_dataset(
        "fashion_mnist", root=Path("data"), val_fraction=0.1, seed=0, train_subset=512, eval_subset=256
    )
    torch.manual_seed(0)
    model = build_model(
        "resnet18", num_classes=splits.num_classes, in_channels=splits.in_channels, image_size=splits.image_size
    )
    return ClassificationEvaluator(
        model=model,
        splits=splits,
        device=torch.device("cpu"),
        options=EvaluatorOptions(finetune_steps=1, batch_size=32, calib_batches=1),
        threads=1,
        zero_shot_images=32,
    )


def test_a_config_scored_at_zero_shot_is_not_built_again_for_its_evaluation(evaluator, monkeypatch) -> None:
    """The zero-shot check recalibrates the config's model; the evaluation right after it fine-tunes that model
    (apply and recalibration once), records the zero-shot accuracy, and measures what a fresh evaluation does."""
    config = CompressionConfig(layers={"layer1.0.conv1": LayerChoice("svd", 0.25)})
    built: list[int] = []
    real_apply = classification.apply_config
    monkeypatch.setattr(classification, "apply_config", lambda *a, **k: built.append(1) or real_apply(*a, **k))
    expected = evaluator.zero_shot_accuracy(config)
    assert built == [1] and 0 <= expected <= 1
    after_check = evaluator.evaluate(config)
    assert built == [1], "rebuilt the config the zero-shot check had built"
    assert after_check.extra["zero_shot_accuracy"] == expected
    assert after_check.extra["time_zero_shot_s"] > 0 and after_check.extra["time_finetune_s"] > 0
    fresh = evaluator.evaluate(config)
    assert built == [1, 1] and "zero_shot_accuracy" not in fresh.extra
    assert fresh.accuracy == after_check.accuracy  # the same seeded pipeline either way
    evaluator.zero_shot_accuracy(config)
    other = CompressionConfig(layers={"layer1.0.conv1": LayerChoice("svd", 0.5)})
    assert "zero_shot_accuracy" not in evaluator.evaluate(other).extra  # another config is built afresh


TRAINED = Path(__file__).parent / "fixtures" / "legacy"
"""A small CNN with trained weights (the legacy fixture's): divergences mean something on it."""


@pytest.fixture(scope="module")
def trained() -> ClassificationEvaluator:
    splits = load_dataset(
        "fashion_mnist", root=Path("data"), val_fraction=0.1, seed=0, train_subset=1024, eval_subset=512
    )
    model = build_model(f"{TRAINED / 'tinynet.py'}:tiny", num_classes=10, in_channels=1, image_size=28)
    return ClassificationEvaluator(
        model=load_checkpoint(model, TRAINED / "tiny.pt"),
        splits=splits,
        device=torch.device("cpu"),
        options=EvaluatorOptions(batch_size=64, calib_batches=2),
        threads=1,
        divergence_images=384,
    )


def test_output_divergence_is_zero_uncompressed_and_grows_as_rank_shrinks(trained) -> None:
    """On a trained model: keep is the uncompressed model (no divergence, its accuracy); the KL divergence grows as
    a layer's rank shrinks; the scores repeat, and the global RNG is left as it was."""
    rng = torch.get_rng_state()
    dense = trained.output_divergence(CompressionConfig(layers={}))
    assert dense.kl == pytest.approx(0.0, abs=1e-7) and dense.accuracy > 0.6
    assert trained.output_divergence(CompressionConfig(layers={"conv2": LayerChoice("keep")})) == dense
    scores = [
        trained.output_divergence(CompressionConfig(layers={"conv2": LayerChoice("svd", rank)}))
        for rank in (0.5, 0.25, 0.125)
    ]
    assert 0 < scores[0].kl < scores[1].kl < scores[2].kl
    assert scores[-1].accuracy < dense.accuracy
    assert trained.output_divergence(CompressionConfig(layers={"conv2": LayerChoice("svd", 0.125)})) == scores[-1]
    assert torch.equal(torch.get_rng_state(), rng)
    assert trained.divergence_key()["divergence_images"] == 384


def test_latency_is_measured_before_the_model_sees_other_batch_sizes(evaluator, monkeypatch) -> None:
    """A quantized conv tunes itself to the first batch size it runs: timing after the evaluation batches
    measured int8 models 2-3x slow."""
    from ranksearch.measure import latency

    order: list[str] = []
    real_pair, real_accuracy = latency.measure_speedup, classification.correct_predictions

    def latencies(reference, model, example, **kwargs):
        order.append(f"latency batch {len(example)}")
        return real_pair(reference, model, example, **kwargs)

    def accuracy(model, loader, **kwargs):
        order.append("accuracy")
        return real_accuracy(model, loader, **kwargs)

    monkeypatch.setattr(latency, "measure_speedup", latencies)  # the torch backend's timing
    monkeypatch.setattr(classification, "correct_predictions", accuracy)
    evaluator.evaluate(CompressionConfig(layers={"layer4.0.conv1": LayerChoice("svd", 0.5, int8=True)}))
    assert order == ["latency batch 1", "accuracy"]


def test_paired_latency_alternates_rounds() -> None:
    from ranksearch.measure import latency

    fast, slow = nn.Conv2d(4, 4, 1), nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(8)])
    order: list[nn.Module] = []
    for module in (fast, slow):
        module.register_forward_pre_hook(lambda m, args: order.append(m) if not order or order[-1] is not m else None)
    paired = latency.measure_speedup(fast, slow, torch.randn(1, 4, 16, 16), threads=1, rounds=3)
    reference, model = paired.reference, paired.candidate
    assert order == [fast, slow] * 3
    assert reference.attempts == model.attempts == 3 and reference.runs >= 30
    assert reference.p10_ms <= reference.median_ms <= reference.p90_ms
    assert model.median_ms > reference.median_ms
    assert len(paired.ratios) == 3 and paired.speedup_low <= paired.speedup_high < 1  # the slow one is slower
    assert paired.speedup == pytest.approx(reference.median_ms / model.median_ms)


def test_greedy_cost_without_a_latency_table_is_macs(problem) -> None:
    from ranksearch.compress import layer_cost
    from ranksearch.search import SearchSpace
    from ranksearch.study import PreparedSearch, RunContext

    model, _, shapes = problem
    context = RunContext(
        settings=None, model=model, splits=None, device=torch.device("cpu"), example=None, input_shapes=shapes
    )
    space = SearchSpace.from_dict({"techniques": {"spatial_conv": ["keep", "svd"]}, "ranks": [0.25]})
    search = PreparedSearch(None, context, space, {}, None, None, {}, {}, None, None, (), None)
    cost = search.variant_cost()
    dense = layer_cost(model[2], "keep", None, shapes["2"]).macs
    assert cost("2", LayerChoice("keep")) == dense > cost("2", LayerChoice("svd", 0.25)) > 0
