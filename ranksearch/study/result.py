"""What a search returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import optuna


@dataclass
class SearchResult:
    """A finished (or interrupted) search: the study and where its results are."""

    study: optuna.Study
    directory: Path
    baseline: dict[str, float]
    phase_seconds: dict[str, float] = field(default_factory=dict)
