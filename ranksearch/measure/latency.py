"""Wall-clock latency of a model on the target device: fixed threads, warm-up, median of repeats."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ranksearch.errors import RanksearchError

LATENCY_BACKENDS = ("torch", "onnxruntime")
"""Where latency is measured: torch itself, or ONNX Runtime (CPU) running the model's ONNX export."""


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


def resolve_device(name: str, *, option: str = "--device") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``; an accelerator asked for where there is none is a user error naming
    ``option``."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RanksearchError(f"{option} {name!r} is not a device; use cpu, cuda or mps") from None
    if device.type not in {"cpu", "cuda", "mps"}:
        raise RanksearchError(f"{option} {name!r} is not supported; use cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RanksearchError(f"{option} {name} was asked for but CUDA is not available here; use {option} cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RanksearchError(f"{option} mps was asked for but MPS is not available here; use {option} cpu")
    return device


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` intra-op threads (unchanged when None), restoring the setting after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def measure_latency(
    model: nn.Module,
    example: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    warmup: int = 5,
    min_runs: int = 10,
    max_runs: int = 200,
    target_seconds: float = 0.5,
    max_spread: float = 0.15,
    max_attempts: int = 3,
) -> Latency:
    """Median forward latency of ``model`` on ``example`` (batch included) in eval mode.

    Timed by :func:`time_repeatedly` (its docstring says how); CUDA runs are timed with events
    after a synchronisation.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    example = example.to(device)
    try:
        with torch_threads(threads) as used, torch.inference_mode():
            return time_repeatedly(
                functools.partial(_time_once, model, example, device),
                device=str(device),
                threads=used,
                warmup=warmup,
                min_runs=min_runs,
                max_runs=max_runs,
                target_seconds=target_seconds,
                max_spread=max_spread,
                max_attempts=max_attempts,
            )
    finally:
        model.train(was_training)


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

    def summary(self) -> dict[str, float]:
        """What a trial records of it."""
        return {
            "speedup_low": self.speedup_low,
            "speedup_high": self.speedup_high,
            "latency_rounds": float(len(self.ratios)),
        }


def measure_speedup(
    reference: nn.Module,
    model: nn.Module,
    example: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    rounds: int = 4,
    target_seconds: float = 0.5,
) -> PairedLatency:
    """``reference`` and ``model`` timed in ``rounds`` alternating rounds of ``target_seconds / rounds`` each: the
    machine's drift hits both alike, so their ratio (a speedup) holds where two back-to-back measurements can
    differ by 20 %. Each median is the median of its rounds' medians; p10/p90 are the widest of the rounds'."""
    return paired_rounds(
        functools.partial(
            measure_latency, reference, example, device=device, threads=threads, warmup=2, max_attempts=1
        ),
        functools.partial(measure_latency, model, example, device=device, threads=threads, warmup=2, max_attempts=1),
        rounds=rounds,
        target_seconds=target_seconds,
    )


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


def _time_once(model: nn.Module, example: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        model(example)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    if device.type == "mps":
        torch.mps.synchronize()
    begin = time.perf_counter_ns()
    model(example)
    if device.type == "mps":
        torch.mps.synchronize()
    return (time.perf_counter_ns() - begin) / 1e6
