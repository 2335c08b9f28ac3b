"""Screens: reasons to prune a sampled config before (or early in) its evaluation.

Each screen is a small object with one method, :meth:`Screen.screen`, in the spirit of Optuna's
``BasePruner.prune``: given a :class:`Candidate`, it returns a :class:`Verdict` (which screen, and why) or None.
The search asks its screens in order and prunes the trial on the first verdict. Anchors, warm starts, promotions
and retries are ``protected``: only a hard limit (``--max-latency-ms``) screens them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ranksearch.config import CompressionConfig
from ranksearch.search.sensitivity import Sensitivity


@dataclass(frozen=True)
class Prediction:
    """The latency table's prediction for a config and for the dense model, both from the same fitted table."""

    latency_ms: float
    dense_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.latency_ms


@dataclass(frozen=True)
class Candidate:
    """A sampled config and what is known of it so far."""

    config: CompressionConfig
    protected: bool = False
    """An anchor or a warm start."""
    prediction: Prediction | None = None
    zero_shot_accuracy: float | None = None


@dataclass(frozen=True)
class Verdict:
    """A screen's decision to prune: which screen, and the reason shown to the user."""

    screen: str
    reason: str


class Screen(ABC):
    """Decides whether a candidate is pruned."""

    name: str = ""

    @abstractmethod
    def screen(self, candidate: Candidate) -> Verdict | None:
        """A verdict to prune ``candidate``, or None to let it through."""


class OverLatencyLimit(Screen):
    """Predicted over ``--max-latency-ms`` (anchors and warm starts too: the limit is the user's)."""

    name = "over_latency_limit"

    def __init__(self, *, limit_ms: float) -> None:
        self.limit_ms = limit_ms

    def screen(self, candidate: Candidate) -> Verdict | None:
        predicted = candidate.prediction
        if predicted is None or predicted.latency_ms <= self.limit_ms:
            return None
        return Verdict(self.name, f"predicted {predicted.latency_ms:.3f} ms, over --max-latency-ms {self.limit_ms:g}")


class SlowerThanDense(Screen):
    """Predicted slower than the uncompressed model: dominated by it, whatever its accuracy."""

    name = "slower_than_dense"

    def screen(self, candidate: Candidate) -> Verdict | None:
        predicted = candidate.prediction
        if candidate.protected or predicted is None or predicted.latency_ms <= predicted.dense_ms:
            return None
        return Verdict(
            self.name,
            f"predicted {predicted.latency_ms:.3f} ms, slower than the uncompressed model's "
            f"{predicted.dense_ms:.3f} ms",
        )


class HopelessVariant(Screen):
    """Uses a layer variant whose zero-shot drop alone is over ``--max-zero-shot-drop``."""

    name = "hopeless_variant"

    def __init__(self, *, sensitivity: Sensitivity, max_drop: float) -> None:
        self.sensitivity = sensitivity
        self.max_drop = max_drop

    def screen(self, candidate: Candidate) -> Verdict | None:
        if candidate.protected:
            return None
        hit = self.sensitivity.hopeless_layer(candidate.config, self.max_drop)
        if hit is None:
            return None
        name, drop = hit
        choice = candidate.config.layers[name]
        amount = "beyond" if math.isinf(drop) else f"{drop:.1f} points, over"
        return Verdict(
            self.name,
            f"layer {name}: {choice.technique}@{choice.rank} alone drops zero-shot accuracy {amount} "
            f"--max-zero-shot-drop {self.max_drop:g}",
        )


class ZeroShotDrop(Screen):
    """Its zero-shot accuracy (measured, not fine-tuned) falls more than ``max_drop`` points below the baseline's."""

    name = "zero_shot_drop"

    def __init__(self, *, baseline_accuracy: float, max_drop: float) -> None:
        self.baseline_accuracy = baseline_accuracy
        self.max_drop = max_drop

    def screen(self, candidate: Candidate) -> Verdict | None:
        accuracy = candidate.zero_shot_accuracy
        if candidate.protected or accuracy is None:
            return None
        drop = 100.0 * (self.baseline_accuracy - accuracy)
        if drop <= self.max_drop:
            return None
        return Verdict(
            self.name,
            f"zero-shot accuracy {100 * accuracy:.2f} %, {drop:.1f} points below the uncompressed model's "
            f"(--max-zero-shot-drop {self.max_drop:g})",
        )


def first_verdict(screens: list[Screen], candidate: Candidate) -> Verdict | None:
    """The first screen's verdict on ``candidate``, in order, or None when all let it through."""
    for screen in screens:
        verdict = screen.screen(candidate)
        if verdict is not None:
            return verdict
    return None
