"""A custom evaluator gets what its capabilities declare: with ZeroShotScorer, the sensitivity pass, the hopeless
screen and early rejection; with LocalTorchTiming (true), the latency table. Without them, none of those.

The search runs on the legacy fixture's tiny model and weights (``tests/fixtures/legacy``), so it trains nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import ranksearch as rs
from ranksearch.evaluate import LocalTorchTiming, ZeroShotScorer
from ranksearch.results.record import Outcome, records
from ranksearch.study import RunSettings, run_search

FIXTURE = Path(__file__).parent / "fixtures" / "legacy"


class Scored(rs.Evaluator):
    """Scores by rule: conv1 at rank 0.25 loses 20 points, any other layer at rank 0.25 loses 8, any other compressed
    layer 4; each compressed layer saves a tenth of the latency."""

    @staticmethod
    def accuracy(config: rs.CompressionConfig) -> float:
        lost = 0.0
        for name, choice in config.layers.items():
            if choice.technique != "keep":
                lost += (0.20 if name == "conv1" else 0.08) if choice.rank == 0.25 else 0.04
        return 0.9 - lost

    def evaluate(self, config, *, split="val"):
        compressed = sum(c.technique != "keep" for c in config.layers.values())
        return rs.Metrics(accuracy=self.accuracy(config), latency_ms=1.0 - 0.1 * compressed, reference_latency_ms=1.0)


class ZeroShotScored(Scored, ZeroShotScorer, LocalTorchTiming):
    def __init__(self, *, local_torch: bool) -> None:
        self.local_torch = local_torch

    def zero_shot_accuracy(self, config):
        return self.accuracy(config)

    def zero_shot_baseline(self):
        return 0.9

    def zero_shot_key(self):
        return {"rule": "ten points per rank-0.25 layer"}

    @property
    def times_local_torch(self):
        return self.local_torch


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "tiny", ignore=shutil.ignore_patterns("__pycache__", "results"))
    monkeypatch.chdir(tmp_path / "tiny")
    monkeypatch.setenv("RANKSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "tiny"


def settings(**changes: object) -> RunSettings:
    values: dict[str, object] = dict(
        model="tinynet.py:tiny",
        checkpoint=Path("tiny.pt"),
        space=Path("space.yaml"),
        train_subset=1024,
        eval_subset=256,
        sampler="random",
        threads=1,
        budget=16,
        max_zero_shot_drop=10.0,
    )
    return RunSettings.of(**{**values, **changes})


@pytest.mark.timeout(600)
def test_a_zero_shot_scorer_gets_sensitivity_screens_and_early_rejection(folder: Path) -> None:
    result = run_search(settings(study_name="capable"), evaluator=ZeroShotScored(local_torch=False))
    assert "sensitivity" in result.phase_seconds and "latency_table" not in result.phase_seconds
    assert list((folder / "results" / "sensitivity").glob("sensitivity-*.json"))
    trials = records(result.study)
    screened = [t for t in trials if t.outcome == Outcome.SCREENED]
    assert screened and all(t.screen == "hopeless_variant" and "layer conv1" in t.reason for t in screened)
    rejected = [t for t in trials if t.outcome == Outcome.REJECTED_AT_ZERO_SHOT]
    assert rejected and all(Scored.accuracy(t.compression_config()) < 0.8 for t in rejected)
    assert all(
        Scored.accuracy(t.compression_config()) >= 0.8
        for t in trials
        if t.outcome == Outcome.COMPLETE and not t.protected
    )
    assert sum(t.counts_toward_budget for t in trials) == 16


@pytest.mark.timeout(600)
def test_local_torch_timing_gets_the_latency_table(folder: Path) -> None:
    result = run_search(settings(study_name="timed", budget=1), evaluator=ZeroShotScored(local_torch=True))
    assert "latency_table" in result.phase_seconds
    assert list((folder / "results" / "latency-tables").glob("latency-*.json"))


@pytest.mark.timeout(600)
def test_a_plain_evaluator_gets_none_of_them(folder: Path) -> None:
    result = run_search(settings(study_name="plain"), evaluator=Scored())
    assert "sensitivity" not in result.phase_seconds and "latency_table" not in result.phase_seconds
    assert {t.outcome for t in records(result.study)} == {Outcome.COMPLETE}
