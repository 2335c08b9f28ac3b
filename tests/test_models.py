"""Model building, adaptation to small images, custom factories and checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ranksearch.errors import RanksearchError
from ranksearch.models import _adapt_first_conv, build_model, load_checkpoint, model_family

FACTORY = """
from torch import nn


def make(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))


def plain():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def not_a_model(num_classes):
    return num_classes


def raises(num_classes):
    raise ValueError(f"no head for {num_classes} classes\\nsecond line")
"""


def tiny(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, num_classes))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "vgg11_bn", "efficientnet_b0"])
def test_listed_models_run_on_small_grayscale_images(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1, image_size=28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.training


def test_cifar_sized_rgb_input() -> None:
    model = build_model("vgg11_bn", num_classes=100, in_channels=3, image_size=32)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_pretrained_rgb_filters_are_averaged_for_one_channel() -> None:
    model = build_model("resnet18", num_classes=10, in_channels=3, image_size=28)
    rgb = model.conv1.weight.detach().clone()
    _adapt_first_conv(model, 1, pretrained=True)
    assert model.conv1.in_channels == 1
    torch.testing.assert_close(model.conv1.weight, rgb.mean(dim=1, keepdim=True))


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(RanksearchError, match="resnet18") as info:
        build_model("resnet19", num_classes=10, in_channels=1, image_size=28)
    assert "\n" not in str(info.value)


def test_unknown_weights_lists_known_ones() -> None:
    with pytest.raises(RanksearchError, match="IMAGENET1K_V1"):
        build_model("resnet18", num_classes=10, in_channels=1, image_size=28, weights="nope")


def test_model_too_small_for_input_is_a_clear_error() -> None:
    with pytest.raises(RanksearchError, match=r"densenet121.*1x28x28"):
        build_model("densenet121", num_classes=10, in_channels=1, image_size=28)


def test_families() -> None:
    assert model_family("resnet50") == "resnet"
    assert model_family("wide_resnet50_2") == "resnet"
    assert model_family("mobilenet_v3_small") == "mobilenet"
    assert model_family("vgg11_bn") == "vgg"
    assert model_family("efficientnet_b0") == "efficientnet"
    assert model_family("models.py:make") == "custom"
    with pytest.raises(RanksearchError, match="unknown model"):
        model_family("lenet")


def test_custom_factory_from_file_and_module(tmp_path, monkeypatch) -> None:
    (tmp_path / "mymodels.py").write_text(FACTORY)
    model = build_model(f"{tmp_path}/mymodels.py:make", num_classes=7, in_channels=1, image_size=28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    plain = build_model(f"{tmp_path}/mymodels.py:plain", num_classes=10, in_channels=1, image_size=28)
    assert isinstance(plain[1], nn.Linear)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("mymodels:make", num_classes=3, in_channels=1, image_size=28)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 3)


def test_custom_factory_errors(tmp_path) -> None:
    (tmp_path / "mymodels.py").write_text(FACTORY)
    with pytest.raises(
        RanksearchError, match="has no factory 'missing'; pick one of: make, not_a_model, plain, raises"
    ):
        build_model(f"{tmp_path}/mymodels.py:missing", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(
        RanksearchError,
        match=r"mymodels.py:raises' raised .*\(ValueError: no head for 10 classes\) .*\(num_classes=10\)",
    ) as info:
        build_model(f"{tmp_path}/mymodels.py:raises", num_classes=10, in_channels=1, image_size=28)
    assert "\n" not in str(info.value) and "second line" not in str(info.value)
    with pytest.raises(RanksearchError, match="returned int"):
        build_model(f"{tmp_path}/mymodels.py:not_a_model", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(RanksearchError, match=r"outputs \(1, 10\).*\(1, 5\)"):
        build_model(f"{tmp_path}/mymodels.py:plain", num_classes=5, in_channels=1, image_size=28)
    with pytest.raises(RanksearchError, match="does not exist"):
        build_model(f"{tmp_path}/nope.py:make", num_classes=10, in_channels=1, image_size=28)


@pytest.mark.parametrize("wrap", ["state_dict", "wrapped_state_dict", "wrapped_model", "model", "data_parallel"])
def test_checkpoint_round_trips(tmp_path, wrap: str) -> None:
    source = tiny()
    source[1].running_mean.uniform_()
    payload = {
        "state_dict": source.state_dict(),
        "wrapped_state_dict": {"state_dict": source.state_dict(), "epoch": 3},
        "wrapped_model": {"model": source},
        "model": source,
        "data_parallel": {f"module.{k}": v for k, v in source.state_dict().items()},
    }[wrap]
    torch.save(payload, tmp_path / "ckpt.pt")
    pickled_model = wrap in ("wrapped_model", "model")
    if pickled_model:  # a whole module unpickles only when trusted
        with pytest.raises(RanksearchError, match=r"ckpt.pt holds pickled objects .*Sequential.*--trust-checkpoint"):
            load_checkpoint(tiny(), tmp_path / "ckpt.pt")
    target = load_checkpoint(tiny(), tmp_path / "ckpt.pt", trust=pickled_model)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


class _RunsCode:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious checkpoint would do, made harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_an_untrusted_checkpoint_runs_no_code(tmp_path) -> None:
    marker = tmp_path / "ran"
    torch.save({"state_dict": tiny().state_dict(), "extra": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(RanksearchError, match=r"evil.pt holds pickled objects .*mkdir.*could run any code") as info:
        load_checkpoint(tiny(), tmp_path / "evil.pt")
    assert "\n" not in str(info.value) and not marker.exists()
    load_checkpoint(tiny(), tmp_path / "evil.pt", trust=True)
    assert marker.is_dir()  # trusted, it did run: the flag is the only gate


def test_mismatched_checkpoint_names_file_and_first_key(tmp_path) -> None:
    torch.save(tiny(num_classes=5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(RanksearchError, match=r"five.pt.*'3.weight' has shape \(5, 2704\)") as info:
        load_checkpoint(tiny(), tmp_path / "five.pt")
    assert "\n" not in str(info.value)
    state = tiny().state_dict()
    del state["1.running_var"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(RanksearchError, match=r"missing key '1.running_var'"):
        load_checkpoint(tiny(), tmp_path / "partial.pt")


def test_corrupt_or_missing_checkpoint(tmp_path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(RanksearchError, match=r"bad.pt is unreadable"):
        load_checkpoint(tiny(), tmp_path / "bad.pt")
    with pytest.raises(RanksearchError, match=r"nope.pt does not exist"):
        load_checkpoint(tiny(), tmp_path / "nope.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(RanksearchError, match="holds no state_dict"):
        load_checkpoint(tiny(), tmp_path / "list.pt")


TIMM_MODELS = ["resnet18", "mobilenetv3_small_050", "efficientnet_b0"]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_build_offline_and_compress(name: str) -> None:
    """``timm:NAME`` from its architecture alone (no download), for grayscale 28 px inputs; a uniform config of the
    family's search space applies and runs."""
    if not os.environ.get("CI"):  # CI installs the timm extra: there a missing timm fails
        pytest.importorskip("timm")
    from ranksearch import apply_config
    from ranksearch.search import SearchSpace, default_space_path, uniform_config
    from ranksearch.search.space import record_input_shapes

    model = build_model(f"timm:{name}", num_classes=10, in_channels=1, image_size=28).eval()
    assert model_family(f"timm:{name}") == {"resnet18": "resnet", "mobilenetv3_small_050": "mobilenet"}.get(
        name, "efficientnet"
    )
    space = SearchSpace.load(default_space_path(model_family(f"timm:{name}")))
    example = torch.randn(2, 1, 28, 28)
    slots = space.layers(model, record_input_shapes(model, example))
    assert slots, "the family's search space finds layers to compress in the timm model"
    config = uniform_config(slots, "svd", 0.5, rank_multiple=space.rank_multiple)
    assert any(choice.technique == "svd" for choice in config.layers.values())
    compressed = apply_config(model, config)
    with torch.no_grad():
        assert compressed(example).shape == (2, 10)


def test_unknown_timm_model_and_weights_are_one_line() -> None:
    if not os.environ.get("CI"):
        pytest.importorskip("timm")
    with pytest.raises(RanksearchError, match=r"unknown timm model 'resnet1800'; did you mean timm:resnet"):
        build_model("timm:resnet1800", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(RanksearchError, match=r"--weights 'IMAGENET1K_V1': timm models take --weights DEFAULT"):
        build_model("timm:resnet18", num_classes=10, in_channels=1, image_size=28, weights="IMAGENET1K_V1")
