"""One module timed on one input where the search's latency is measured: in eager torch, compiled by torch.compile,
in ONNX Runtime here, or on a remote target. The per-layer latency table times every layer variant with one of these,
so that its predictions are of the target the trials are timed on; a timer that can also time layers inside the whole
model (:class:`InModelTiming`: eager torch) gives the table the times the layers take there."""

from __future__ import annotations

import platform
import statistics
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ranksearch.errors import RanksearchError
from ranksearch.measure.latency import measure_latency, torch_threads
from ranksearch.measure.remote import RemoteTarget

if TYPE_CHECKING:
    from ranksearch.measure.compile_worker import CompilingProcess


@cache
def cpu_name() -> str:
    """This machine's processor model, as latency tables' file names give it: :func:`processor_name` of Linux's
    ``/proc/cpuinfo``, else :func:`platform.processor`, else the architecture."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    return processor_name(cpuinfo) or _plain_name(platform.processor() or platform.machine()) or "unknown"


def processor_name(cpuinfo: str) -> str:
    """The first processor's model name in ``cpuinfo`` (``/proc/cpuinfo``'s text), trademarks and clock left out,
    with the x86 family and model numbers where it gives them: hosts of one cloud instance type differ (an AVX2 AMD,
    an AVX-512 Intel), virtual machines often name only the vendor's line ("AMD EPYC" for several generations), and a
    table timed on one predicts another badly. Empty without a model name."""
    first: dict[str, str] = {}
    for key, _, value in (line.partition(":") for line in cpuinfo.splitlines()):
        first.setdefault(key.strip(), value.strip())
    name = _plain_name(first.get("model name", ""))
    if name and first.get("cpu family", "").isdigit() and first.get("model", "").isdigit():
        name += f" family {first['cpu family']} model {first['model']}"
    return name


def _plain_name(name: str) -> str:
    """A processor's name with its trademarks and clock left out."""
    for mark in ("(R)", "(TM)", "(tm)", " CPU", " Processor"):
        name = name.replace(mark, "")
    return " ".join(name.split("@")[0].split())


class ModuleTimer(ABC):
    """Times a module as the search's latency target runs it."""

    @abstractmethod
    def median_ms(self, module: nn.Module, inputs: torch.Tensor, **timing: Any) -> float:
        """The median latency of ``module`` (eval mode) on ``inputs``; ``timing`` as
        :func:`~ranksearch.measure.timing.time_repeatedly` takes it (warm-up, runs, target seconds, attempts)."""

    @abstractmethod
    def slug(self) -> str:
        """What defines the timings besides the layers (the target, its threads and versions): names a cache file."""


class InModelTiming(ABC):
    """A timer that also times layers where they run: inside the whole model, after the layers before them.

    A layer timed alone runs with its weights and buffers hot in the caches; inside the model, the layers before it
    have evicted them. The difference is small for float convolutions and large for int8 ones (measured on a 28 px
    ResNet-18, 2 threads: an int8 3x3 conv took 69 us alone and 290 us inside the model, the float conv 200 us in
    both), so a table of isolated timings predicted configs with int8 layers 15-20 % too fast.
    """

    @abstractmethod
    def layers_in_models_ms(
        self, models: Sequence[nn.Module], inputs: torch.Tensor, layers: Sequence[str], *, runs: int, warmup: int
    ) -> list[dict[str, float]]:
        """Per model, the median ms of each named layer's forward inside it; the models run in alternation on
        ``inputs`` (``warmup`` untimed passes, then ``runs`` timed ones each), so a drifting machine hits all alike."""


class TorchTimer(ModuleTimer, InModelTiming):
    """Eager torch on ``device`` (:func:`~ranksearch.measure.latency.measure_latency`); layers also inside the model."""

    def __init__(self, *, device: torch.device, threads: int | None) -> None:
        self.device = device
        self.threads = threads

    def median_ms(self, module: nn.Module, inputs: torch.Tensor, **timing: Any) -> float:
        module, inputs = module.to(self.device), inputs.to(self.device)
        return measure_latency(module, inputs, device=self.device, threads=self.threads, **timing).median_ms

    def layers_in_models_ms(
        self, models: Sequence[nn.Module], inputs: torch.Tensor, layers: Sequence[str], *, runs: int, warmup: int
    ) -> list[dict[str, float]]:
        inputs = inputs.to(self.device)
        watches = [{name: _Stopwatch(name, model, self.device) for name in layers} for model in models]
        modes = [{module: module.training for module in model.modules()} for model in models]
        try:
            with torch_threads(self.threads), torch.inference_mode():
                for model in models:
                    model.to(self.device).eval()
                for run in range(warmup + runs):
                    for model, watch in zip(models, watches):
                        model(inputs)
                        for stopwatch in watch.values():
                            stopwatch.collect(keep=run >= warmup)
        finally:
            for watch in watches:
                for stopwatch in watch.values():
                    stopwatch.remove()
            for mode in modes:
                for module, training in mode.items():
                    module.training = training
        return [{name: stopwatch.median_ms() for name, stopwatch in watch.items()} for watch in watches]

    def slug(self) -> str:
        device = self.device
        if device.type == "cuda":
            where = torch.cuda.get_device_name(device)
        else:
            where = f"cpu-{cpu_name()}" if device.type == "cpu" else device.type
        return f"{where}-threads{self.threads or torch.get_num_threads()}-torch{torch.__version__}"


class _Stopwatch:
    """Times a module's forward calls by hooks: the wall clock on CPU (after a synchronisation on MPS), CUDA events on
    a GPU (read after the pass, so the layers still queue as they would)."""

    def __init__(self, name: str, model: nn.Module, device: torch.device) -> None:
        self.name = name
        module = model.get_submodule(name)
        self.device = device
        self.samples: list[float] = []
        self._pending: list[tuple[Any, Any]] = []
        self._start: Any = None
        self._handles: list[RemovableHandle] = [
            module.register_forward_pre_hook(self._begin),
            module.register_forward_hook(self._end),
        ]

    def _now(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        if self.device.type == "mps":
            torch.mps.synchronize()
        return time.perf_counter_ns()

    def _begin(self, _module: nn.Module, _args: Any) -> None:
        self._start = self._now()

    def _end(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self._pending.append((self._start, self._now()))

    def collect(self, *, keep: bool) -> None:
        """Turn the calls since the last collection into samples (``keep``), or drop them (a warm-up pass)."""
        if keep and self._pending:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                self.samples += [start.elapsed_time(end) for start, end in self._pending]
            else:
                self.samples += [(end - start) / 1e6 for start, end in self._pending]
        self._pending.clear()

    def median_ms(self) -> float:
        if not self.samples:
            raise RanksearchError(
                f"layer {self.name!r} never runs in the model's forward pass; leave it out of the search"
            )
        return statistics.median(self.samples)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class OnnxRuntimeTimer(ModuleTimer):
    """The module's ONNX export in ONNX Runtime on this CPU, as ``--latency-backend onnxruntime`` times trials."""

    def __init__(self, *, threads: int | None) -> None:
        self.threads = threads

    def median_ms(self, module: nn.Module, inputs: torch.Tensor, **timing: Any) -> float:
        from ranksearch.measure.onnx import onnx_bytes, onnxruntime_timer

        return onnxruntime_timer(onnx_bytes(module, inputs), inputs, threads=self.threads)(**timing).median_ms

    def slug(self) -> str:
        import onnxruntime

        threads = self.threads or torch.get_num_threads()
        return f"onnxruntime{onnxruntime.__version__}-{cpu_name()}-threads{threads}-torch{torch.__version__}"


class CompiledTimer(ModuleTimer):
    """The module compiled by torch.compile (inductor, in the faster of its modes: weights frozen or not) on this CPU,
    as ``--latency-backend compile`` times trials (:func:`~ranksearch.measure.compiled.compile_fastest`): each module
    compiles twice, about 0.5 s for a layer of a 28 px ResNet-18, in ``process``'s child process, where the memory
    the compiled graphs keep goes when a fresh child replaces it."""

    def __init__(self, *, threads: int | None, process: CompilingProcess) -> None:
        self.threads = threads
        self.process = process

    def median_ms(self, module: nn.Module, inputs: torch.Tensor, **timing: Any) -> float:
        return self.process.time_layer(module, inputs, threads=self.threads, **timing)

    def slug(self) -> str:
        threads = self.threads or torch.get_num_threads()
        return f"compile-inductor-{cpu_name()}-threads{threads}-torch{torch.__version__}"


class RemoteTimer(ModuleTimer):
    """The module's ONNX export timed on a remote target (``--target``)."""

    def __init__(self, *, target: RemoteTarget, threads: int | None) -> None:
        self.target = target
        self.threads = threads

    def median_ms(self, module: nn.Module, inputs: torch.Tensor, **timing: Any) -> float:
        from ranksearch.measure.onnx import onnx_bytes

        model = onnx_bytes(module, inputs)
        return self.target.latency(model, inputs.cpu().numpy(), threads=self.threads, **timing).median_ms

    def slug(self) -> str:
        info = self.target.described()
        where = urllib.parse.urlsplit(self.target.url).netloc
        threads = self.threads or info["threads"]
        return f"remote-{where}-{info['machine']}-{info['runtime']}-threads{threads}-torch{torch.__version__}"
