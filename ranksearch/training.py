"""Training building blocks: cached baseline training, accuracy, BatchNorm recalibration, distillation fine-tuning.

Everything runs on the given device (CPU or CUDA). On CPU, weights are held channels-last while
training and evaluating, and convolution weight gradients of tiny feature maps (at most 2x2 outputs,
or single-channel inputs) are computed as one matrix product, because oneDNN's kernels for those
shapes are up to 20x slower than the forward pass (measured on a 2-core AVX2 CPU; see
:class:`CpuConvGrads`). Together these train ResNet-18 at 28x28 3.4x faster per thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from ranksearch.data import DataSplits, TensorImageDataset, make_loader
from ranksearch.regularize import NuclearNormPenalty
from ranksearch.util import atomic_open

__all__ = [
    "DEFAULT_RECIPE",
    "CpuConvGrads",
    "DivergedError",
    "Recipe",
    "distillation_loss",
    "evaluate_accuracy",
    "finetune",
    "recalibrate_batchnorm",
    "train_baseline",
]

CACHE_FORMAT = 1
EXPLODED = 100.0
NUCLEAR_NORM_EVERY = 8


class DivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class Recipe:
    """How to train a baseline model from scratch.

    ``schedule`` "onecycle" warms up linearly over ``warmup_fraction`` of the steps to ``lr`` then
    anneals (cosine) to ~0; "cosine" starts at ``lr`` and anneals to 0. ``optimizer`` "sgd" uses
    Nesterov momentum ``momentum``; "adamw" uses (``momentum``, 0.999) betas. ``augment`` applies the
    dataset's random crops/flips (they slow convergence in a schedule of a few epochs).
    ``nuclear_norm`` > 0 adds :class:`ranksearch.regularize.NuclearNormPenalty` of that strength to the
    loss (computed every ``NUCLEAR_NORM_EVERY`` steps), to train a baseline whose factorizations lose
    less accuracy.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    warmup_fraction: float = 0.2
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    augment: bool = False
    nuclear_norm: float = 0.0
    seed: int = 0

    def key(self) -> str:
        """A stable 16-hex-digit hash of all fields, for cache keys (``nuclear_norm`` only when used, so
        recipes from before it keep their keys)."""
        fields = asdict(self)
        if not self.nuclear_norm:
            del fields["nuclear_norm"]
        return _digest(fields)


DEFAULT_RECIPE = Recipe()
"""ResNet-18 on Fashion-MNIST: see benchmarks/baseline_recipe.py for its measured accuracy and time."""


def train_baseline(
    model: nn.Module,
    splits: DataSplits,
    recipe: Recipe,
    *,
    device: torch.device | str,
    cache_dir: Path,
    key_parts: Mapping[str, Any],
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` on ``splits.train`` with ``recipe``, or load the cached result of an identical run.

    Entries live in ``cache_dir`` keyed by ``key_parts`` (e.g. model and dataset) plus the recipe key;
    they are written atomically, and an unreadable or mismatching entry is retrained. Returns the model
    (eval mode, on ``device``) and metadata: val/test accuracy, train time, recipe, and whether it
    came from the cache ("cached") and the entry's path ("path", loadable with ``ranksearch.models.load_checkpoint``).
    """
    device = torch.device(device)
    parts = {**{k: str(v) for k, v in key_parts.items()}, "recipe": recipe.key()}
    entry = Path(cache_dir) / f"baseline-{_digest(parts)}.pt"
    meta = _load_entry(model, entry)
    if meta is not None:
        return model.to(device).eval(), {**meta, "cached": True, "path": str(entry)}

    torch.manual_seed(recipe.seed)
    model.to(device)
    train = splits.train
    if isinstance(train, TensorImageDataset) and train.augment != recipe.augment:
        train = train.subset(torch.arange(len(train)), augment=recipe.augment)
    loader = make_loader(train, batch_size=recipe.batch_size, shuffle=True, seed=recipe.seed)
    steps = recipe.epochs * len(loader)
    optimizer = _optimizer(model, recipe)
    scheduler = _scheduler(optimizer, recipe, steps)
    penalty = (
        NuclearNormPenalty(model, strength=recipe.nuclear_norm, every=NUCLEAR_NORM_EVERY)
        if recipe.nuclear_norm
        else None
    )
    history = []
    started = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task("baseline", total=steps, status="")
        for epoch in range(1, recipe.epochs + 1):
            model.train()
            total, count = torch.zeros((), device=device), 0
            with _fast_training(model, device):
                for images, labels in loader:
                    images, labels = _to(images, device), labels.to(device)
                    loss = F.cross_entropy(model(images), labels, label_smoothing=recipe.label_smoothing)
                    if penalty is not None:
                        loss = loss + penalty()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    total += loss.detach()
                    count += 1
                    if count % 20 == 0 or count == len(loader):
                        _check_finite(total / count, f"baseline training at epoch {epoch}")
                        status = f"epoch {epoch}/{recipe.epochs} loss {total.item() / count:.3f}"
                        bar.update(task, completed=(epoch - 1) * len(loader) + count, status=status)
            val = evaluate_accuracy(model, _eval_loader(splits.val, recipe), device=device)
            history.append({"epoch": epoch, "loss": total.item() / count, "val_accuracy": val})
            if progress:
                bar.console.log(f"epoch {epoch}/{recipe.epochs}: loss {total.item() / count:.4f}  val acc {val:.4f}")
        train_time = time.perf_counter() - started
        test = evaluate_accuracy(model, _eval_loader(splits.test, recipe), device=device)
    meta = {
        "format": CACHE_FORMAT,
        "key_parts": parts,
        "recipe": asdict(recipe),
        "val_accuracy": history[-1]["val_accuracy"],
        "test_accuracy": test,
        "train_time_s": train_time,
        "history": history,
        "device": str(device),
    }
    _save_entry(model, meta, entry)
    return model.eval(), {**meta, "cached": False, "path": str(entry)}


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, loader: DataLoader, *, device: torch.device | str, max_batches: int | None = None
) -> float:
    """Top-1 accuracy (a fraction) of ``model`` in eval mode over ``loader`` (its first ``max_batches``)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    try:
        with _channels_last(model, torch.device(device)):
            for images, labels in itertools.islice(loader, max_batches):
                labels = labels.to(device)
                correct += (model(_to(images, device)).argmax(1) == labels).sum()
                seen += len(labels)
    finally:
        model.train(was_training)
    return correct.item() / max(seen, 1)


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
        with _channels_last(model, torch.device(device)):
            for images, _ in itertools.islice(_cycle(loader), batches):
                model(_to(images, device))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, mode in modes.items():
            module.training = mode


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
    teacher_cache: dict[bytes, torch.Tensor] | None = None,
) -> dict[str, float | int]:
    """Distil ``teacher`` into ``student`` for ``steps`` SGD steps (Nesterov, cosine-annealed from ``lr``).

    ``teacher_cache`` keeps the teacher's logits per batch (keyed by a digest of the images): pass the
    same dict to every fine-tune from one teacher over a seeded loader, and on CPU each batch's teacher
    pass runs once. Returns ``{"loss": mean loss of the last 10 steps, "steps": steps}``; raises
    :class:`DivergedError` as soon as the loss is NaN or infinite, or above ``EXPLODED`` x max(first
    loss, 1).
    """
    device = torch.device(device)
    student.to(device)
    teacher.to(device)
    teacher_mode = teacher.training
    teacher.eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    recent: list[torch.Tensor] = []
    student.train()
    try:
        with _fast_training(student, device), _channels_last(teacher, device):
            for step, (images, labels) in enumerate(itertools.islice(_cycle(loader), steps), start=1):
                key = _batch_digest(images) if teacher_cache is not None and device.type == "cpu" else None
                images, labels = _to(images, device), labels.to(device)
                teacher_logits = None if key is None else teacher_cache.get(key)
                if teacher_logits is None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                    if key is not None:
                        teacher_cache[key] = teacher_logits
                loss = distillation_loss(student(images), teacher_logits, labels, temperature=temperature, alpha=alpha)
                _check_finite(loss, f"distillation fine-tuning at step {step}")
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
    finally:
        teacher.train(teacher_mode)
    return {"loss": torch.stack(recent).mean().item() if recent else math.nan, "steps": steps}


def _batch_digest(images: torch.Tensor) -> bytes:
    return hashlib.blake2b(images.contiguous().numpy().tobytes(), digest_size=16).digest()


class CpuConvGrads(TorchFunctionMode):
    """Route CPU ``conv2d`` calls whose oneDNN backward is slow through :class:`_MatmulWeightGradConv2d`.

    Measured (batch 256, channels-last, 2 threads), forward + backward: 512->512 3x3 conv on a 1x1 map
    344 ms with oneDNN vs 41 ms here; 256->512 stride 2 onto 1x1: 98 vs 48 ms; 256->256 on 2x2: 70 vs
    56 ms; the 1-channel 7x7 stem: 62 vs 31 ms; but 64->64 on 7x7: 43 vs 85 ms, so only outputs of at
    most 4 pixels and single-channel inputs take this path.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.conv2d:
            call = _matmul_conv_call(*args, **kwargs)
            if call is not None:
                return _MatmulWeightGradConv2d.apply(*call)
        return func(*args, **kwargs)


class _MatmulWeightGradConv2d(torch.autograd.Function):
    """conv2d whose weight gradient is one (out, N*L) @ (N*L, in*k*k) matrix product over unfolded inputs.

    A 1x1 input to a 1x1 output (a 3x3 conv on ResNet's last stage at 28x28) meets one kernel tap, so its
    forward and both gradients are (N, in) x (in, out) matrix products, skipping the 8 zero-padded taps.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        tap = _single_tap(x, weight, stride, padding)
        if tap is not None:  # a 1x1 map to a 1x1 output: a matrix product with one kernel tap
            return F.linear(x.flatten(1), weight[:, :, tap[0], tap[1]], bias)[:, :, None, None]
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        n, out = grad.shape[:2]
        tap = _single_tap(x, weight, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[0]:
            if tap is not None:
                grad_x = (grad.reshape(n, out) @ weight[:, :, tap[0], tap[1]]).view_as(x)
            else:
                grad_x = torch.ops.aten.convolution_backward(
                    grad, x, weight, None, ctx.stride, ctx.padding, [1, 1], False, [0, 0], 1, [True, False, False]
                )[0]
        if ctx.needs_input_grad[1]:
            if tap is not None:
                grad_w = weight.new_zeros(weight.shape)
                grad_w[:, :, tap[0], tap[1]] = grad.reshape(n, out).t() @ x.reshape(n, -1)
            else:
                cols = F.unfold(x, weight.shape[2:], padding=ctx.padding, stride=ctx.stride)
                grad_rows = grad.reshape(n, out, -1).transpose(0, 1).reshape(out, -1)
                grad_w = (grad_rows @ cols.transpose(1, 2).reshape(-1, cols.shape[1])).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _single_tap(
    x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[int, int] | None:
    """The one kernel tap a 1x1 input meets when the output is 1x1 too, else None."""
    if x.shape[2:] != (1, 1):
        return None
    size = [(1 + 2 * p - k) // s + 1 for p, k, s in zip(padding, weight.shape[2:], stride)]
    if size != [1, 1] or not all(p < k for p, k in zip(padding, weight.shape[2:])):
        return None
    return padding[0], padding[1]


def _matmul_conv_call(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | str | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int], tuple[int, int]] | None:
    """The arguments for :class:`_MatmulWeightGradConv2d` when it beats oneDNN for this call, else None."""
    if (
        groups != 1
        or isinstance(padding, str)
        or _pair(dilation) != (1, 1)
        or x.dim() != 4
        or x.device.type != "cpu"
        or not (weight.requires_grad and torch.is_grad_enabled())
    ):
        return None
    stride, padding = _pair(stride), _pair(padding)
    out_h, out_w = ((x.shape[i + 2] + 2 * padding[i] - weight.shape[i + 2]) // stride[i] + 1 for i in range(2))
    if out_h * out_w > 4 and x.shape[1] != 1:
        return None
    return x, weight, bias, stride, padding


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[-1])


@contextlib.contextmanager
def _channels_last(model: nn.Module, device: torch.device) -> Iterator[None]:
    """On CPU, hold 4-D weights channels-last (oneDNN runs ResNet-18 ~1.8x faster so) and restore them on exit."""
    if device.type != "cpu":
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _fast_training(model: nn.Module, device: torch.device) -> Iterator[None]:
    """On CPU: channels-last weights and :class:`CpuConvGrads`."""
    with _channels_last(model, device), CpuConvGrads() if device.type == "cpu" else contextlib.nullcontext():
        yield


def _to(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return images.to(device, non_blocking=True)


def _cycle(loader: DataLoader) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data loader yields no batches")


def _check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise DivergedError(f"{where}: loss is {loss.item()}; lower the learning rate")


def _optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.momentum, 0.999))
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; use 'sgd' or 'adamw'")


def _scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=recipe.lr,
            total_steps=steps,
            pct_start=recipe.warmup_fraction,
            cycle_momentum=False,
            div_factor=25.0,
            final_div_factor=1e3,
        )
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    raise ValueError(f"unknown schedule {recipe.schedule!r}; use 'onecycle' or 'cosine'")


def _eval_loader(dataset: torch.utils.data.Dataset, recipe: Recipe) -> DataLoader:
    return make_loader(dataset, batch_size=2 * recipe.batch_size, shuffle=False)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    ) as bar:
        yield bar


def _digest(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_entry(model: nn.Module, entry: Path) -> dict[str, Any] | None:
    """The metadata of a valid cache entry after loading its weights into ``model``; None to retrain."""
    if not entry.is_file():
        return None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        saved = torch.load(entry, map_location="cpu", weights_only=True)
        state, meta = saved["state_dict"], saved["meta"]
        if meta["format"] != CACHE_FORMAT or {k: tuple(v.shape) for k, v in state.items()} != expected:
            return None
    except Exception:
        return None
    model.load_state_dict(state)
    return meta


def _save_entry(model: nn.Module, meta: dict[str, Any], entry: Path) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_open(entry, "wb") as handle:
        torch.save({"state_dict": state, "meta": meta}, handle)
