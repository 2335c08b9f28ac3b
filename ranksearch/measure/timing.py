"""The timing protocol every backend shares, local or remote: warm up, time repeatedly, keep the least noisy attempt;
a model and its reference timed in alternating rounds.

Standard library only (no torch): the target server (:mod:`ranksearch.measure.target_server`) times with it on a
device that has nothing but Python and ONNX Runtime.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Latency:
    """A latency measurement: the median and the spread of repeated timed runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    attempts: int
    device: str
    threads: int
    backend: str = "torch"

    @property
    def spread(self) -> float:
        """``(p90 - p10) / median``: how noisy the measurement was."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "spread": self.spread}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Latency:
        """The latency :meth:`to_dict` wrote (a remote target's answer); a missing or mistyped field raises
        ``KeyError``, ``TypeError`` or ``ValueError``."""
        numbers = {key: float(data[key]) for key in ("median_ms", "p10_ms", "p90_ms")}  # type: ignore[arg-type]
        counts = {key: int(data[key]) for key in ("runs", "attempts", "threads")}  # type: ignore[call-overload]
        return cls(**numbers, **counts, device=str(data["device"]), backend=str(data["backend"]))


@dataclass(frozen=True)
class PairedLatency:
    """A model timed beside a reference in alternating rounds (:func:`measure_speedup`)."""

    reference: Latency
    candidate: Latency
    ratios: tuple[float, ...]
    """Per round, the reference's median over the candidate's: the speedup as each round measured it."""

    @property
    def speedup(self) -> float:
        """The reference's median over the candidate's, both medians of their rounds' medians."""
        return self.reference.median_ms / self.candidate.median_ms

    @property
    def speedup_low(self) -> float:
        """The slowest round's speedup. It exceeds 1 only when every round measured the candidate faster: a model
        no faster than the reference does so by chance with probability ``0.5 ** rounds`` at most (a sign test)."""
        return min(self.ratios)

    @property
    def speedup_high(self) -> float:
        return max(self.ratios)

    def to_dict(self) -> dict[str, object]:
        return {"reference": self.reference.to_dict(), "candidate": self.candidate.to_dict(), "ratios": self.ratios}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PairedLatency:
        """The paired latency :meth:`to_dict` wrote; malformed data raises as :meth:`Latency.from_dict` does."""
        ratios = data["ratios"]
        if not isinstance(ratios, list | tuple) or not ratios:
            raise ValueError(f"ratios {ratios!r}: not a list of numbers")
        return cls(
            reference=Latency.from_dict(data["reference"]),  # type: ignore[arg-type]
            candidate=Latency.from_dict(data["candidate"]),  # type: ignore[arg-type]
            ratios=tuple(float(r) for r in ratios),
        )

    def summary(self) -> dict[str, float]:
        """What a trial records of it."""
        return {
            "speedup_low": self.speedup_low,
            "speedup_high": self.speedup_high,
            "latency_rounds": float(len(self.ratios)),
        }


def paired_rounds(
    time_reference: Callable[..., Latency],
    time_candidate: Callable[..., Latency],
    *,
    rounds: int,
    target_seconds: float,
) -> PairedLatency:
    """Alternate ``time_reference(target_seconds=...)`` and ``time_candidate(target_seconds=...)`` for ``rounds``
    rounds of ``target_seconds / rounds`` each (any backend: each callable times one model once)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    timed: tuple[list[Latency], list[Latency]] = ([], [])
    for _ in range(rounds):
        for runs, time_model in zip(timed, (time_reference, time_candidate), strict=True):
            runs.append(time_model(target_seconds=target_seconds / rounds))
    ratios = tuple(ref.median_ms / cand.median_ms for ref, cand in zip(*timed, strict=True))
    return PairedLatency(reference=_combined(timed[0]), candidate=_combined(timed[1]), ratios=ratios)


def _combined(rounds: list[Latency]) -> Latency:
    return replace(
        rounds[0],
        median_ms=statistics.median(r.median_ms for r in rounds),
        p10_ms=min(r.p10_ms for r in rounds),
        p90_ms=max(r.p90_ms for r in rounds),
        runs=sum(r.runs for r in rounds),
        attempts=len(rounds),
    )


def time_repeatedly(
    time_once: Callable[[], float],
    *,
    device: str,
    threads: int,
    backend: str = "torch",
    warmup: int = 5,
    min_runs: int = 10,
    max_runs: int = 200,
    target_seconds: float = 0.5,
    max_spread: float = 0.15,
    max_attempts: int = 3,
) -> Latency:
    """The timing loop every backend shares; ``time_once`` runs one forward pass and returns its milliseconds.

    Each attempt warms up, then times as many runs as fit in ``target_seconds`` (between
    ``min_runs`` and ``max_runs``). An attempt whose spread exceeds ``max_spread`` is repeated,
    up to ``max_attempts``; the least noisy attempt is reported. ``device``, ``threads`` and
    ``backend`` only label the result.
    """
    best: list[float] | None = None
    attempts = 0
    while attempts < max_attempts:
        attempts += 1
        timings = _timed_runs(time_once, warmup, min_runs, max_runs, target_seconds)
        if best is None or _spread(timings) < _spread(best):
            best = timings
        if _spread(best) <= max_spread:
            break
    deciles = statistics.quantiles(best, n=10)
    return Latency(
        median_ms=statistics.median(best),
        p10_ms=deciles[0],
        p90_ms=deciles[-1],
        runs=len(best),
        attempts=attempts,
        device=device,
        threads=threads,
        backend=backend,
    )


def _spread(timings: list[float]) -> float:
    deciles = statistics.quantiles(timings, n=10)
    median = statistics.median(timings)
    return (deciles[-1] - deciles[0]) / median if median > 0 else 0.0


def _timed_runs(
    time_once: Callable[[], float], warmup: int, min_runs: int, max_runs: int, target: float
) -> list[float]:
    for _ in range(warmup):
        time_once()
    timings = [time_once() for _ in range(min_runs)]
    runs = min(max_runs, max(min_runs, int(target * 1000 / max(statistics.median(timings), 1e-3))))
    timings += [time_once() for _ in range(runs - min_runs)]
    return timings
