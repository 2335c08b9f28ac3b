"""What ranksearch keeps on disk between runs, and clearing it (``ranksearch cache``).

Four caches: decomposition factors and trained baselines under :func:`ranksearch.util.cache_dir`, latency tables
and sensitivity passes under the results directory. Only the factors grow with every model and search space (a
default resnet18 run leaves about 1 GB), so only they have a size limit (``$RANKSEARCH_CACHE_MAX_GB``) with
least-recently-used eviction; the others are a few files each. Everything here is rebuilt when missing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ranksearch.errors import RanksearchError
from ranksearch.util import (
    CachedFile,
    cache_dir,
    cache_limit_bytes,
    cached_files,
    evict_least_recent,
    remove_stale_temporaries,
)

__all__ = ["CACHE_AREAS", "CacheArea", "cache_areas", "clear_caches"]

CACHE_AREAS = ("factors", "baselines", "latency-tables", "sensitivity")
"""The caches by name, as ``ranksearch cache --only`` takes them."""
_DAY_S = 86_400.0


@dataclass(frozen=True)
class CacheArea:
    """One cache: where it is, what rebuilding it costs, its files (least recently used first) and its limit."""

    name: str
    directory: Path
    pattern: str
    rebuilt_by: str
    files: tuple[CachedFile, ...]
    limit_bytes: int | None = None

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def least_recent(self) -> float | None:
        """When the least recently used file was last used (seconds since the epoch); None when empty."""
        return self.files[0].used if self.files else None


def cache_areas(results_dir: Path) -> list[CacheArea]:
    """Every cache as it is now (``results_dir``: where the latency tables and sensitivity passes are)."""
    root = cache_dir()
    places = {
        "factors": (root / "factors", "*.pt", "decomposing a layer again (seconds)", cache_limit_bytes()),
        "baselines": (root / "baselines", "*.pt", "training the dense model again (minutes to hours)", None),
        "latency-tables": (results_dir / "latency-tables", "*.json", "timing every layer variant (a minute)", None),
        "sensitivity": (results_dir / "sensitivity", "*.json", "the sensitivity pass (minutes)", None),
    }
    return [
        CacheArea(name, directory, pattern, cost, tuple(cached_files(directory, pattern)), limit)
        for name, (directory, pattern, cost, limit) in places.items()
    ]


def clear_caches(
    results_dir: Path,
    *,
    only: Sequence[str] = (),
    older_than_days: float | None = None,
    to_gb: float | None = None,
) -> list[tuple[CacheArea, int, int]]:
    """Remove cached files; return (area, files removed, bytes freed) per area touched.

    ``only`` names the areas (default: all); ``older_than_days`` keeps files used more recently than that;
    ``to_gb`` instead trims each area to that many gigabytes, least recently used first.
    """
    unknown = [name for name in only if name not in CACHE_AREAS]
    if unknown:
        raise RanksearchError(f"--only {unknown[0]!r}: no such cache; choose from {', '.join(CACHE_AREAS)}")
    if older_than_days is not None and not (math.isfinite(older_than_days) and older_than_days >= 0):
        raise RanksearchError(f"--older-than {older_than_days}: must be 0 or more days; pass e.g. --older-than 30")
    if to_gb is not None and not (math.isfinite(to_gb) and to_gb >= 0):
        raise RanksearchError(f"--to-gb {to_gb}: must be 0 or more gigabytes; pass e.g. --to-gb 2")
    if to_gb is not None and older_than_days is not None:
        raise RanksearchError("--to-gb and --older-than: pass one of them, not both")
    cutoff = None if older_than_days is None else time.time() - older_than_days * _DAY_S
    outcome = []
    for area in cache_areas(results_dir):
        if only and area.name not in only:
            continue
        stale = remove_stale_temporaries(area.directory)  # left by killed writers
        if to_gb is not None:
            freed = stale + evict_least_recent(
                area.directory, max_bytes=int(to_gb * 1e9), pattern=area.pattern, target=1.0
            )
            removed = len(area.files) - len(cached_files(area.directory, area.pattern))
            outcome.append((area, max(removed, 0), freed))
            continue
        removed, freed = 0, stale
        for file in area.files:
            if cutoff is not None and file.used >= cutoff:
                continue
            try:
                file.path.unlink()
            except FileNotFoundError:
                continue
            removed, freed = removed + 1, freed + file.size
        outcome.append((area, removed, freed))
    return outcome
