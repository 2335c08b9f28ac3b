"""Recovering a compressed model's accuracy: distillation from the dense model by SGD, for a few steps in a search or
for whole epochs after it (with a warm-up)."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ranksearch.training.loop import (
    DivergedError,
    channels_last,
    check_finite,
    cycle,
    fast_training,
    mixed_precision,
    to_device,
)

__all__ = ["EXPLODED", "distillation_loss", "finetune", "warmup_cosine"]

EXPLODED = 100.0
"""A fine-tune diverged when its loss exceeds this many times max(first loss, 1)."""


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """``alpha`` * T² * KL(teacher || student) on logits softened by T, plus (1 - ``alpha``) * cross-entropy."""
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * kl + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device | str,
    steps: int,
    lr: float,
    temperature: float = 4.0,
    alpha: float = 0.9,
    warmup_steps: int = 0,
    teacher_cache: dict[bytes, torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | int]:
    """Distil ``teacher`` into ``student`` for ``steps`` SGD steps (momentum 0.9, Nesterov): the learning rate rises
    linearly to ``lr`` over the first ``warmup_steps``, then decays to 0 along a cosine (:func:`warmup_cosine`).

    ``teacher_cache`` keeps the teacher's logits per batch (keyed by a digest of the images): pass the same dict to
    every fine-tune from one teacher over a seeded loader, and on CPU each batch's teacher pass runs once (on a GPU
    the teacher pass costs less than hashing the batch, so nothing is cached there). Forward passes on a GPU run in
    bf16 (:func:`~ranksearch.training.loop.mixed_precision`). ``progress(done, steps)`` is called after each step.
    Returns ``{"loss": mean loss of the last 10 steps, "steps": steps}``; raises :class:`DivergedError` as soon as the
    loss is NaN or infinite, or above ``EXPLODED`` x max(first loss, 1).
    """
    device = torch.device(device)
    student.to(device)
    teacher.to(device)
    teacher_mode = teacher.training
    teacher.eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True)
    if warmup_steps > 0:
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, steps=steps, warmup=warmup_steps)
        )
    else:  # the search's schedule, kept as it was so that a seeded study's trials come out the same
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    recent: list[torch.Tensor] = []
    student.train()
    try:
        with fast_training(student, device), channels_last(teacher, device):
            for step, (images, labels) in enumerate(itertools.islice(cycle(loader), steps), start=1):
                key = _batch_digest(images) if teacher_cache is not None and device.type == "cpu" else None
                images, labels = to_device(images, device), labels.to(device)
                teacher_logits = None if key is None else teacher_cache.get(key)
                with mixed_precision(device):
                    if teacher_logits is None:
                        with torch.no_grad():
                            teacher_logits = teacher(images).float()
                        if key is not None:
                            teacher_cache[key] = teacher_logits
                    logits = student(images)
                    loss = distillation_loss(logits, teacher_logits, labels, temperature=temperature, alpha=alpha)
                check_finite(loss, f"distillation fine-tuning at step {step}")
                if step == 1:
                    limit = EXPLODED * loss.detach().clamp_min(1.0)
                elif loss > limit:
                    raise DivergedError(
                        f"distillation fine-tuning at step {step}: loss {loss.item():.3g} exploded past "
                        f"{limit.item():.3g}; lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                recent = [*recent[-9:], loss.detach()]
                if progress is not None:
                    progress(step, steps)
    finally:
        teacher.train(teacher_mode)
    return {"loss": torch.stack(recent).mean().item() if recent else math.nan, "steps": steps}


def warmup_cosine(step: int, *, steps: int, warmup: int) -> float:
    """The learning-rate factor of step ``step`` (from 0) of ``steps``: linear from 1/``warmup`` to 1 over the first
    ``warmup`` steps, then a cosine from 1 down to 0 at step ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def _batch_digest(images: torch.Tensor) -> bytes:
    return hashlib.blake2b(images.contiguous().numpy().tobytes(), digest_size=16).digest()
