"""Measuring a model without training it: top-1 accuracy, and BatchNorm statistics re-estimated from data."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.data import DataLoader

from ranksearch.training.loop import channels_last, cycle, to_device

__all__ = ["correct_predictions", "evaluate_accuracy", "recalibrate_batchnorm"]


def evaluate_accuracy(
    model: nn.Module, loader: DataLoader, *, device: torch.device | str, max_batches: int | None = None
) -> float:
    """Top-1 accuracy (a fraction) of ``model`` in eval mode over ``loader`` (its first ``max_batches``)."""
    correct = correct_predictions(model, loader, device=device, max_batches=max_batches)
    return correct.sum().item() / max(len(correct), 1)


@torch.no_grad()
def correct_predictions(
    model: nn.Module, loader: DataLoader, *, device: torch.device | str, max_batches: int | None = None
) -> torch.Tensor:
    """Whether ``model`` (in eval mode) classifies each example of ``loader`` (its first ``max_batches``) right, in
    the loader's order (a bool tensor on the CPU): what paired comparisons of two models on the same images need."""
    was_training = model.training
    model.eval()
    hits: list[torch.Tensor] = []
    try:
        with channels_last(model, torch.device(device)):
            for images, labels in itertools.islice(loader, max_batches):
                labels = labels.to(device)
                hits.append((model(to_device(images, device)).argmax(1) == labels).cpu())
    finally:
        model.train(was_training)
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, *, device: torch.device | str, batches: int) -> None:
    """Re-estimate BatchNorm running statistics as a cumulative average over ``batches`` batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    try:
        with channels_last(model, torch.device(device)):
            for images, _ in itertools.islice(cycle(loader), batches):
                model(to_device(images, device))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, mode in modes.items():
            module.training = mode
