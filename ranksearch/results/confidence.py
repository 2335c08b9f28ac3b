"""Paired accuracy comparisons: how far a compressed model's accuracy is below the baseline's on the same images,
with a 95 % confidence interval."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

__all__ = ["Z_95", "DropEstimate", "paired_drop"]

Z_95 = 1.959963984540054
"""The two-sided 95 % quantile of the standard normal."""


@dataclass(frozen=True)
class DropEstimate:
    """The baseline's accuracy minus the candidate's on the same images, in percentage points, with its 95 % interval
    (positive: the candidate is worse)."""

    drop_pp: float
    low_pp: float
    high_pp: float
    images: int

    def within(self, max_drop_pp: float, *, confident: bool) -> bool:
        """Whether the drop is at most ``max_drop_pp``: at the point estimate, or (``confident``) with 95 %
        confidence (the interval's upper end)."""
        return (self.high_pp if confident else self.drop_pp) <= max_drop_pp

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, stored: Mapping[str, float]) -> DropEstimate:
        return cls(
            drop_pp=float(stored["drop_pp"]),
            low_pp=float(stored["low_pp"]),
            high_pp=float(stored["high_pp"]),
            images=int(stored["images"]),
        )

    def label(self) -> str:
        """``0.42 pp [0.18, 0.66]``"""
        return f"{self.drop_pp:.2f} pp [{self.low_pp:.2f}, {self.high_pp:.2f}]"


def paired_drop(baseline_correct: torch.Tensor, candidate_correct: torch.Tensor) -> DropEstimate:
    """The accuracy drop of a candidate against the baseline from their per-image correctness on the same images
    (bool tensors in the same order), with the paired 95 % interval of the mean difference (normal approximation
    over the per-image differences; its test is McNemar's). Only the images where the two disagree widen it."""
    base = baseline_correct.to(torch.float64).flatten()
    cand = candidate_correct.to(torch.float64).flatten()
    if base.shape != cand.shape or base.numel() == 0:
        raise ValueError(
            f"paired accuracy needs the same non-empty images for both models (got {base.numel()} and {cand.numel()})"
        )
    differences = base - cand
    count = differences.numel()
    mean = differences.mean().item()
    spread = differences.std(unbiased=True).item() if count > 1 else 0.0
    half = Z_95 * spread / math.sqrt(count)
    return DropEstimate(drop_pp=100 * mean, low_pp=100 * (mean - half), high_pp=100 * (mean + half), images=count)
