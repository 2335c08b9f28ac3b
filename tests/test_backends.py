"""Every registered latency backend times a model beside the dense model and gives the latency table a timer of the
same target; the registry looks backends up and lists them, and settings ask the backend what it can time."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import convnet
from torch import nn

from ranksearch.errors import RanksearchError, TrialFailure
from ranksearch.measure.backends import (
    LatencyBackend,
    latency_backend,
    latency_backend_title,
    list_latency_backends,
    register_latency_backend,
    target_note,
)
from ranksearch.measure.remote import RemoteTarget
from ranksearch.study.settings import RunSettings

CPU = torch.device("cpu")


@torch.library.custom_op("ranksearch_test::device_kernel", mutates_args=())
def device_kernel(x: torch.Tensor) -> torch.Tensor:
    """A custom kernel: eager torch runs it; ONNX knows no such operator; its shape function fails under compile."""
    return x.clone()


@device_kernel.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("no shape function for this kernel")


class CustomKernel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return device_kernel(x).mean(dim=(2, 3))


@pytest.mark.parametrize("name", list_latency_backends())
def test_backend_times_a_pair_and_its_layers(name: str) -> None:
    """A 64-channel net beside an 8-channel one (64x fewer MACs in the middle conv) measures faster, in rounds; the
    backend's layer timer times a layer, and names its target in its cache slug."""
    backend = latency_backend(name)(device=CPU, threads=1)
    example = torch.randn(1, 3, 32, 32)
    timed = backend.time_beside(convnet(64), convnet(8), example, rounds=4, target_seconds=0.4)
    paired = timed.paired
    assert len(paired.ratios) == 4 and paired.speedup_low <= paired.speedup <= paired.speedup_high
    assert paired.speedup > 1, paired
    assert all(isinstance(value, float) for value in timed.extra.values())
    timer = backend.layer_timer()
    assert timer.median_ms(nn.Conv2d(3, 8, 3), example, target_seconds=0.05, max_attempts=1) > 0
    assert timer.slug()
    assert latency_backend_title(name) == backend.title != name or name == "torch"


@pytest.mark.parametrize("name", [n for n in list_latency_backends() if latency_backend(n).cpu_only])
def test_a_cpu_only_backend_refuses_a_gpu_latency_device(name: str) -> None:
    with pytest.raises(RanksearchError, match=f"--latency-backend {name} times on CPU, not --latency-device cuda"):
        RunSettings.of(latency_device="cuda", latency_backend=name).validate()


@pytest.mark.parametrize("name", [n for n in list_latency_backends() if not latency_backend(n).remote])
def test_a_local_backend_refuses_a_remote_target(name: str) -> None:
    with pytest.raises(RanksearchError, match=f"--latency-backend {name} cannot time on a remote target"):
        latency_backend(name)(device=CPU, threads=1, target=RemoteTarget.from_url("http://127.0.0.1:9"))
    with pytest.raises(RanksearchError, match="pass --latency-backend onnxruntime, or leave it out"):
        RunSettings.of(latency_backend=name, target="http://127.0.0.1:9").validate()


@pytest.mark.parametrize("name", ["onnxruntime", "compile"])
def test_a_model_the_target_cannot_run_fails_the_trial(name: str) -> None:
    """An export or a compile that fails is this trial's failure (the search goes on), not the run's."""
    backend = latency_backend(name)(device=CPU, threads=1)
    with pytest.raises(TrialFailure):
        backend.time_beside(convnet(8), CustomKernel(), torch.randn(1, 3, 8, 8), rounds=1, target_seconds=0.05)


def test_onnxruntime_exports_the_dense_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every trial is timed beside the same dense model: it is exported and checked once, and again only for another
    reference or input shape."""
    from ranksearch.measure import onnx

    exported: list[nn.Module] = []
    real = onnx.export_onnx

    def counted(model: nn.Module, *args: object, **kwargs: object) -> object:
        exported.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx, "export_onnx", counted)
    backend = latency_backend("onnxruntime")(device=CPU, threads=1)
    dense, example = convnet(16), torch.randn(1, 3, 16, 16)
    for width in (8, 4):
        backend.time_beside(dense, convnet(width), example, rounds=1, target_seconds=0.05)
    assert exported.count(dense) == 1 and len(exported) == 3
    backend.time_beside(dense, convnet(4), torch.randn(2, 3, 16, 16), rounds=1, target_seconds=0.05)
    assert exported.count(dense) == 2


def test_registry_looks_up_lists_and_refuses_a_second_name() -> None:
    assert list_latency_backends()[:3] == ["torch", "onnxruntime", "compile"]
    with pytest.raises(RanksearchError, match="--latency-backend 'tvm' is unknown; choose torch, onnxruntime or"):
        latency_backend("tvm")
    assert latency_backend_title("tvm") == "tvm"  # a study written by a backend not installed here still reports

    class Again(LatencyBackend):
        name = "torch"
        title = "again"

    with pytest.raises(ValueError, match="'torch' is registered already"):
        register_latency_backend(Again)


def test_a_missing_module_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "onnxruntime" else object())
    with pytest.raises(RanksearchError, match="needs onnxruntime, not installed; install the extra: pip"):
        latency_backend("onnxruntime").check_installed()


def test_the_registry_imports_without_torch() -> None:
    """Reports name a study's target: they import the registry, and must not pay for importing torch."""
    import subprocess

    code = "import sys, ranksearch.measure.backends as b; print(b.list_latency_backends(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['torch', 'onnxruntime', 'compile'] False"


@pytest.mark.parametrize(
    ("name", "device", "shape", "noted"),
    [
        ("torch", "cpu", (1, 3, 224, 224), True),
        ("torch", "cpu", (1, 3, 112, 160), True),
        ("torch", "cpu", (1, 1, 28, 28), False),
        ("torch", "cuda", (1, 3, 224, 224), False),
        ("onnxruntime", "cpu", (1, 3, 224, 224), False),
        ("compile", "cpu", (1, 3, 224, 224), False),
    ],
)
def test_target_note_only_for_eager_cpu_timing_of_large_inputs(
    name: str, device: str, shape: tuple[int, ...], noted: bool
) -> None:
    note = target_note(name, timing_device=device, input_shape=shape)
    assert (note is not None) == noted
    if note is not None:
        assert "--latency-backend onnxruntime" in note and f"{shape[2]}x{shape[3]} px" in note
        assert "\n" not in note
