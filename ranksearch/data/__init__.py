"""Datasets as in-memory uint8 tensors with cheap batched augmentation, split into train/val/test.

Every supported dataset fits in memory, so images are decoded once and each batch is gathered,
augmented (random crop with zero padding, horizontal flip where it makes sense) and normalised
with a few tensor operations instead of a PIL transform per image.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ranksearch.errors import RanksearchError
from ranksearch.util import first_line

__all__ = ["DATASETS", "DataSplits", "TensorImageDataset", "load_dataset", "make_loader"]

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder:PATH")
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGEFOLDER_MAX_SIZE = 64
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


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
        """A dataset over ``indices`` sharing normalisation (and augmentation unless overridden)."""
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


@dataclass(frozen=True)
class DataSplits:
    """Train and val carved from the official training set with a seeded split; test is the official test set.
    ``full_val`` is the whole validation split when ``val`` is only its first ``eval_subset`` images (else None)."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    full_val: Dataset | None = None


def load_dataset(
    name: str,
    *,
    root: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    train_subset: int | None = None,
    eval_subset: int | None = None,
) -> DataSplits:
    """Load ``name`` (one of ``DATASETS``) from ``root`` into memory and split it.

    ``val_fraction`` of the training set (seeded by ``seed``) becomes the validation split.
    ``train_subset`` / ``eval_subset`` keep a seeded random subset of the train / val and test splits.
    ``imagefolder:PATH`` reads ``PATH/train`` plus ``PATH/val`` or ``PATH/test`` (the test split), or a
    single folder of class subfolders; images are resized to the smallest side found (at most
    ``IMAGEFOLDER_MAX_SIZE`` pixels) and the normalisation is measured on the training images.
    """
    if not 0.0 < val_fraction < 1.0:
        raise RanksearchError(f"val_fraction {val_fraction} is out of range; pass a value between 0 and 1")
    root = Path(root).expanduser()
    if name.startswith("imagefolder:"):
        train_images, train_labels, test_images, test_labels, classes = _load_imagefolder(Path(name[12:]))
        mean, std = _channel_stats(train_images)
        info = _Info(mean, std, max(1, train_images.shape[-1] // 8), True, "")
    elif name in _INFO:
        info = _INFO[name]
        train_images, train_labels, test_images, test_labels, classes = _load_torchvision(name, root, download, info)
    else:
        raise RanksearchError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")

    generator = torch.Generator().manual_seed(seed)
    if not test_labels.numel():
        order = torch.randperm(len(train_labels), generator=generator)
        n_test = max(1, round(len(order) * val_fraction))
        test_images, test_labels = train_images[order[:n_test]], train_labels[order[:n_test]]
        train_images, train_labels = train_images[order[n_test:]], train_labels[order[n_test:]]
    full = TensorImageDataset(
        train_images, train_labels, mean=info.mean, std=info.std, crop_padding=info.crop_padding, hflip=info.hflip
    )
    order = torch.randperm(len(full), generator=generator)
    n_val = max(1, round(len(order) * val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    test_idx = torch.randperm(len(test_labels), generator=generator)
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    all_val_idx = val_idx
    if eval_subset is not None:
        val_idx, test_idx = val_idx[:eval_subset], test_idx[:eval_subset]
    test = TensorImageDataset(test_images, test_labels, mean=info.mean, std=info.std)
    return DataSplits(
        name=name,
        train=full.subset(train_idx, augment=True),
        val=full.subset(val_idx, augment=False),
        test=test.subset(test_idx.sort().values),
        num_classes=classes,
        in_channels=train_images.shape[1],
        image_size=train_images.shape[-1],
        full_val=full.subset(all_val_idx, augment=False) if len(all_val_idx) > len(val_idx) else None,
    )


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int | None = None) -> DataLoader:
    """A single-process loader; shuffled loaders (seeded by ``seed``) drop a ragged last batch."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    drop_last = shuffle and len(dataset) > batch_size
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)


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
    """Un-gzip the Debian ``dataset-fashion-mnist`` files into ``raw`` when they are missing there."""
    for source in sorted(SYSTEM_FASHION_MNIST.glob("*-ubyte.gz")):
        target = raw / source.name[:-3]
        if target.exists():
            continue
        raw.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        with gzip.open(source, "rb") as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(target)


def _load_imagefolder(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    if not path.is_dir():
        raise RanksearchError(f"imagefolder {path} is not a directory; pass imagefolder:PATH with class subfolders")
    train_dir = path / "train"
    test_dir = next((path / sub for sub in ("val", "test") if (path / sub).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        train_dir, test_dir = path, None
    classes = sorted(entry.name for entry in train_dir.iterdir() if entry.is_dir())
    train_files = _image_files(train_dir, classes)
    test_files = _image_files(test_dir, classes) if test_dir is not None else []
    if not classes or not train_files:
        raise RanksearchError(f"imagefolder {train_dir} holds no class subfolders with images; add CLASS/*.png etc.")
    from PIL import Image

    sizes, modes = [], set()
    for file, _ in train_files + test_files:
        with Image.open(file) as image:
            sizes.append(min(image.size))
            modes.add(image.mode)
    size = min(min(sizes), IMAGEFOLDER_MAX_SIZE)
    mode = "L" if modes <= {"L", "1", "I", "I;16", "F"} else "RGB"
    return (*_decode(train_files, size, mode), *_decode(test_files, size, mode), len(classes))


def _image_files(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    return [
        (file, label)
        for label, cls in enumerate(classes)
        if (folder / cls).is_dir()
        for file in sorted((folder / cls).rglob("*"))
        if file.suffix.lower() in IMAGE_SUFFIXES
    ]


def _decode(files: list[tuple[Path, int]], size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    channels = 1 if mode == "L" else 3
    images = torch.empty(len(files), channels, size, size, dtype=torch.uint8)
    for i, (file, _) in enumerate(files):
        with Image.open(file) as image:
            tensor = F.pil_to_tensor(image.convert(mode))
        images[i] = F.center_crop(F.resize(tensor, [size], antialias=True), [size, size])
    return images, torch.tensor([label for _, label in files], dtype=torch.int64)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).float() / 255.0
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1).clamp_min(1e-3).tolist())
