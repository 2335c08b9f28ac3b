"""apply_config: a replayable record keyed by module names, re-applied to fresh models."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import ranksearch as rs

CONFIG = {
    "rank_multiple": 8,
    "layers": {
        "layer1.0.conv1": {"technique": "svd", "rank": 0.5},
        "layer1.0.conv2": {"technique": "tucker2", "rank": [0.25, 0.5]},
        "layer2.0.downsample.0": {"technique": "svd", "rank": 16},
        "layer2.1.conv2": {"technique": "spatial_svd", "rank": 0.25},
        "layer4.0.conv1": {"technique": "depthwise_separable", "rank": 2},
        "fc": {"technique": "svd", "rank": 4},
    },
}


def fresh_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10).eval()


def structure(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def test_config_reproduces_structure_on_a_fresh_model() -> None:
    first = rs.apply_config(fresh_model(0), CONFIG)
    second = rs.apply_config(fresh_model(1), CONFIG)
    assert structure(first) == structure(second)
    assert isinstance(first.layer1[0].conv2, rs.CompressedLayer)
    assert first.layer1[0].conv2.ranks == (16, 32)
    assert first.fc[0].out_features == 4


def test_does_not_mutate_input_unless_asked() -> None:
    model = fresh_model()
    before = structure(model)
    rs.apply_config(model, CONFIG)
    assert structure(model) == before
    rs.apply_config(model, CONFIG, inplace=True)
    assert structure(model) != before


def test_full_rank_config_keeps_the_outputs() -> None:
    model = fresh_model().double()
    config = {
        "layers": {"layer2.0.conv1": {"technique": "svd", "rank": 1.0}, "fc": {"technique": "tucker2", "rank": 1.0}}
    }
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(rs.apply_config(model, config)(x), model(x))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_round_trip(tmp_path, suffix: str) -> None:
    config = rs.CompressionConfig.from_dict(CONFIG)
    path = config.save(tmp_path / f"config{suffix}")
    assert rs.CompressionConfig.load(path) == config
    assert structure(rs.apply_config(fresh_model(), path)) == structure(rs.apply_config(fresh_model(), CONFIG))


def test_missing_layer_names_it_and_suggests() -> None:
    with pytest.raises(ValueError, match=r"layer 'layer1\.0\.conv3'.*did you mean 'layer1\.0\.conv") as info:
        rs.apply_config(fresh_model(), {"layers": {"layer1.0.conv3": {"technique": "svd", "rank": 0.5}}})
    assert "\n" not in str(info.value)


def test_bad_choice_names_layer_and_technique() -> None:
    with pytest.raises(ValueError, match=r"layer layer1\.0\.conv1: technique 'svd': rank 999 is above") as info:
        rs.apply_config(fresh_model(), {"layers": {"layer1.0.conv1": {"technique": "svd", "rank": 999}}})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"layers": {"fc": {"rank": 2}}}, "'technique' key"),
        ({"layers": {"fc": {"technique": "svd", "rnak": 2}}}, "unknown key"),
        ({"nothing": 1}, "'layers' mapping"),
        ({"version": 99, "layers": {}}, "format version 99"),
    ],
)
def test_malformed_config(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rs.apply_config(fresh_model(), raw)


def test_unreadable_config_file(tmp_path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid json"):
        rs.apply_config(fresh_model(), bad)
    with pytest.raises(ValueError, match="cannot be read"):
        rs.apply_config(fresh_model(), tmp_path / "missing.json")


def test_data_aware_layers_capture_inputs_from_the_model() -> None:
    model = fresh_model()
    model.train()
    running_mean = model.bn1.running_mean.clone()
    config = {"layers": {"layer2.0.conv2": {"technique": "svd", "rank": 0.25, "data_aware": True}}}
    with pytest.raises(ValueError, match="calib_inputs"):
        rs.apply_config(model, config)
    compressed = rs.apply_config(model, config, calib_inputs=torch.randn(4, 3, 32, 32))
    assert compressed.training
    torch.testing.assert_close(model.bn1.running_mean, running_mean)


def test_random_init_builds_the_structure_for_training() -> None:
    decomposed = rs.apply_config(fresh_model(), CONFIG)
    fresh = rs.apply_config(fresh_model(), CONFIG, init="random")
    assert structure(fresh) == structure(decomposed)


def test_saved_config_is_plain_json(tmp_path) -> None:
    path = rs.CompressionConfig.from_dict(CONFIG).save(tmp_path / "c.json")
    raw = json.loads(path.read_text())
    assert raw["layers"]["layer1.0.conv2"] == {"technique": "tucker2", "rank": [0.25, 0.5]}
    assert not list(tmp_path.glob(".*.tmp"))
