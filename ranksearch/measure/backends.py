"""Latency backends: where a search measures latency, one class each, registered by name (``--latency-backend``).

A backend times a config's model beside the dense model in alternating rounds (:meth:`LatencyBackend.time_beside`)
and gives the per-layer latency table a timer of the same target (:meth:`LatencyBackend.layer_timer`); what it can
time (a CPU only, int8 layers or not, a remote target) is declared on the class, so settings, spaces and reports ask
the backend instead of comparing names. The module imports without torch (reports name the target); each backend
imports what it runs when it runs. A new target is one class::

    @register_latency_backend
    class MyBackend(LatencyBackend):
        name = "mine"
        title = "my runtime"

        def time_beside(self, reference, model, example, *, rounds, target_seconds, float_model=None): ...

        def layer_timer(self): ...
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, NamedTuple, TypeVar

from ranksearch.errors import RanksearchError, TrialFailure
from ranksearch.util import require_modules

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ranksearch.measure.remote import RemoteTarget
    from ranksearch.measure.timers import ModuleTimer
    from ranksearch.measure.timing import PairedLatency

__all__ = [
    "LatencyBackend",
    "PairTiming",
    "latency_backend",
    "latency_backend_title",
    "list_latency_backends",
    "register_latency_backend",
    "target_note",
]


class PairTiming(NamedTuple):
    """A model timed beside the dense model, and what the backend records about it (e.g. graph breaks)."""

    paired: PairedLatency
    extra: dict[str, float]


class LatencyBackend(ABC):
    """Times models where the search's latency is measured, on ``device`` with ``threads`` threads (``target``: a
    remote device, for a backend that can time there)."""

    name: ClassVar[str]
    """The ``--latency-backend`` value."""
    title: ClassVar[str]
    """The target in words, on plots and in reports."""
    cpu_only: ClassVar[bool] = False
    """Times on a CPU only (a GPU latency device is refused)."""
    remote: ClassVar[bool] = False
    """Can time on a remote target (``--target``)."""
    int8_refused: ClassVar[str | None] = None
    """Why int8 layers are left out of the space with this backend (None: they are searched)."""
    float_model_for_int8: ClassVar[bool] = False
    """Checks a model with int8 layers against the same model before quantization (pass ``float_model``)."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Modules it imports beyond ranksearch's own dependencies."""
    extra: ClassVar[str | None] = None
    """The extra that installs them."""

    def __init__(self, *, device: torch.device, threads: int | None, target: RemoteTarget | None = None) -> None:
        if target is not None and not self.remote:
            raise RanksearchError(f"--latency-backend {self.name} cannot time on a remote target")
        self.device = device
        self.threads = threads
        self.target = target

    @classmethod
    def check_installed(cls) -> None:
        """A one-line error naming the extra to install when a module the backend needs is missing."""
        if cls.requires:
            require_modules(cls.requires, extra=str(cls.extra), what=f"--latency-backend {cls.name}")

    @abstractmethod
    def time_beside(
        self,
        reference: nn.Module,
        model: nn.Module,
        example: torch.Tensor,
        *,
        rounds: int,
        target_seconds: float,
        float_model: nn.Module | None = None,
    ) -> PairTiming:
        """``model`` and the dense ``reference`` (both eval mode, on ``device``) timed in ``rounds`` alternating
        rounds on ``example``; a model this target cannot run is a :class:`TrialFailure` with the reason."""

    @abstractmethod
    def layer_timer(self) -> ModuleTimer:
        """Times single layers as this backend runs them (the per-layer latency table)."""


_Backend = TypeVar("_Backend", bound=type[LatencyBackend])
_REGISTRY: dict[str, type[LatencyBackend]] = {}


def register_latency_backend(cls: _Backend) -> _Backend:
    """Register ``cls`` under its ``name`` (a class decorator)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"a latency backend named {cls.name!r} is registered already")
    _REGISTRY[cls.name] = cls
    return cls


def list_latency_backends() -> list[str]:
    """The registered backends' names, in registration order."""
    return list(_REGISTRY)


def latency_backend(name: str) -> type[LatencyBackend]:
    """The backend registered as ``name``; a one-line error listing the others when there is none."""
    if name not in _REGISTRY:
        names = list_latency_backends()
        raise RanksearchError(f"--latency-backend {name!r} is unknown; choose {', '.join(names[:-1])} or {names[-1]}")
    return _REGISTRY[name]


def latency_backend_title(name: str) -> str:
    """``name``'s target in words (the name itself for a backend not registered here)."""
    return _REGISTRY[name].title if name in _REGISTRY else name


@register_latency_backend
class TorchBackend(LatencyBackend):
    """Eager torch on the latency device (:func:`~ranksearch.measure.latency.measure_speedup`)."""

    name = "torch"
    title = "eager torch"

    def time_beside(
        self,
        reference: nn.Module,
        model: nn.Module,
        example: torch.Tensor,
        *,
        rounds: int,
        target_seconds: float,
        float_model: nn.Module | None = None,
    ) -> PairTiming:
        from ranksearch.measure.latency import measure_speedup

        paired = measure_speedup(
            reference,
            model,
            example,
            device=self.device,
            threads=self.threads,
            rounds=rounds,
            target_seconds=target_seconds,
        )
        return PairTiming(paired, {})

    def layer_timer(self) -> ModuleTimer:
        from ranksearch.measure.timers import TorchTimer

        return TorchTimer(device=self.device, threads=self.threads)


@register_latency_backend
class OnnxRuntimeBackend(LatencyBackend):
    """The models' ONNX exports in ONNX Runtime on this CPU, or on a remote target; records the export's max abs
    error against torch (``onnx_max_abs_error``), the bound it met (``onnx_tolerance``) and whether it met it on its
    distance from the model before quantization (``onnx_checked_against_float``: an int8 export over the tolerance
    against torch's int8 output; :func:`~ranksearch.measure.onnx.export_onnx`)."""

    name = "onnxruntime"
    title = "ONNX Runtime"
    cpu_only = True
    remote = True
    float_model_for_int8 = True
    requires = ("onnxruntime", "onnx")
    extra = "onnx"

    def __init__(self, *, device: torch.device, threads: int | None, target: RemoteTarget | None = None) -> None:
        super().__init__(device=device, threads=threads, target=target)
        self._dense: tuple[nn.Module, tuple[int, ...], bytes] | None = None

    def time_beside(
        self,
        reference: nn.Module,
        model: nn.Module,
        example: torch.Tensor,
        *,
        rounds: int,
        target_seconds: float,
        float_model: nn.Module | None = None,
    ) -> PairTiming:
        from ranksearch.measure.onnx import export_onnx, onnxruntime_speedup

        with tempfile.TemporaryDirectory(prefix="ranksearch-onnx-") as tmp:
            dense = _as_trial_failure(lambda: self._dense_export(reference, example, Path(tmp) / "dense.onnx"))
            exported = _as_trial_failure(
                lambda: export_onnx(model, example, Path(tmp) / "model.onnx", float_model=float_model)
            )
            timing = {"threads": self.threads, "rounds": rounds, "target_seconds": target_seconds}
            if self.target is None:
                paired = _as_trial_failure(lambda: onnxruntime_speedup(dense, exported.path, example, **timing))
            else:  # a model the device cannot run, or a lost target, fails the trial; a refused token stops the run
                pair = (dense.read_bytes(), exported.path.read_bytes())
                paired = self.target.speedup(*pair, example.cpu().numpy(), **timing)
        checked = {
            "onnx_max_abs_error": exported.max_abs_error,
            "onnx_tolerance": exported.tolerance,
            "onnx_checked_against_float": float(exported.against_float),
        }
        return PairTiming(paired, checked)

    def _dense_export(self, reference: nn.Module, example: torch.Tensor, path: Path) -> Path:
        """``reference`` exported (and checked) to ``path``: once per reference module and input shape, as every
        trial of a search times beside the same dense model."""
        from ranksearch.measure.onnx import export_onnx

        shape = tuple(example.shape)
        if self._dense is not None and self._dense[0] is reference and self._dense[1] == shape:
            path.write_bytes(self._dense[2])
            return path
        export_onnx(reference, example, path)
        self._dense = (reference, shape, path.read_bytes())
        return path

    def layer_timer(self) -> ModuleTimer:
        from ranksearch.measure.timers import OnnxRuntimeTimer, RemoteTimer

        if self.target is not None:
            return RemoteTimer(target=self.target, threads=self.threads)
        return OnnxRuntimeTimer(threads=self.threads)


@register_latency_backend
class CompileBackend(LatencyBackend):
    """torch.compile (inductor, CPU), each model in the faster of its modes, weights frozen or not
    (:func:`~ranksearch.measure.compiled.compile_fastest`), compiled and timed in a child process that a fresh one
    replaces every few pairs or layers, trials and the latency table's variants alike
    (:class:`~ranksearch.measure.compile_worker.CompilingProcess`: compiled graphs keep memory); records the graph
    breaks of both models (``compile_graph_breaks``) and whether each ran frozen (``compile_frozen``,
    ``compile_frozen_reference``)."""

    name = "compile"
    title = "torch.compile"
    cpu_only = True
    int8_refused = "torch.ao's quantized layers do not compile (graph breaks); not searched with torch.compile"

    def __init__(self, *, device: torch.device, threads: int | None, target: RemoteTarget | None = None) -> None:
        from ranksearch.measure.compile_worker import CompilingProcess

        super().__init__(device=device, threads=threads, target=target)
        self.process = CompilingProcess()

    def time_beside(
        self,
        reference: nn.Module,
        model: nn.Module,
        example: torch.Tensor,
        *,
        rounds: int,
        target_seconds: float,
        float_model: nn.Module | None = None,
    ) -> PairTiming:
        timing = {"threads": self.threads, "rounds": rounds, "target_seconds": target_seconds}
        paired, extra = _as_trial_failure(lambda: self.process.time_pair(reference, model, example, **timing))
        return PairTiming(paired, extra)

    def layer_timer(self) -> ModuleTimer:
        from ranksearch.measure.timers import CompiledTimer

        return CompiledTimer(threads=self.threads, process=self.process)


_Result = TypeVar("_Result")


COMPUTE_BOUND_PX = 112
"""From this input side on, convolutions' arithmetic dominates CPU latency at batch 1, and ONNX Runtime turned far
more of the MACs a config saves into time saved than eager torch did (0.82 against 0.55 of the MAC reduction at
224 px, median over 5 repeats; docs/latency.md "Which target is the default")."""


def target_note(name: str, *, timing_device: str, input_shape: tuple[int, ...]) -> str | None:
    """A line for a search timed in eager torch on a CPU at an input size where ONNX Runtime rewards factorization
    much better (the default stays eager torch: see :data:`COMPUTE_BOUND_PX`); None otherwise."""
    if name != TorchBackend.name or not timing_device.startswith("cpu") or len(input_shape) < 4:
        return None
    if min(input_shape[-2:]) < COMPUTE_BOUND_PX:
        return None
    try:
        OnnxRuntimeBackend.check_installed()
        install = ""
    except RanksearchError:
        install = f" (pip install 'ranksearch[{OnnxRuntimeBackend.extra}]')"
    side = "x".join(str(size) for size in input_shape[-2:])
    return (
        f"note: latency is timed in eager torch; at {side} px ONNX Runtime turns far more of the MACs saved into "
        f"time saved on a CPU (docs/latency.md); if you deploy through it, pass --latency-backend onnxruntime{install}"
    )


def _as_trial_failure(step: Callable[[], _Result]) -> _Result:
    """``step()``, its one-line error (a model this target cannot export, run or compile) failing the trial only."""
    try:
        return step()
    except RanksearchError as exc:
        raise TrialFailure(str(exc)) from None
