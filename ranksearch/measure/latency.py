"""Wall-clock latency of a model on the target device: fixed threads, warm-up, median of repeats."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ranksearch.errors import RanksearchError
from ranksearch.measure.timing import Latency, PairedLatency, paired_rounds, time_repeatedly


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
