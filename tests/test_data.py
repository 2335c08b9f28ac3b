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


def write_folder(root: Path, layout: dict[str, int], *, size: tuple[int, int] = (40, 30), classes: int = 3) -> Path:
    """Class folders of solid-colour images with a stripe (``layout``: split -> images per class; "" for a single
    folder of class subfolders), as PNG and JPEG."""
    colours = ("red", "blue", "green", "yellow")
    for split, count in layout.items():
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = Image.new("RGB", (size[0] + i, size[1]), colours[label])
                image.paste((255, 255, 255), (0, i % size[1], size[0], i % size[1] + 2))
                image.save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_imagefolder_streams_at_native_resolution(tmp_path: Path, monkeypatch) -> None:
    """Train and val folders: the images' own size (the median shorter side), no cap; the normalisation measured
    once and cached; splits are index lists into one file table; batches decoded by worker processes."""
    monkeypatch.setenv("RANKSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_folder(tmp_path / "shapes", {"train": 6, "val": 2}, size=(120, 96))
    splits = load_dataset(f"imagefolder:{folder}", root=tmp_path, val_fraction=0.5, loader_workers=2)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (3, 3, 96)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 9, 6)
    assert isinstance(splits.train, data.FolderImageDataset) and splits.train.files is splits.test.files
    assert sorted([*splits.train.indices.tolist(), *splits.val.indices.tolist()]) == list(range(18))
    loader = make_loader(splits.test, batch_size=6, shuffle=False)
    assert loader.num_workers == 2
    images, labels = next(iter(loader))
    assert images.shape == (6, 3, 96, 96) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    red = images[0, :, 2:10, :].mean(dim=(1, 2))  # above the stripe: pure red, normalised by the measured stats
    mean, std = torch.tensor(splits.test.preprocessing.mean), torch.tensor(splits.test.preprocessing.std)
    assert torch.allclose(red * std + mean, torch.tensor([1.0, 0.0, 0.0]), atol=0.05)  # JPEG
    assert list((tmp_path / "cache" / "normalisation").glob("*.json"))
    augmented = next(iter(make_loader(splits.train, batch_size=4, shuffle=True, seed=0)))[0]
    assert augmented.shape == (4, 3, 96, 96)
    again = load_dataset(f"imagefolder:{folder}", root=tmp_path, val_fraction=0.5, image_size=48)
    assert again.image_size == 48 and next(iter(make_loader(again.val, batch_size=2, shuffle=False)))[0].shape[-1] == 48


def test_imagefolder_takes_pretrained_preprocessing(tmp_path: Path, monkeypatch) -> None:
    """With pretrained weights' preprocessing: resize to their shorter side, centre crop, their mean and std."""
    monkeypatch.setenv("RANKSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_folder(tmp_path / "shapes", {"": 4}, size=(300, 260))
    pretrained = data.Preprocessing(size=224, resize=232, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    splits = load_dataset(f"imagefolder:{folder}", root=tmp_path, preprocessing=pretrained, loader_workers=0)
    assert splits.image_size == 224 and splits.val.preprocessing == pretrained
    assert len(splits.test) == 1 and len(splits.train) + len(splits.val) == 11  # a single folder: test carved out
    image, _ = splits.test[0]
    assert image.shape == (3, 224, 224)
    assert not list((tmp_path / "cache").glob("normalisation/*"))  # nothing measured
    smaller = load_dataset(f"imagefolder:{folder}", root=tmp_path, preprocessing=pretrained, image_size=112)
    assert smaller.val.preprocessing.size == 112 and smaller.val.preprocessing.resize == 116


def test_imagefolder_skips_unreadable_images_and_names_them(tmp_path: Path, monkeypatch) -> None:
    """A file that is not an image is left out at the scan and named; one whose body is truncated is dropped from
    its batch with a warning, never failing the loop."""
    monkeypatch.setenv("RANKSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_folder(tmp_path / "shapes", {"train": 4, "test": 2}, size=(64, 64))
    (folder / "train" / "class1" / "broken.png").write_bytes(b"not an image at all")
    (folder / "train" / "class2" / "empty.jpg").write_bytes(b"")
    body = (folder / "test" / "class0" / "0.jpg").read_bytes()
    (folder / "test" / "class0" / "0.jpg").write_bytes(body[: len(body) * 9 // 10])  # its header intact
    splits = load_dataset(f"imagefolder:{folder}", root=tmp_path, val_fraction=0.25, loader_workers=0)
    assert len(splits.train) + len(splits.val) == 12 and len(splits.test) == 6
    (note,) = splits.notes
    assert "skipped 2 unreadable image files" in note and "train/class1/broken.png" in note and "empty.jpg" in note
    with pytest.warns(data.folder.UnreadableImageWarning, match="0.jpg"):
        batches = list(make_loader(splits.test, batch_size=3, shuffle=False))
    assert [len(labels) for _, labels in batches] == [2, 3]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"train/a": 1, "train/b": 1, "test/a": 1, "test/c": 1}, r"train alone has b; .*test alone has c"),
        ({"a": 1}, r"holds one class folder \(a\); a classifier needs two"),
        ({"a": 2, "b": 0}, r"/b holds no images; add images"),
        ({}, "holds no class subfolders"),
    ],
)
def test_imagefolder_bad_layouts_get_one_line(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8)).save(root / folder / f"{i}.png")
    with pytest.raises(RanksearchError, match=message):
        load_dataset(f"imagefolder:{root}", root=tmp_path)


def test_image_size_is_for_image_folders_only(tmp_path: Path) -> None:
    with pytest.raises(RanksearchError, match="--image-size applies to imagefolder:PATH"):
        load_dataset("fashion_mnist", root=tmp_path, image_size=64)
