"""The problem of a run: the data splits, the trained model, its search space, and their fingerprint."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch
from rich.console import Console
from torch import nn

from ranksearch.data import (
    DataSplits,
    FolderImageDataset,
    ImageDataset,
    Preprocessing,
    load_dataset,
    make_loader,
)
from ranksearch.errors import RanksearchError
from ranksearch.measure.backends import latency_backend
from ranksearch.models import build_model, load_checkpoint, pretrained_preprocessing
from ranksearch.results.record import FINGERPRINT, SETTINGS
from ranksearch.search import SearchSpace, record_input_shapes
from ranksearch.study.settings import RunSettings
from ranksearch.training import DEFAULT_RECIPE, train_baseline
from ranksearch.util import cache_dir


@dataclass(frozen=True)
class RunContext:
    """What an evaluator named on the command line is built with."""

    settings: RunSettings
    model: nn.Module
    splits: DataSplits
    device: torch.device
    example: torch.Tensor
    input_shapes: dict[str, tuple[int, ...]]
    checkpoint: Path | None = None
    """The file holding ``model``'s trained weights: ``--checkpoint`` or the cached baseline."""
    latency_device: torch.device | None = None
    """Where latency is measured (``--latency-device``); None: ``device``."""

    @property
    def timing_device(self) -> torch.device:
        """Where latency is measured: ``latency_device``, or ``device``."""
        return self.device if self.latency_device is None else self.latency_device

    def model_spec(self) -> dict[str, object]:
        """How to rebuild ``model``: the ``build_model`` arguments and its weights file (an export's ``model``)."""
        return {
            "name": self.settings.problem.model,
            "num_classes": self.splits.num_classes,
            "in_channels": self.splits.in_channels,
            "image_size": self.splits.image_size,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
        }


def load_space(
    path: str | Path, latency_device: torch.device, console: Console, *, backend: str = "torch"
) -> SearchSpace:
    """The search space at ``path``; int8 is left out unless latency is measured on a CPU (its kernels run there
    only; models trained on a GPU are quantized on the CPU that times them), and with a latency ``backend`` that
    refuses it (:attr:`~ranksearch.measure.backends.LatencyBackend.int8_refused`; torch.compile: its quantized
    modules break the graph; measured, two int8 layers in a 28 px ResNet-18 made eight graph breaks and took the
    compiled model from 2.0 ms to 6.2 ms, no faster than eager torch)."""
    space = SearchSpace.load(path)
    if latency_device.type != "cpu" and space.int8:
        console.print(f"int8: its kernels run on CPU only; not searched with latency on {latency_device.type}")
        space = replace(space, int8=False)
    refused = latency_backend(backend).int8_refused
    if refused is not None and space.int8:
        console.print(f"int8: {refused}")
        space = replace(space, int8=False)
    return space


def load_splits(settings: RunSettings, *, eval_subset: int | None) -> DataSplits:
    """The run's data splits, with ``eval_subset`` images of validation and test (None: all of them)."""
    problem = settings.problem
    pretrained = pretrained_preprocessing(problem.model, problem.weights)
    return load_dataset(
        problem.dataset,
        root=problem.data_root,
        val_fraction=problem.val_fraction,
        seed=problem.seed,
        download=problem.download,
        train_subset=problem.train_subset,
        eval_subset=eval_subset,
        preprocessing=None if pretrained is None else Preprocessing(**pretrained),
        image_size=problem.image_size,
    )


def load_problem(
    settings: RunSettings,
    device: torch.device,
    console: Console,
    phases: dict[str, float] | None = None,
    *,
    space: SearchSpace | None = None,
) -> RunContext:
    """The data splits and the trained model (from ``--checkpoint`` or the cached baseline) of a run.

    ``space``'s layer patterns are checked on the built model before any weights are loaded or trained. Latency is
    measured on ``--latency-device`` (resolved here), or on ``device`` without it.
    """
    timing = settings.infra.devices()[1]
    problem = settings.problem
    splits = load_splits(settings, eval_subset=problem.eval_subset)
    for note in splits.notes:
        console.print(note)
    model = build_model(
        problem.model,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        weights=None if problem.checkpoint is not None else problem.weights,  # the checkpoint holds the weights
    )
    if space is not None:
        space.check_layers(model)
    if problem.checkpoint is not None:
        model = load_checkpoint(model, problem.checkpoint, trust=problem.trust_checkpoint)
        checkpoint = Path(problem.checkpoint)
    else:
        recipe = replace(
            DEFAULT_RECIPE,
            epochs=problem.baseline_epochs or DEFAULT_RECIPE.epochs,
            nuclear_norm=problem.baseline_nuclear_norm,
        )
        start = time.perf_counter()
        model, info = train_baseline(
            model,
            splits,
            recipe,
            device=device,
            cache_dir=cache_dir() / "baselines",
            key_parts={
                "model": problem.model,
                "dataset": problem.dataset,
                "weights": problem.weights,
                "train_subset": problem.train_subset,
                "val_fraction": problem.val_fraction,
                "seed": problem.seed,
                **({"data": _digest_of(splits.train)} if isinstance(splits.train, FolderImageDataset) else {}),
            },
        )
        if phases is not None:
            phases["baseline_training"] = time.perf_counter() - start
        if info.get("cached"):
            console.print(f"baseline: reusing the trained {problem.model} from the cache")
        checkpoint = Path(info["path"])
    model = model.to(device).eval()
    _check_weights(model, problem.checkpoint)
    first = next(iter(make_loader(splits.val, batch_size=1, shuffle=False)))[0]  # an unreadable image is skipped
    example = first.repeat(settings.evaluation.latency_batch, 1, 1, 1).to(device)
    return RunContext(
        settings,
        model,
        splits,
        device,
        example,
        record_input_shapes(model, example),
        checkpoint.resolve(),
        None if timing == device else timing,
    )


def _digest_of(dataset: ImageDataset) -> str:
    """A digest of what defines ``dataset`` (an image folder's files, labels and preprocessing)."""
    hasher = hashlib.blake2b(digest_size=16)
    dataset.digest_into(hasher)
    return hasher.hexdigest()


def _check_weights(model: nn.Module, checkpoint: Path | None) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            source = checkpoint or "the baseline"
            raise RanksearchError(f"{source}: parameter {name} holds NaN/inf; retrain or pass a healthy checkpoint")


def problem_fingerprint(model: nn.Module, splits: DataSplits) -> dict[str, str]:
    """Digests of the trained weights and of every data split (images and labels)."""
    weights = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if not name.endswith("num_batches_tracked"):
            weights.update(name.encode())
            weights.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    data = hashlib.blake2b(digest_size=16)
    for split in (splits.train, splits.val, splits.test):
        split.digest_into(data)
    return {"model": weights.hexdigest(), "data": data.hexdigest()}


def check_fingerprint(study: optuna.Study, fingerprint: dict[str, str], *, checkpoint: Path | None) -> None:
    """Record a new study's fingerprint; refuse data or weights that differ from those the study was measured with
    (data first: other data trains other baseline weights)."""
    if not FINGERPRINT.stored(study):
        FINGERPRINT.write(study, fingerprint)
        return
    recorded = FINGERPRINT.read(study)
    name = study.study_name
    if recorded.get("data") != fingerprint["data"]:
        dataset = str(SETTINGS.read(study).get("dataset", "")) if SETTINGS.stored(study) else ""
        fix = (
            "the same files must be in the folder (a study of an image folder recorded before 2026-11-30 measured it "
            "at 64 px at most and does not resume; start a new one with --study-name)"
            if dataset.startswith("imagefolder:")
            else "point --data-root at the same dataset files"
        )
        raise RanksearchError(f"study {name!r}: the dataset here differs from the study's; {fix}")
    if recorded.get("model") != fingerprint["model"]:
        raise RanksearchError(
            f"study {name!r}: the trained weights here ({checkpoint or 'the baseline'}) differ from the study's; "
            f"pass --checkpoint with the file the study was measured with (its 'model' attribute names it)"
        )
