"""Image folders streamed from disk at native resolution: ``imagefolder:PATH``.

Only file names live in memory (one byte blob with offsets, however many images); splits, calibration and
validation subsets are index lists into it. Images are decoded and transformed with ``torchvision.transforms.v2``
per item, in DataLoader worker processes: resize, centre crop and normalisation as a pretrained model's weights
expect (:class:`Preprocessing`), or at the images' own size with the normalisation measured once on a sample of
the training images and cached. An image that cannot be read is skipped: the folder scan drops files that are not
images at all and says which, and an image that fails to decode later (a truncated body) is dropped from its
batch with a warning naming it, never failing the trial.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ranksearch.errors import RanksearchError
from ranksearch.util import cache_dir, describe, read_json_cache, write_json_cache

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
STATS_SAMPLE = 256
"""Training images the normalisation is measured on (when no pretrained weights give it)."""
NAMED_SKIPS = 3
"""Unreadable files named in the run's message (all are counted)."""
GREY_MODES = {"L", "1", "I", "I;16", "F", "LA"}


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs: shorter side resized to ``resize``, centre crop ``size`` x ``size`` (training
    draws a random resized crop of ``size`` and a horizontal flip instead), normalised by ``mean`` and ``std`` (None:
    measured on the training images)."""

    size: int
    resize: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"

    def with_size(self, size: int) -> Preprocessing:
        """The same recipe at crop ``size``, the resize scaled along (``--image-size`` over pretrained weights')."""
        return replace(self, size=size, resize=max(size, round(size * self.resize / self.size)))


@dataclass(frozen=True)
class FolderScan:
    """The readable images of a folder: class names, and per split the files (relative paths) and labels."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]] | None
    skipped: tuple[tuple[str, str], ...]
    """(relative path, reason) of each file that is not a readable image."""
    side: int
    """The median shorter side of the readable images: the default crop size."""
    grey: bool


class PathTable:
    """Relative file paths under ``root`` packed in one byte array with offsets (a Python list of a million paths
    costs ~100 MB and is copied page by page into every forked worker as reference counts change)."""

    def __init__(self, root: Path, paths: Sequence[str]) -> None:
        encoded = [p.encode() for p in paths]
        self.root = root
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.offsets = np.cumsum([0, *(len(e) for e in encoded)], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def relative(self, index: int) -> str:
        return self.blob[self.offsets[index] : self.offsets[index + 1]].tobytes().decode()

    def __getitem__(self, index: int) -> Path:
        return self.root / self.relative(index)


class FolderImageDataset(Dataset):
    """Images read from ``files`` at ``indices``; items are normalised float images and int labels, or None for an
    image that cannot be decoded (:func:`collate_readable` drops it from its batch)."""

    def __init__(
        self,
        files: PathTable,
        labels: torch.Tensor,
        *,
        preprocessing: Preprocessing,
        grey: bool,
        augment: bool = False,
        indices: torch.Tensor | None = None,
        loader_workers: int = 0,
    ) -> None:
        if preprocessing.mean is None or preprocessing.std is None:
            raise ValueError("a FolderImageDataset needs its normalisation (mean and std)")
        self.files = files
        self.all_labels = labels
        self.preprocessing = preprocessing
        self.grey = grey
        self.augment = augment
        self.indices = torch.arange(len(labels)) if indices is None else indices
        self.loader_workers = loader_workers
        """Worker processes that decode this dataset's batches (0: the loading process itself)."""
        self._transform = _transform(preprocessing, train=augment)

    @property
    def labels(self) -> torch.Tensor:
        return self.all_labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        position = int(self.indices[index])
        path = self.files[position]
        try:
            image = _read(path, self.grey)
        except Exception as exc:  # a truncated or corrupt body only shows when it is decoded
            warnings.warn(f"skipped unreadable image {path} ({describe(exc)})", UnreadableImageWarning, stacklevel=1)
            return None
        return self._transform(image), int(self.all_labels[position])

    def subset(self, indices: torch.Tensor, *, augment: bool | None = None) -> FolderImageDataset:
        """A dataset over ``indices`` (positions in this one) sharing files and preprocessing (and augmentation
        unless overridden)."""
        return FolderImageDataset(
            self.files,
            self.all_labels,
            preprocessing=self.preprocessing,
            grey=self.grey,
            augment=self.augment if augment is None else augment,
            indices=self.indices[indices],
            loader_workers=self.loader_workers,
        )

    def digest_into(self, hasher: hashlib.blake2b) -> None:
        """Feed what defines this dataset to ``hasher``: its files (relative paths), labels and preprocessing."""
        for position in self.indices.tolist():
            hasher.update(self.files.relative(position).encode() + b"\0")
        hasher.update(self.labels.numpy().tobytes())
        hasher.update(repr(asdict(self.preprocessing)).encode())


class UnreadableImageWarning(UserWarning):
    """An image that could not be decoded was skipped."""


def collate_readable(items: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch the readable items (an unreadable image is None, and dropped)."""
    readable = [item for item in items if item is not None]
    if not readable:
        raise RanksearchError("every image of a batch was unreadable; check the image folder's files")
    return default_collate(readable)


def scan_folder(path: Path) -> FolderScan:
    """Classes and readable images of ``path`` (``train`` plus ``val`` or ``test``, or class folders directly), each
    image's header read once (in threads) and the result cached by the files' names, sizes and times; a one-line
    error for a missing or empty folder, an empty class folder, a single class, or class folders that differ between
    train and test."""
    if not path.is_dir():
        raise RanksearchError(f"imagefolder {path} is not a directory; pass imagefolder:PATH with class subfolders")
    train_dir = path / "train"
    test_dir = next((path / sub for sub in ("val", "test") if (path / sub).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        train_dir, test_dir = path, None
    classes = _classes(train_dir)
    if test_dir is not None:
        _check_same_classes(train_dir, classes, test_dir, _classes(test_dir))
    listed = {
        folder: {cls: _image_files(folder / cls) for cls in classes}
        for folder in ([train_dir] if test_dir is None else [train_dir, test_dir])
    }
    for folder, by_class in listed.items():
        empty = [cls for cls, files in by_class.items() if not files]
        if empty:
            raise RanksearchError(
                f"imagefolder {folder / empty[0]} holds no images; add images (.png, .jpg, ...) or remove the folder"
            )
    files = [file for by_class in listed.values() for cls_files in by_class.values() for file in cls_files]
    headers = _headers(path, files)
    skipped = tuple((rel, reason) for rel, (side, reason) in headers.items() if side is None)
    sides = [side for side, _ in headers.values() if side is not None]
    if not sides:
        raise RanksearchError(f"imagefolder {path}: none of its {len(files)} image files can be read")

    def split(folder: Path) -> tuple[list[str], list[int]]:
        names, labels = [], []
        for label, cls in enumerate(classes):
            for file in listed[folder][cls]:
                rel = file.relative_to(path).as_posix()
                if headers[rel][0] is not None:
                    names.append(rel)
                    labels.append(label)
        return names, labels

    modes = {mode for side, mode in headers.values() if side is not None}
    return FolderScan(
        root=path,
        classes=tuple(classes),
        train=split(train_dir),
        test=None if test_dir is None else split(test_dir),
        skipped=skipped,
        side=sorted(sides)[len(sides) // 2],
        grey=modes <= GREY_MODES,
    )


def skipped_message(scan: FolderScan) -> str | None:
    """One line counting the unreadable files and naming the first few, or None when every file was readable."""
    if not scan.skipped:
        return None
    named = "; ".join(f"{rel} ({reason})" for rel, reason in scan.skipped[:NAMED_SKIPS])
    more = f"; and {len(scan.skipped) - NAMED_SKIPS} more" if len(scan.skipped) > NAMED_SKIPS else ""
    return f"imagefolder {scan.root}: skipped {len(scan.skipped)} unreadable image files: {named}{more}"


def measured_normalisation(
    files: PathTable, labels: torch.Tensor, preprocessing: Preprocessing, *, grey: bool, seed: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to ``STATS_SAMPLE`` training images (seeded), as the evaluation transform
    crops them, cached by the files sampled and the crop."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(labels), generator=generator)[:STATS_SAMPLE].sort().values.tolist()
    key = hashlib.blake2b(digest_size=8)
    for position in sample:
        key.update(files.relative(position).encode() + b"\0")
    key.update(f"{files.root.resolve()}|{preprocessing.size}|{preprocessing.resize}|{grey}".encode())
    cached_at = cache_dir() / "normalisation" / f"{key.hexdigest()}.json"
    cached = read_json_cache(cached_at)
    if cached is not None:
        return tuple(cached["mean"]), tuple(cached["std"])
    unit = replace(preprocessing, mean=(0.0,), std=(1.0,))
    transform = _transform(unit, train=False)
    total = torch.zeros(1 if grey else 3, dtype=torch.float64)
    squares = torch.zeros_like(total)
    pixels = 0
    for position in sample:
        try:
            image = transform(_read(files[position], grey)).double()
        except Exception:  # counted as unreadable where it is loaded for training
            continue
        total += image.sum(dim=(1, 2))
        squares += (image**2).sum(dim=(1, 2))
        pixels += image[0].numel()
    if not pixels:
        raise RanksearchError(f"imagefolder {files.root}: no sampled training image could be decoded")
    mean = total / pixels
    std = (squares / pixels - mean**2).clamp_min(1e-6).sqrt()
    result = tuple(mean.tolist()), tuple(std.clamp_min(1e-3).tolist())
    write_json_cache(cached_at, {"mean": result[0], "std": result[1]})
    return result


def default_loader_workers() -> int:
    """Decoding worker processes for image folders: ``$RANKSEARCH_LOADER_WORKERS``, else one per core beyond the
    first, at most 8 (at least 1)."""
    raw = os.environ.get("RANKSEARCH_LOADER_WORKERS")
    if raw is not None:
        if not raw.isdigit():
            raise RanksearchError(
                f"RANKSEARCH_LOADER_WORKERS={raw!r}: not a whole number; set e.g. RANKSEARCH_LOADER_WORKERS=4"
            )
        return int(raw)
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _classes(folder: Path) -> list[str]:
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise RanksearchError(f"imagefolder {folder} holds no class subfolders with images; add CLASS/*.png etc.")
    if len(classes) == 1:
        raise RanksearchError(
            f"imagefolder {folder} holds one class folder ({classes[0]}); a classifier needs two or more"
        )
    return classes


def _check_same_classes(train_dir: Path, train: list[str], test_dir: Path, test: list[str]) -> None:
    if train == test:
        return
    only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
    differences = [f"{train_dir} alone has {', '.join(only_train)}"] if only_train else []
    differences += [f"{test_dir} alone has {', '.join(only_test)}"] if only_test else []
    raise RanksearchError(
        f"imagefolder class folders differ between train and test ({'; '.join(differences)}); "
        "give both the same class folders"
    )


def _image_files(folder: Path) -> list[Path]:
    return sorted(file for file in folder.rglob("*") if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file())


def _headers(root: Path, files: list[Path]) -> dict[str, tuple[int | None, str | None]]:
    """Per relative path: (shorter side, mode) of a readable image, (None, reason) of an unreadable file; cached by
    the files' names, sizes and modification times."""
    stats = [(file.relative_to(root).as_posix(), file.stat()) for file in files]
    key = hashlib.blake2b(digest_size=8)
    key.update(str(root.resolve()).encode())
    for rel, stat in stats:
        key.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}\0".encode())
    cached_at = cache_dir() / "folders" / f"{key.hexdigest()}.json"
    cached = read_json_cache(cached_at)
    if cached is not None:
        return {rel: (side, mode) for rel, (side, mode) in cached.items()}

    def header(file: Path) -> tuple[int | None, str | None]:
        from PIL import Image

        try:
            with Image.open(file) as image:
                return min(image.size), image.mode
        except Exception as exc:
            return None, describe(exc)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip((rel for rel, _ in stats), pool.map(header, files)))
    write_json_cache(cached_at, results)
    return results


def _read(path: Path, grey: bool) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as image:
        return F.pil_to_tensor(image.convert("L" if grey else "RGB"))


def _transform(preprocessing: Preprocessing, *, train: bool) -> torch.nn.Module:
    from torchvision.transforms import InterpolationMode, v2

    interpolation = InterpolationMode(preprocessing.interpolation)
    size = preprocessing.size
    geometry: list[torch.nn.Module] = (
        [
            v2.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if train
        else [v2.Resize(preprocessing.resize, interpolation=interpolation, antialias=True), v2.CenterCrop(size)]
    )
    return v2.Compose(
        [
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(preprocessing.mean or ()), list(preprocessing.std or ())),
        ]
    )
