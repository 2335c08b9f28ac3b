"""torch.compile as a latency target: each model compiled by inductor for CPU inference in the faster of its two modes,
weights frozen or not, chosen by measurement.

Which mode is faster depends on the model (measured, resnet18 at 28 px, 2 threads, BatchNorm folded): freezing makes
inductor treat the weights as constants and prepack them for oneDNN, which takes the dense model from 9.4 ms (not
frozen; eager torch: 6.4 ms) to 3.3 ms, but takes uniform Tucker-2 at rank 0.25, whose convolutions are thin, from
2.6 ms to 5.5 ms. A deployment would pick the faster mode for its model; so does the timing here.

Each model is compiled through a function of its own (a fresh code object), so dynamo keeps one cache per compiled
model: a frozen graph guards on its weights' identity, but a graph that is not frozen guards only on the model's
structure and would otherwise serve any model of the same structure, in the wrong mode.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ranksearch.errors import RanksearchError
from ranksearch.measure.latency import measure_latency, measure_speedup, torch_threads
from ranksearch.measure.timing import PairedLatency
from ranksearch.util import first_line

_PROBE = {"rounds": 2, "target_seconds": 0.3}
"""How the two modes of a model are compared: two alternating rounds, 0.15 s each."""


class CompiledModel(nn.Module):
    """``model`` compiled in one mode (``frozen`` weights or not), called as a module."""

    def __init__(self, model: nn.Module, call: Callable[[torch.Tensor], torch.Tensor], *, frozen: bool) -> None:
        super().__init__()
        self.model = model
        self.frozen = frozen
        self._call = call

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._call(inputs)


@dataclass(frozen=True)
class Compiled:
    """Models compiled (one per input model, in order, each in its faster mode) and the graph breaks dynamo met
    compiling them in those modes: each break runs part of a model eagerly between compiled graphs."""

    modules: list[CompiledModel]
    graph_breaks: int


def compile_fastest(models: Sequence[nn.Module], example: torch.Tensor, *, threads: int | None) -> Compiled:
    """``models`` (eval mode, on CPU) each compiled by inductor with its weights frozen and not, run once on
    ``example`` (which compiles it) with ``threads`` threads, as its kernels will run; of the two, the one faster on
    ``example`` in two alternating rounds is kept. A model inductor cannot compile is a :class:`RanksearchError` with
    dynamo's first line."""
    torch.compiler.reset()  # frees the graphs compiled before
    chosen, breaks = [], 0
    for model in models:
        frozen, frozen_breaks = _compiled(model.eval(), example, threads=threads, frozen=True)
        thawed, thawed_breaks = _compiled(model, example, threads=threads, frozen=False)
        probe = measure_speedup(frozen, thawed, example, threads=threads, **_PROBE)
        keep_frozen = probe.speedup <= 1.0  # the frozen model's time over the other's
        chosen.append(frozen if keep_frozen else thawed)
        breaks += frozen_breaks if keep_frozen else thawed_breaks
    return Compiled(modules=chosen, graph_breaks=breaks)


def _compiled(
    model: nn.Module, example: torch.Tensor, *, threads: int | None, frozen: bool
) -> tuple[CompiledModel, int]:
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    def run(inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    own = types.FunctionType(run.__code__.replace(), run.__globals__, run.__name__, None, run.__closure__)
    before = sum(counters["graph_break"].values())
    call = torch.compile(own)
    with torch_threads(threads), inductor_config.patch(freezing=frozen), torch.inference_mode():
        try:
            call(example)
        except Exception as exc:  # dynamo and inductor raise errors of many kinds
            raise RanksearchError(
                f"torch.compile cannot compile the model ({first_line(exc)}); "
                "use --latency-backend torch or onnxruntime"
            ) from None
    return CompiledModel(model, call, frozen=frozen), sum(counters["graph_break"].values()) - before


def compiled_speedup(
    reference: nn.Module,
    model: nn.Module,
    example: torch.Tensor,
    *,
    threads: int | None,
    rounds: int = 4,
    target_seconds: float = 0.5,
) -> tuple[PairedLatency, Compiled]:
    """``reference`` and ``model`` compiled (:func:`compile_fastest`) and timed in alternating rounds on ``example``
    (:func:`~ranksearch.measure.latency.measure_speedup`), with what was compiled."""
    compiled = compile_fastest([reference, model], example, threads=threads)
    paired = measure_speedup(*compiled.modules, example, threads=threads, rounds=rounds, target_seconds=target_seconds)
    reference_ms, candidate_ms = (
        replace(latency, backend="compile") for latency in (paired.reference, paired.candidate)
    )
    return replace(paired, reference=reference_ms, candidate=candidate_ms), compiled


def compiled_layer_ms(module: nn.Module, inputs: torch.Tensor, *, threads: int | None, **timing: Any) -> float:
    """``module`` compiled alone in its faster mode (:func:`compile_fastest`) and timed on ``inputs``: its median ms
    (``timing``: as :func:`~ranksearch.measure.timing.time_repeatedly` takes it)."""
    (compiled,) = compile_fastest([module], inputs, threads=threads).modules
    return measure_latency(compiled, inputs, threads=threads, **timing).median_ms


def compiled_pair_timing(
    reference: nn.Module,
    model: nn.Module,
    example: torch.Tensor,
    *,
    threads: int | None,
    rounds: int,
    target_seconds: float,
) -> tuple[PairedLatency, dict[str, float]]:
    """:func:`compiled_speedup` with what a trial records of it: the graph breaks of both models
    (``compile_graph_breaks``) and whether each ran frozen (``compile_frozen``, ``compile_frozen_reference``)."""
    paired, compiled = compiled_speedup(
        reference, model, example, threads=threads, rounds=rounds, target_seconds=target_seconds
    )
    dense, candidate = compiled.modules
    return paired, {
        "compile_graph_breaks": float(compiled.graph_breaks),
        "compile_frozen_reference": float(dense.frozen),
        "compile_frozen": float(candidate.frozen),
    }
