"""One module timed on one input where the search's latency is measured: in torch, in ONNX Runtime here, or on a
remote target. The per-layer latency table times every layer variant with one of these, so that its predictions
are of the target the trials are timed on."""

from __future__ import annotations

import platform
import urllib.parse
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from ranksearch.measure.latency import measure_latency
from ranksearch.measure.remote import RemoteTarget


class ModuleTimer(ABC):
    """Times a module as the search's latency target runs it."""

    @abstractmethod
    def median_ms(self, module: nn.Module, inputs: torch.Tensor, **timing: Any) -> float:
        """The median latency of ``module`` (eval mode) on ``inputs``; ``timing`` as
        :func:`~ranksearch.measure.timing.time_repeatedly` takes it (warm-up, runs, target seconds, attempts)."""

    @abstractmethod
    def slug(self) -> str:
        """What defines the timings besides the layers (the target, its threads and versions): names a cache file."""


class TorchTimer(ModuleTimer):
    """Eager torch on ``device`` (:func:`~ranksearch.measure.latency.measure_latency`)."""

    def __init__(self, *, device: torch.device, threads: int | None) -> None:
        self.device = device
        self.threads = threads

    def median_ms(self, module: nn.Module, inputs: torch.Tensor, **timing: Any) -> float:
        module, inputs = module.to(self.device), inputs.to(self.device)
        return measure_latency(module, inputs, device=self.device, threads=self.threads, **timing).median_ms

    def slug(self) -> str:
        device = self.device
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return f"{where}-threads{self.threads or torch.get_num_threads()}-torch{torch.__version__}"


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
        return f"onnxruntime{onnxruntime.__version__}-{platform.machine()}-threads{threads}-torch{torch.__version__}"


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
