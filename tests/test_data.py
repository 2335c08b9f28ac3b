"""Dataset loading, seeded splits, in-memory augmentation and loaders, on real Fashion-MNIST files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import ranksearch.data as data
from ranksearch.data import load_dataset, make_loader
from ranksearch.errors import RanksearchError


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def splits(root: Path) -> data.DataSplits:
    return load_dataset("fashion_mnist", root=root)


def test_fashion_mnist_comes_from_the_system_package(splits: data.DataSplits, root: Path) -> None:
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)


def test_split_is_disjoint_and_covers_the_training_set(splits: data.DataSplits) -> None:
    train, val = set(splits.train.indices.tolist()), set(splits.val.indices.tolist())
    assert not train & val
    assert train | val == set(range(60000))


def test_splits_and_subsets_are_seeded(root: Path, splits: data.DataSplits) -> None:
    again = load_dataset("fashion_mnist", root=root, train_subset=1000, eval_subset=300)
    same = load_dataset("fashion_mnist", root=root, train_subset=1000, eval_subset=300)
    other = load_dataset("fashion_mnist", root=root, seed=1, train_subset=1000, eval_subset=300)
    assert (len(again.train), len(again.val), len(again.test)) == (1000, 300, 300)
    assert torch.equal(again.val.indices, splits.val.indices[:300])
    assert torch.equal(again.full_val.indices, splits.val.indices) and splits.full_val is None  # promotions' split
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(again, name).indices, getattr(same, name).indices)
        assert not torch.equal(getattr(again, name).indices, getattr(other, name).indices)


def test_items_are_normalised_and_only_train_is_augmented(splits: data.DataSplits) -> None:
    images, labels = next(iter(make_loader(splits.val, batch_size=512, shuffle=False)))
    assert images.shape == (512, 1, 28, 28) and labels.dtype == torch.int64
    assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1
    first = torch.stack([splits.val[i][0] for i in range(4)])
    assert torch.equal(first, images[:4])
    torch.manual_seed(0)
    a, b = splits.train.batch(torch.arange(64)), splits.train.batch(torch.arange(64))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])
    plain = splits.train.subset(torch.arange(64), augment=False).batch(torch.arange(64))[0]
    assert (a[0] == plain).flatten(1).all(1).float().mean() < 0.5


def test_shuffled_loader_is_seeded_and_drops_ragged_batch(root: Path) -> None:
    small = load_dataset("fashion_mnist", root=root, train_subset=1000)
    first = [labels for _, labels in make_loader(small.train, batch_size=128, shuffle=True, seed=3)]
    second = [labels for _, labels in make_loader(small.train, batch_size=128, shuffle=True, seed=3)]
    assert len(first) == 1000 // 128
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_missing_files_say_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(RanksearchError, match=r"apt-get install dataset-fashion-mnist.*--download") as info:
        load_dataset("fashion_mnist", root=tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(RanksearchError, match=r"dataset mnist not found under .*--download.*--data-root"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(RanksearchError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path)


def test_unknown_dataset_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(RanksearchError, match="fashion_mnist, mnist, cifar10, cifar100, imagefolder:PATH"):
        load_dataset("svhn", root=tmp_path)


def test_imagefolder_with_train_and_val(tmp_path: Path) -> None:
    for split, count in (("train", 6), ("val", 2)):
        for label, colour in enumerate(("red", "blue", "green")):
            folder = tmp_path / "shapes" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20 + i, 16), colour).save(folder / f"{i}.png")
    splits = load_dataset(f"imagefolder:{tmp_path / 'shapes'}", root=tmp_path, val_fraction=0.5)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (3, 3, 16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 9, 6)
    images, labels = next(iter(make_loader(splits.test, batch_size=6, shuffle=False)))
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(RanksearchError, match="no class subfolders"):
        load_dataset(f"imagefolder:{tmp_path / 'shapes' / 'train' / 'class0'}", root=tmp_path)
