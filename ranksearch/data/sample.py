"""A generated RGB image folder for trying the tool offline: Fashion-MNIST upscaled into colour, written as JPEG.

Each garment is resized to ``size`` pixels and painted onto a background whose colour and texture vary per image
(a random tint, a gradient and speckle noise), with the garment's own colour drawn per image too: the class is in
the shape, as in real photos, not in a colour shortcut. Written as ``train/CLASS/*.jpg`` and ``test/CLASS/*.jpg``
from Fashion-MNIST's own train and test images, so the two splits share no image.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ranksearch.errors import RanksearchError

FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)


def write_sample_folder(
    root: Path,
    *,
    data_root: Path,
    size: int = 224,
    train_per_class: int = 300,
    test_per_class: int = 60,
    classes: int = 10,
    seed: int = 0,
) -> dict[str, int]:
    """Write the sample folder under ``root`` (``classes`` of Fashion-MNIST's 10, the images read from
    ``data_root`` as ``--dataset fashion_mnist`` reads them); returns the images written per split."""
    from PIL import Image
    from torchvision import datasets
    from torchvision.transforms.v2 import functional as F

    from ranksearch.data import load_dataset

    if not 2 <= classes <= len(FASHION_CLASSES):
        raise RanksearchError(f"--classes {classes}: Fashion-MNIST has 10 classes; pass 2 to 10")
    for option, value in {
        "--size": size,
        "--train-per-class": train_per_class,
        "--test-per-class": test_per_class,
    }.items():
        if value <= 0:
            raise RanksearchError(f"{option} {value}: must be positive; pass a number above 0")
    load_dataset("fashion_mnist", root=data_root)  # puts the files in place (from the system package) or says how
    generator = torch.Generator().manual_seed(seed)
    written = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        source = datasets.FashionMNIST(str(data_root), train=split == "train")
        images, labels = torch.as_tensor(source.data), torch.as_tensor(source.targets)
        count = 0
        for label in range(classes):
            folder = root / split / FASHION_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for index in (labels == label).nonzero().flatten()[:per_class].tolist():
                garment = F.resize(images[index][None].float() / 255.0, [size, size], antialias=True)
                picture = _paint(garment, generator)
                Image.fromarray(picture.permute(1, 2, 0).numpy()).save(folder / f"{index:05d}.jpg", quality=90)
                count += 1
        written[split] = count
    return written


def _paint(garment: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A ``(1, S, S)`` garment mask in [0, 1] on a random textured background, as a uint8 ``(3, S, S)`` picture."""
    size = garment.shape[-1]
    background = torch.rand(3, 1, 1, generator=generator) * 0.8 + 0.1
    ramp = torch.linspace(-0.15, 0.15, size)
    direction = torch.rand(2, generator=generator) * 2 - 1
    gradient = direction[0] * ramp.view(1, -1, 1) + direction[1] * ramp.view(1, 1, -1)
    noise = torch.randn(1, size, size, generator=generator) * 0.04
    fabric = torch.rand(3, 1, 1, generator=generator)
    picture = (background + gradient + noise) * (1 - garment) + fabric * garment * (0.7 + 0.3 * garment)
    return (picture.clamp(0, 1) * 255).round().to(torch.uint8)
