"""The hypervolume of a two-objective front: one exact sweep, used by the progress plot and the benchmarks."""

from __future__ import annotations

from collections.abc import Iterable


def hypervolume_2d(points: Iterable[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Exact area dominated by ``(accuracy, latency)`` points (accuracy up, latency down) within ``reference``.

    Sweeps the points fastest first: each one that beats the best accuracy so far adds the
    rectangle between that accuracy, its own, its latency and the reference latency. Any pair of
    objectives works: negate one to be maximized in the second place (e.g. ``(accuracy, -speedup)``
    with reference ``(floor, -1.0)``).
    """
    ref_accuracy, ref_latency = reference
    area, best = 0.0, ref_accuracy
    for accuracy, latency in sorted(points, key=lambda p: (p[1], -p[0])):
        if latency < ref_latency and accuracy > best:
            area += (ref_latency - latency) * (accuracy - best)
            best = accuracy
    return area
