"""Recovering a compressed model's accuracy: distillation from the dense model by SGD, for a few steps in a search or
for whole epochs after it (with a warm-up)."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

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
from ranksearch.util import memory_limit_bytes

__all__ = [
    "EXPLODED",
    "TeacherCache",
    "distillation_loss",
    "feature_loss",
    "finetune",
    "stage_names",
    "warmup_cosine",
]

EXPLODED = 100.0
"""A fine-tune diverged when its loss exceeds this many times max(first loss, 1)."""


class TeacherCache:
    """The teacher's outputs per training batch: its logits and, where features are matched, its stage outputs, keyed
    by a digest of the images and the stage names. Fine-tunes from one teacher over a seeded loader see the same
    batches, so with one cache shared by them each batch's teacher pass runs once.

    It holds at most ``max_bytes`` of tensors (default: a quarter of the memory this process may use, at most 4 GiB);
    the batches past that are not kept, and their teacher pass runs every time. The stage outputs are kept in bf16
    (:func:`finetune` matches the student's to them so, cached or not): three epochs of ResNet-18's block outputs at
    28x28 take 2.2 GB.
    """

    def __init__(self, *, max_bytes: int | None = None) -> None:
        self.max_bytes = _default_cache_bytes() if max_bytes is None else max_bytes
        self.bytes = 0
        self._entries: dict[tuple[bytes, tuple[str, ...]], tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, images: bytes, stages: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The logits and stage outputs kept for the batch of digest ``images`` with ``stages``, or None."""
        return self._entries.get((images, stages))

    def put(
        self, images: bytes, stages: tuple[str, ...], logits: torch.Tensor, features: Mapping[str, torch.Tensor]
    ) -> None:
        """Keep ``logits`` and ``features`` (the outputs of ``stages``) for the batch of digest ``images``, if they
        fit."""
        size = logits.untyped_storage().nbytes() + sum(
            tensor.untyped_storage().nbytes() for tensor in features.values()
        )
        if self.bytes + size <= self.max_bytes:
            self._entries[(images, stages)] = (logits, dict(features))
            self.bytes += size


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


def feature_loss(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The sum over the modules named in ``teacher`` of the mean squared difference of the student's output from the
    teacher's, each divided by the teacher output's mean square (so that every stage weighs alike, whatever its
    scale)."""
    terms = [
        F.mse_loss(student[name].float(), target.float()) / target.float().pow(2).mean().clamp_min(1e-12)
        for name, target in teacher.items()
        if name in student
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def stage_names(model: nn.Module) -> tuple[str, ...]:
    """The blocks whose outputs a feature-matching fine-tune compares with the dense model's: ``model``'s top-level
    children made of modules themselves, but the one that gives the output (the last child that holds parameters).
    For a ResNet: ``layer1`` to ``layer4``; for a MobileNet or a VGG: ``features``. Neither a bare layer (a
    compressed convolution's raw output, before its BatchNorm) nor the output is matched: either made fine-tunes of
    a small CNN diverge (docs/search.md, "Matching the dense model's features")."""
    children = list(model.named_children())
    output = next((name for name, child in reversed(children) if next(child.parameters(), None) is not None), None)
    return tuple(name for name, child in children if name != output and next(child.children(), None) is not None)


@contextmanager
def _outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The latest output of each module named in ``names`` (those that return a tensor), by name, while the context
    is open."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                outputs[name] = output

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


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
    stages: Sequence[str] = (),
    feature_weight: float = 0.0,
    teacher_cache: TeacherCache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | int]:
    """Distil ``teacher`` into ``student`` for ``steps`` SGD steps (momentum 0.9, Nesterov): the learning rate rises
    linearly to ``lr`` over the first ``warmup_steps``, then decays to 0 along a cosine (:func:`warmup_cosine`).

    With ``stages`` (module names, e.g. from :func:`stage_names`) and a positive ``feature_weight``, the loss adds
    ``feature_weight`` x :func:`feature_loss` of those modules' outputs: the student learns to reproduce the
    teacher's intermediate features, not only its logits (FitNets' hints). The teacher's are rounded to bf16 (a
    relative 0.4 % at most), as a GPU's bf16 forward pass gives them, so that a cache holds twice as many.

    ``teacher_cache`` keeps the teacher's outputs per batch: pass the same :class:`TeacherCache` to every fine-tune
    from one teacher over a seeded loader, and on CPU each batch's teacher pass runs once (on a GPU the teacher pass
    costs less than hashing the batch, so nothing is cached there). Forward passes on a GPU run in bf16
    (:func:`~ranksearch.training.loop.mixed_precision`). ``progress(done, steps)`` is called after each step.
    Returns ``{"loss": mean loss of the last 10 steps, "steps": steps}``; raises :class:`DivergedError` as soon as the
    loss is NaN or infinite, or above ``EXPLODED`` x max(first loss, 1).
    """
    device = torch.device(device)
    student.to(device)
    teacher.to(device)
    teacher_mode = teacher.training
    teacher.eval()
    stages = tuple(stages) if feature_weight > 0 else ()
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
        with (
            fast_training(student, device),
            channels_last(teacher, device),
            _outputs(student, stages) as student_features,
            _outputs(teacher, stages) as teacher_features,
        ):
            for step, (images, labels) in enumerate(itertools.islice(cycle(loader), steps), start=1):
                key = _batch_digest(images) if teacher_cache is not None and device.type == "cpu" else None
                images, labels = to_device(images, device), labels.to(device)
                cached = None if key is None else teacher_cache.get(key, stages)
                with mixed_precision(device):
                    if cached is None:
                        with torch.no_grad():
                            teacher_logits = teacher(images).float()
                        # in the order the hooks ran; bf16, as the forward pass gives them on a GPU: half the
                        # cache, and a cached batch's targets are the uncached batch's
                        targets = {name: output.to(torch.bfloat16) for name, output in teacher_features.items()}
                        if key is not None:
                            teacher_cache.put(key, stages, teacher_logits, targets)
                    else:
                        teacher_logits, targets = cached
                    logits = student(images)
                    loss = distillation_loss(logits, teacher_logits, labels, temperature=temperature, alpha=alpha)
                    if stages:
                        loss = loss + feature_weight * feature_loss(student_features, targets)
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


def _default_cache_bytes() -> int:
    """A quarter of the memory this process may use (:func:`~ranksearch.util.memory_limit_bytes`), at most 4 GiB;
    1 GiB where it cannot be read."""
    limit = memory_limit_bytes()
    return min(limit // 4, 4 << 30) if limit is not None else 1 << 30


def _batch_digest(images: torch.Tensor) -> bytes:
    return hashlib.blake2b(images.contiguous().numpy().tobytes(), digest_size=16).digest()
