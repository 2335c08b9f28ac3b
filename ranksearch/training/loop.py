"""What the training and evaluation loops share: the fast paths (channels-last weights, CPU conv gradients, mixed
precision on a GPU), moving batches, cycling a loader, divergence."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ranksearch.training.conv_grad import CpuConvGrads

__all__ = [
    "GPU_TRAINING",
    "DivergedError",
    "GpuTraining",
    "channels_last",
    "check_finite",
    "cycle",
    "fast_training",
    "mixed_precision",
    "to_device",
]


@dataclass(kw_only=True)
class GpuTraining:
    """How training runs on a GPU (CUDA): bf16 autocast where the GPU has bf16, channels-last weights and inputs."""

    bf16: bool = True
    channels_last: bool = True


GPU_TRAINING = GpuTraining()
"""The settings in force (``benchmarks/gpu_check.py`` measures each against float32, contiguous)."""


class DivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


@contextlib.contextmanager
def channels_last(model: nn.Module, device: torch.device) -> Iterator[None]:
    """On CPU, hold 4-D weights channels-last (oneDNN runs ResNet-18 ~1.8x faster so), on CUDA too with
    :attr:`GpuTraining.channels_last`, and restore them on exit."""
    if not (device.type == "cpu" or (device.type == "cuda" and GPU_TRAINING.channels_last)):
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def fast_training(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Channels-last weights (:func:`channels_last`); on CPU, :class:`~ranksearch.training.conv_grad.CpuConvGrads`.
    Forward passes go under :func:`mixed_precision`."""
    with channels_last(model, device), CpuConvGrads() if device.type == "cpu" else contextlib.nullcontext():
        yield


def mixed_precision(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on a CUDA device that has bf16 (with :attr:`GpuTraining.bf16`), else nothing: float32. Wrap
    the forward pass and the loss, not the backward pass; bf16 needs no gradient scaling."""
    if device.type == "cuda" and GPU_TRAINING.bf16 and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``images`` on ``device`` (asynchronously from pinned memory), channels-last on CUDA with
    :attr:`GpuTraining.channels_last`."""
    device = torch.device(device)
    if device.type == "cuda" and GPU_TRAINING.channels_last and images.dim() == 4:
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device, non_blocking=True)


def cycle(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches, again and again; a loader with no batches is a ``ValueError``."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data loader yields no batches")


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Raise :class:`DivergedError` naming ``where`` when ``loss`` is NaN or infinite."""
    if not torch.isfinite(loss):
        raise DivergedError(f"{where}: loss is {loss.item()}; lower the learning rate")
