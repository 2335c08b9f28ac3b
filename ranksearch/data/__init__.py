"""Datasets split into train/val/test: the small built-in ones in memory, image folders streamed from disk.

The built-in datasets (Fashion-MNIST, MNIST, CIFAR) fit in memory, so their images are decoded once and each batch
is gathered, augmented (random crop with zero padding, horizontal flip where it makes sense) and normalised with a
few tensor operations instead of a PIL transform per image. ``imagefolder:PATH`` is read lazily at native
resolution by DataLoader worker processes (:mod:`ranksearch.data.folder`).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from ranksearch.data.folder import (
    FolderImageDataset,
    PathTable,
    Preprocessing,
    collate_readable,
    default_loader_workers,
    measured_normalisation,
    scan_folder,
    skipped_message,
)
from ranksearch.errors import RanksearchError
from ranksearch.util import atomic_open, first_line

__all__ = [
    "DATASETS",
    "DataSplits",
    "FolderImageDataset",
    "ImageDataset",
    "Preprocessing",
    "TensorImageDataset",
    "load_dataset",
    "make_loader",
]

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder:PATH")
IMAGEFOLDER_PREFIX = "imagefolder:"
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class _Info:
    """Per-dataset constants: normalisation, augmentation, and how to obtain the files."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    hflip: bool
    how_to_get: str


_INFO = {
    "fashion_mnist": _Info(
        (0.2860,),
        (0.3530,),
        2,
        True,
        "install it with `apt-get install dataset-fashion-mnist`, pass --download when online, "
        "or point --data-root at a folder holding FashionMNIST/raw/*-ubyte",
    ),
    "mnist": _Info(
        (0.1307,),
        (0.3081,),
        2,
        False,
        "pass --download when online, or point --data-root at a folder holding MNIST/raw/*-ubyte",
    ),
    "cifar10": _Info(
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        4,
        True,
        "pass --download when online, or point --data-root at a folder holding cifar-10-batches-py/",
    ),
    "cifar100": _Info(
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        4,
        True,
        "pass --download when online, or point --data-root at a folder holding cifar-100-python/",
    ),
}


class TensorImageDataset(Dataset):
    """Images held as a uint8 ``(N, C, H, W)`` tensor; items are normalised float images and int labels.

    ``indices`` records each image's position in the source split (default: 0..N-1).

    With ``augment`` each fetch draws a random crop (zero padding ``crop_padding``) and, when
    ``hflip``, a random horizontal flip, using the global torch RNG. The DataLoader fetches whole
    batches through ``__getitems__``, so augmentation runs once per batch rather than per image.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        crop_padding: int = 0,
        hflip: bool = False,
        indices: torch.Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError("images must be a uint8 (N, C, H, W) tensor with one label per image")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.indices = torch.arange(len(labels)) if indices is None else indices
        self._scale = (1.0 / (255.0 * torch.tensor(self.std))).view(1, -1, 1, 1)
        self._shift = (torch.tensor(self.mean) / torch.tensor(self.std)).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.batch(torch.tensor([index]))
        return image[0], int(label[0])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.batch(torch.as_tensor(indices))
        return list(zip(images.unbind(0), labels.unbind(0)))

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (augmented) normalised images and labels at ``indices``, as batched tensors."""
        images = self.images[indices].float()
        if self.augment:
            images = self._augment(images)
        return images * self._scale - self._shift, self.labels[indices]

    def subset(self, indices: torch.Tensor, *, augment: bool | None = None) -> TensorImageDataset:
        """A dataset over ``indices`` (positions in this one) sharing normalisation (and augmentation unless
        overridden)."""
        return TensorImageDataset(
            self.images[indices],
            self.labels[indices],
            mean=self.mean,
            std=self.std,
            augment=self.augment if augment is None else augment,
            crop_padding=self.crop_padding,
            hflip=self.hflip,
            indices=self.indices[indices],
        )

    def digest_into(self, hasher: hashlib.blake2b) -> None:
        """Feed what defines this dataset to ``hasher``: its images and labels."""
        hasher.update(self.images.contiguous().numpy().tobytes())
        hasher.update(self.labels.contiguous().numpy().tobytes())

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        pad = self.crop_padding
        if pad:
            padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
            dy = torch.randint(0, 2 * pad + 1, (n, 1, 1))
            dx = torch.randint(0, 2 * pad + 1, (n, 1, 1))
            rows = (dy + torch.arange(h).view(1, h, 1)).expand(n, h, w)
            cols = (dx + torch.arange(w).view(1, 1, w)).expand(n, h, w)
            images = padded[torch.arange(n).view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2)
        if self.hflip:
            flip = torch.rand(n) < 0.5
            images = torch.where(flip.view(n, 1, 1, 1), images.flip(-1), images)
        return images.contiguous()


class ImageDataset(Protocol):
    """What the tool needs of a split: items ``(image, label)``, labels, index subsets and a digest."""

    augment: bool

    @property
    def labels(self) -> torch.Tensor: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None: ...

    def subset(self, indices: torch.Tensor, *, augment: bool | None = None) -> ImageDataset: ...

    def digest_into(self, hasher: hashlib.blake2b) -> None: ...


@dataclass(frozen=True)
class DataSplits:
    """Train and val carved from the official training set with a seeded split; test is the official test set.
    ``full_val`` is the whole validation split when ``val`` is only its first ``eval_subset`` images (else None).
    ``notes``: what the run should tell the user about the data (unreadable files skipped)."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    num_classes: int
    in_channels: int
    image_size: int
    full_val: ImageDataset | None = None
    notes: tuple[str, ...] = ()


def load_dataset(
    name: str,
    *,
    root: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    train_subset: int | None = None,
    eval_subset: int | None = None,
    preprocessing: Preprocessing | None = None,
    image_size: int | None = None,
    loader_workers: int | None = None,
) -> DataSplits:
    """Load ``name`` (one of ``DATASETS``) from ``root`` and split it.

    ``val_fraction`` of the training set (seeded by ``seed``) becomes the validation split.
    ``train_subset`` / ``eval_subset`` keep a seeded random subset of the train / val and test splits.
    ``imagefolder:PATH`` reads ``PATH/train`` plus ``PATH/val`` or ``PATH/test`` (the test split), or a
    single folder of class subfolders (``val_fraction`` of it becomes the test split), streamed from disk by
    ``loader_workers`` processes (default :func:`~ranksearch.data.folder.default_loader_workers`): with
    ``preprocessing`` (a pretrained model's), as its weights expect; otherwise at ``image_size`` (default: the
    images' own size) with the normalisation measured on the training images. ``image_size`` and
    ``preprocessing`` apply to image folders only.
    """
    if not 0.0 < val_fraction < 1.0:
        raise RanksearchError(f"val_fraction {val_fraction} is out of range; pass a value between 0 and 1")
    split = _Split(val_fraction, seed, train_subset, eval_subset)
    if name.startswith(IMAGEFOLDER_PREFIX):
        workers = default_loader_workers() if loader_workers is None else loader_workers
        return _load_imagefolder(
            name, Path(name.removeprefix(IMAGEFOLDER_PREFIX)).expanduser(), split, preprocessing, image_size, workers
        )
    if name not in _INFO:
        raise RanksearchError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    if image_size is not None:
        raise RanksearchError(
            f"--image-size {image_size}: {name} is used at its own size; --image-size applies to imagefolder:PATH"
        )
    info = _INFO[name]
    train_images, train_labels, test_images, test_labels, classes = _load_torchvision(
        name, Path(root).expanduser(), download, info
    )
    full = TensorImageDataset(
        train_images, train_labels, mean=info.mean, std=info.std, crop_padding=info.crop_padding, hflip=info.hflip
    )
    test = TensorImageDataset(test_images, test_labels, mean=info.mean, std=info.std)
    return split.of(
        name,
        full,
        test,
        split.generator(),
        num_classes=classes,
        in_channels=train_images.shape[1],
        image_size=train_images.shape[-1],
    )


@dataclass(frozen=True)
class _Split:
    """How a dataset is split and subset (seeded)."""

    val_fraction: float
    seed: int
    train_subset: int | None
    eval_subset: int | None

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def of(
        self,
        name: str,
        full: ImageDataset,
        test: ImageDataset,
        generator: torch.Generator,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        notes: tuple[str, ...] = (),
    ) -> DataSplits:
        """Val carved from ``full`` (the official training set), the rest train; subsets of each; ``test``."""
        order = torch.randperm(len(full), generator=generator)
        n_val = max(1, round(len(order) * self.val_fraction))
        val_idx, train_idx = order[:n_val], order[n_val:]
        test_idx = torch.randperm(len(test), generator=generator)
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        all_val_idx = val_idx
        if self.eval_subset is not None:
            val_idx, test_idx = val_idx[: self.eval_subset], test_idx[: self.eval_subset]
        return DataSplits(
            name=name,
            train=full.subset(train_idx, augment=True),
            val=full.subset(val_idx, augment=False),
            test=test.subset(test_idx.sort().values, augment=False),
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            full_val=full.subset(all_val_idx, augment=False) if len(all_val_idx) > len(val_idx) else None,
            notes=notes,
        )


def _load_imagefolder(
    name: str,
    path: Path,
    split: _Split,
    preprocessing: Preprocessing | None,
    image_size: int | None,
    workers: int,
) -> DataSplits:
    scan = scan_folder(path)
    if preprocessing is None:
        side = image_size or scan.side
        preprocessing = Preprocessing(size=side, resize=side)
    elif image_size is not None:
        preprocessing = preprocessing.with_size(image_size)
    train_names, train_labels = scan.train
    test_names, test_labels = scan.test or ([], [])
    files = PathTable(scan.root, [*train_names, *test_names])
    labels = torch.tensor([*train_labels, *test_labels], dtype=torch.int64)
    generator = split.generator()
    train_positions = torch.arange(len(train_names))
    test_positions = torch.arange(len(train_names), len(labels))
    if scan.test is None:  # a single folder: its test split is carved out first
        order = torch.randperm(len(train_names), generator=generator)
        n_test = max(1, round(len(order) * split.val_fraction))
        test_positions, train_positions = order[:n_test].sort().values, order[n_test:].sort().values
    if preprocessing.mean is None or preprocessing.std is None:
        mean, std = measured_normalisation(files, labels[train_positions], preprocessing, grey=scan.grey, seed=0)
        preprocessing = replace(preprocessing, mean=mean, std=std)
    full, test = (
        FolderImageDataset(
            files, labels, preprocessing=preprocessing, grey=scan.grey, indices=positions, loader_workers=workers
        )
        for positions in (train_positions, test_positions)
    )
    note = skipped_message(scan)
    return split.of(
        name,
        full,
        test,
        generator,
        num_classes=len(scan.classes),
        in_channels=1 if scan.grey else 3,
        image_size=preprocessing.size,
        notes=() if note is None else (note,),
    )


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int | None = None) -> DataLoader:
    """A loader (shuffled loaders, seeded by ``seed``, drop a ragged last batch); an image folder's batches are
    decoded by its worker processes, and an unreadable image is dropped from its batch."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    drop_last = shuffle and len(dataset) > batch_size
    workers = getattr(dataset, "loader_workers", 0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=collate_readable if isinstance(dataset, FolderImageDataset) else None,
    )


def _load_torchvision(
    name: str, root: Path, download: bool, info: _Info
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    from torchvision import datasets

    cls = {
        "fashion_mnist": datasets.FashionMNIST,
        "mnist": datasets.MNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]
    if name == "fashion_mnist" and not download:
        _copy_system_fashion_mnist(root / "FashionMNIST" / "raw")
    try:
        train, test = (cls(str(root), train=split, download=download) for split in (True, False))
    except RuntimeError as exc:
        if not download:
            raise RanksearchError(f"dataset {name} not found under {root}; {info.how_to_get}") from None
        raise RanksearchError(
            f"dataset {name} could not be downloaded ({first_line(exc)}); {info.how_to_get}"
        ) from None
    except OSError as exc:
        raise RanksearchError(f"dataset {name} could not be read under {root} ({exc}); {info.how_to_get}") from None
    return (*_as_tensors(train), *_as_tensors(test), len(train.classes))


def _as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.as_tensor(dataset.data)
    images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64)


def _copy_system_fashion_mnist(raw: Path) -> None:
    """Un-gzip the Debian ``dataset-fashion-mnist`` files into ``raw`` when they are missing there (each through a
    temporary file of its own, so processes doing it at once each replace the file whole)."""
    for source in sorted(SYSTEM_FASHION_MNIST.glob("*-ubyte.gz")):
        target = raw / source.name[:-3]
        if target.exists():
            continue
        with gzip.open(source, "rb") as src, atomic_open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
