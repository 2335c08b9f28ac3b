"""Screens: each decides on a candidate alone, names itself in its verdict, and respects protected candidates."""

from __future__ import annotations

import math

import pytest

from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.search.latency_table import variant_key
from ranksearch.search.screens import (
    Candidate,
    HopelessVariant,
    OverLatencyLimit,
    Prediction,
    SlowerThanDense,
    ZeroShotDrop,
    first_verdict,
)
from ranksearch.search.sensitivity import Sensitivity

SVD = CompressionConfig(layers={"conv": LayerChoice("svd", 0.25)})


def candidate(**changes: object) -> Candidate:
    return Candidate(**{"config": SVD, **changes})


def test_over_latency_limit_screens_protected_candidates_too() -> None:
    screen = OverLatencyLimit(limit_ms=2.0)
    assert screen.screen(candidate()) is None  # nothing predicted: nothing to judge
    assert screen.screen(candidate(prediction=Prediction(2.0, 3.0))) is None  # at the limit is within it
    verdict = screen.screen(candidate(prediction=Prediction(2.5, 3.0), protected=True))
    assert verdict is not None and verdict.screen == "over_latency_limit"
    assert verdict.reason == "predicted 2.500 ms, over --max-latency-ms 2"


def test_slower_than_dense_spares_protected_candidates() -> None:
    screen = SlowerThanDense()
    slow = Prediction(latency_ms=3.5, dense_ms=3.0)
    assert screen.screen(candidate(prediction=Prediction(3.0, 3.0))) is None
    assert screen.screen(candidate(prediction=slow, protected=True)) is None
    verdict = screen.screen(candidate(prediction=slow))
    assert verdict is not None and verdict.screen == "slower_than_dense"
    assert verdict.reason == "predicted 3.500 ms, slower than the uncompressed model's 3.000 ms"
    assert Prediction(1.5, 3.0).speedup == 2.0


def test_hopeless_variant_names_the_layer_and_its_drop() -> None:
    drops = {"conv": {variant_key(LayerChoice("svd", 0.25)): 12.34, variant_key(LayerChoice("svd", 0.125)): math.inf}}
    screen = HopelessVariant(sensitivity=Sensitivity(baseline_accuracy=0.9, drops=drops), max_drop=10.0)
    verdict = screen.screen(candidate())
    assert verdict is not None and verdict.screen == "hopeless_variant"
    assert (
        verdict.reason
        == "layer conv: svd@0.25 alone drops zero-shot accuracy 12.3 points, over --max-zero-shot-drop 10"
    )
    beyond = screen.screen(candidate(config=CompressionConfig(layers={"conv": LayerChoice("svd", 0.125)})))
    assert beyond is not None and "alone drops zero-shot accuracy beyond --max-zero-shot-drop 10" in beyond.reason
    assert screen.screen(candidate(protected=True)) is None
    lenient = HopelessVariant(sensitivity=screen.sensitivity, max_drop=12.5)
    assert lenient.screen(candidate()) is None


@pytest.mark.parametrize(("accuracy", "rejected"), [(0.5, False), (0.4999, True), (None, False)])
def test_zero_shot_drop_judges_the_measured_accuracy(accuracy: float | None, rejected: bool) -> None:
    screen = ZeroShotDrop(baseline_accuracy=0.75, max_drop=25.0)
    verdict = screen.screen(candidate(zero_shot_accuracy=accuracy))
    assert (verdict is not None) == rejected
    if verdict is not None:
        assert verdict.screen == "zero_shot_drop"
        assert verdict.reason == (
            "zero-shot accuracy 49.99 %, 25.0 points below the uncompressed model's (--max-zero-shot-drop 25)"
        )
    assert screen.screen(candidate(zero_shot_accuracy=0.1, protected=True)) is None


def test_first_verdict_follows_the_screens_order() -> None:
    over, slower = OverLatencyLimit(limit_ms=1.0), SlowerThanDense()
    slow = candidate(prediction=Prediction(latency_ms=4.0, dense_ms=3.0))
    assert first_verdict([over, slower], slow).screen == "over_latency_limit"
    assert first_verdict([slower, over], slow).screen == "slower_than_dense"
    assert first_verdict([over, slower], candidate(prediction=Prediction(0.5, 3.0))) is None
    assert first_verdict([], slow) is None
