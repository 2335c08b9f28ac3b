"""ONNX Runtime sessions and their timing, without torch: shared by local timing and the remote target server."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ranksearch.errors import RanksearchError
from ranksearch.measure.timing import Latency, PairedLatency, paired_rounds, time_repeatedly
from ranksearch.util import first_line

if TYPE_CHECKING:
    import onnxruntime


def ort_session(model: str | Path | bytes, *, threads: int) -> onnxruntime.InferenceSession:
    """A CPU session running ops one after another on ``threads`` intra-op threads and one inter-op thread, every
    graph optimisation on; a model ONNX Runtime cannot load is a :class:`RanksearchError` naming it."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    source = str(model) if isinstance(model, Path) else model
    try:
        return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        name = model if isinstance(model, str | Path) else "the exported model"
        raise RanksearchError(
            f"{name}: ONNX Runtime cannot load it ({first_line(exc)}); pass an ONNX model file"
        ) from None


def session_timer(
    session: onnxruntime.InferenceSession, example: Any, *, threads: int, device: str = "cpu"
) -> Callable[..., Latency]:
    """A function that times ``session`` on ``example`` (a numpy array, batch included) with :func:`time_repeatedly`
    (its keyword arguments: warm-up, runs, target seconds, attempts); one ``session.run`` per call."""
    feed = {session.get_inputs()[0].name: example}

    def time_once() -> float:
        begin = time.perf_counter_ns()
        session.run(None, feed)
        return (time.perf_counter_ns() - begin) / 1e6

    return functools.partial(time_repeatedly, time_once, device=device, threads=threads, backend="onnxruntime")


def paired_sessions(
    reference: onnxruntime.InferenceSession,
    candidate: onnxruntime.InferenceSession,
    example: Any,
    *,
    threads: int,
    rounds: int,
    target_seconds: float,
    device: str = "cpu",
) -> PairedLatency:
    """Two sessions timed in alternating rounds on ``example`` (:func:`paired_rounds`; two warm-up runs and one
    attempt per round), as :func:`~ranksearch.measure.latency.measure_speedup` times torch models."""
    timers = [
        functools.partial(session_timer(session, example, threads=threads, device=device), warmup=2, max_attempts=1)
        for session in (reference, candidate)
    ]
    return paired_rounds(*timers, rounds=rounds, target_seconds=target_seconds)
