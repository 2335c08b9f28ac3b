"""Baseline training from scratch with a :class:`Recipe`, cached on disk by model, data and recipe."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from ranksearch.data import DataSplits, make_loader
from ranksearch.regularize import NuclearNormPenalty
from ranksearch.training.evaluation import evaluate_accuracy
from ranksearch.training.loop import check_finite, fast_training, mixed_precision, to_device
from ranksearch.util import atomic_open, mark_used

__all__ = ["DEFAULT_RECIPE", "Recipe", "train_baseline"]

CACHE_FORMAT = 1
NUCLEAR_NORM_EVERY = 8


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
    if train.augment != recipe.augment:
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
            with fast_training(model, device):
                for images, labels in loader:
                    images, labels = to_device(images, device), labels.to(device)
                    with mixed_precision(device):
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
                        check_finite(total / count, f"baseline training at epoch {epoch}")
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
    mark_used(entry)  # `ranksearch cache --clear --older-than` keeps a baseline in use
    return meta


def _save_entry(model: nn.Module, meta: dict[str, Any], entry: Path) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_open(entry, "wb") as handle:
        torch.save({"state_dict": state, "meta": meta}, handle)
