"""Search spaces: the shipped YAML files, validation, per-layer slots, and sampling configurations with optuna."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch
import torchvision.models as tvm
import yaml
from torch import nn

import ranksearch as rs
from ranksearch.search import (
    SearchSpace,
    config_to_params,
    default_space_path,
    record_input_shapes,
    sample_config,
    uniform_config,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

FAMILIES = {
    "resnet": tvm.resnet18,
    "mobilenet": tvm.mobilenet_v2,
    "vgg": tvm.vgg11_bn,
    "efficientnet": tvm.efficientnet_b0,
    "default": tvm.resnet18,
}
LEFT_DENSE = {
    "resnet": ["conv1", "fc"],
    "mobilenet": ["features.0.0", "classifier.1"],
    "vgg": ["features.0", "classifier.6"],
    "efficientnet": ["features.0.0", "classifier.1"],
    "default": [],
}
EXAMPLE = torch.empty(1, 3, 64, 64)
FAST = ["keep", "svd", "grouped_svd", "depthwise_separable", "spatial_svd", "tucker2", "spatial_tucker2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: intra-op threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family_slots():
    """Per family: its shipped space, a shape-only (meta) torchvision model, and the model's slots."""
    out = {}
    for family, build in FAMILIES.items():
        with torch.device("meta"):
            model = build(num_classes=10)
            shapes = record_input_shapes(model, EXAMPLE.to("meta"))
        space = SearchSpace.load(default_space_path(family))
        out[family] = space, model, shapes, space.layers(model, shapes)
    return out


class TinyNet(nn.Module):
    """Stem, depthwise, grouped, pointwise and squeeze-excitation convs, then two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 48, 1)
        self.se_reduce = nn.Conv2d(48, 16, 1)
        self.se_expand = nn.Conv2d(16, 48, 1)
        self.hidden = nn.Linear(48, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(torch.relu(self.conv(torch.relu(self.grouped(self.dw(self.stem(x)))))))
        gate = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        return self.head(torch.relu(self.hidden((x * gate).mean((2, 3)))))


def tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyNet().eval(), torch.randn(4, 3, 16, 16)


def space_dict(**changes: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "layers": {"include": ["*"], "exclude": ["stem"], "types": ["Conv2d", "Linear"]},
        "techniques": {"spatial_conv": FAST, "pointwise_conv": ["keep", "svd", "tucker2"], "linear": ["keep", "svd"]},
        "ranks": [0.125, 0.25, 0.5, 0.75, 20],
        "int8": True,
        "data_aware": True,
        "rank_multiple": 4,
        "options": {"grouped_svd": {"groups": 2}, "tucker2": {"hooi_iterations": 1}},
    }
    raw.update(changes)
    return raw


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_space_yields_slots(family_slots, family):
    _, model, _, slots = family_slots[family]
    assert slots, f"{family}: no searchable layer"
    modules = dict(model.named_modules())
    names = [n for n, m in model.named_modules() if n in slots]
    assert list(slots) == names  # module order
    for name, slot in slots.items():
        layer = modules[name]
        assert set(slot.techniques) - {"keep"}, name
        assert tuple(slot.ranks) == slot.techniques
        assert all(rs.get_technique(t).unsupported_reason(layer) is None for t in slot.techniques)
        assert not (isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels > 1), "depthwise searched"
    assert not set(LEFT_DENSE[family]) & set(slots)
    if family == "vgg":
        assert {"classifier.0", "classifier.3"} <= set(slots)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_choice_is_larger_and_none_repeats(family_slots, family):
    space, model, shapes, slots = family_slots[family]
    modules = dict(model.named_modules())
    for name, slot in slots.items():
        for technique in slot.techniques:
            resolved = []
            for rank in slot.ranks[technique]:
                report = rs.cost_report(
                    modules[name],
                    technique,
                    rank,
                    shapes[name],
                    rank_multiple=space.rank_multiple,
                    **slot.options[technique],
                )
                assert not report.larger, (name, technique, rank)
                resolved.append(report.ranks)
            assert len(set(resolved)) == len(resolved), (name, technique)


def test_default_space_path():
    assert default_space_path("resnet").name == "resnet.yaml"
    assert default_space_path("resnet18").name == "resnet.yaml"
    assert default_space_path("mobilenet_v2").name == "mobilenet.yaml"
    assert default_space_path("efficientnet_b0").name == "efficientnet.yaml"
    assert default_space_path("my_custom_net").name == "default.yaml"


def test_tiny_model_never_crashes_and_skips_what_cannot_shrink():
    model, x = tiny()
    slots = SearchSpace.from_dict(space_dict()).layers(model, record_input_shapes(model, x))
    assert "stem" not in slots and "dw" not in slots  # excluded; depthwise has only keep
    grouped = slots["grouped"]
    assert "svd" in grouped.techniques and "spatial_svd" in grouped.techniques
    assert not {"tucker2", "grouped_svd", "depthwise_separable", "spatial_tucker2"} & set(grouped.techniques)
    assert slots["se_reduce"].kind == "pointwise_conv" and slots["hidden"].kind == "linear"
    assert 20 in slots["conv"].ranks["svd"]  # absolute rank below the full rank of 32
    assert 20 not in slots["se_reduce"].ranks["svd"]  # above the full rank of 16
    assert len(set(slots["se_reduce"].ranks["svd"])) < 4  # fractions rounding to the same rank count once
    assert not slots["hidden"].offers_data_aware("keep") and slots["hidden"].offers_data_aware("svd")


def test_record_input_shapes_restores_modes():
    model, x = tiny()
    model.train()
    model.dw.eval()
    shapes = record_input_shapes(model, x)
    assert shapes["stem"] == (4, 3, 16, 16) and shapes["hidden"] == (4, 48) and shapes["se_expand"] == (4, 16, 1, 1)
    assert model.training and model.conv.training and not model.dw.training


def check_error(raw: object, *fragments: str) -> None:
    with pytest.raises(rs.RanksearchError) as info:
        SearchSpace.from_dict(raw, source="space.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("search space space.yaml: ")
    for fragment in fragments:
        assert fragment in message, message


BAD = {
    "not_mapping": ([1, 2], "expected a mapping"),
    "unknown_top_key": (space_dict(rank=[0.5]), "rank: unknown key", "did you mean 'ranks'"),
    "unknown_layers_key": (space_dict(layers={"includes": ["*"]}), "layers.includes", "'include'"),
    "include_not_list": (space_dict(layers={"include": "conv"}), "layers.include", "write it like"),
    "unknown_type": (space_dict(layers={"types": ["Conv2D"]}), "layers.types[0]", "did you mean 'Conv2d'"),
    "no_techniques": ({"ranks": [0.5]}, "techniques: missing"),
    "empty_techniques": (space_dict(techniques={}), "techniques: no kind", "list e.g."),
    "empty_technique_list": (space_dict(techniques={"linear": []}), "techniques.linear", "non-empty list"),
    "unknown_kind": (space_dict(techniques={"conv": ["svd"]}), "techniques.conv: unknown key", "allowed:"),
    "unknown_technique": (space_dict(techniques={"linear": ["keep", "svdd"]}), "techniques.linear[1]", "'svd'"),
    "unknown_far_technique": (space_dict(techniques={"linear": ["magic"]}), "magic", "known: keep, svd"),
    "duplicate_technique": (space_dict(techniques={"linear": ["svd", "svd"]}), "listed twice", "remove"),
    "incompatible": (
        space_dict(techniques={"pointwise_conv": ["depthwise_separable"]}),
        "techniques.pointwise_conv[0]",
        "cannot replace",
    ),
    "kind_without_type": (
        space_dict(layers={"types": ["Conv2d"]}),
        "techniques.linear",
        "add it there or remove",
    ),
    "rank_above_one": (space_dict(ranks=[0.5, 1.5]), "ranks[1]", "outside (0, 1]", "int >= 2"),
    "rank_zero": (space_dict(ranks=[0.0]), "ranks[0]", "outside (0, 1]"),
    "rank_negative": (space_dict(ranks=[-8]), "ranks[0]", "below 2"),
    "rank_int_one": (space_dict(ranks=[1]), "ranks[0]", "write 1.0 for full rank"),
    "rank_string": (space_dict(ranks=["half"]), "ranks[0]", "fraction of full rank"),
    "rank_bool": (space_dict(ranks=[True]), "ranks[0]", "is not a rank"),
    "rank_duplicate": (space_dict(ranks=[0.5, 0.5]), "ranks[1]", "remove the duplicate"),
    "ranks_empty": (space_dict(ranks=[]), "ranks:", "write e.g."),
    "ranks_missing": ({"techniques": {"linear": ["keep", "svd"]}}, "ranks: missing", "add e.g."),
    "ranks_kind_missing": (space_dict(ranks={"linear": [0.5]}), "ranks.spatial_conv: missing", "add a rank list"),
    "ranks_unused_kind": (
        {"techniques": {"linear": ["svd"]}, "ranks": {"linear": [0.5], "spatial_conv": [0.5]}},
        "ranks.spatial_conv",
        "remove it",
    ),
    "int8_not_bool": (space_dict(int8="yes"), "int8:", "write true or false"),
    "data_aware_not_bool": (space_dict(data_aware=1), "data_aware:", "true or false"),
    "rank_multiple_zero": (space_dict(rank_multiple=0), "rank_multiple:", "write e.g. 8"),
    "rank_multiple_str": (space_dict(rank_multiple="8"), "rank_multiple:", "int >= 1"),
    "option_unknown": (space_dict(options={"grouped_svd": {"group": 2}}), "options.grouped_svd.group", "'groups'"),
    "option_type": (space_dict(options={"grouped_svd": {"groups": "two"}}), "options.grouped_svd.groups", "e.g. 2"),
    "option_unlisted": (space_dict(options={"cp": {"seed": 1}}), "options.cp", "list it or remove"),
    "option_no_options": (space_dict(options={"svd": {"x": 1}}), "options.svd", "takes no options"),
    "option_unknown_technique": (space_dict(options={"tuker2": {}}), "options.tuker2", "'tucker2'"),
}


@pytest.mark.parametrize("case", BAD)
def test_validation_errors(case):
    raw, *fragments = BAD[case]
    check_error(raw, *fragments)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(rs.RanksearchError, match=r"missing\.yaml: cannot be read"):
        SearchSpace.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("techniques: [unclosed\n")
    with pytest.raises(rs.RanksearchError, match=r"bad\.yaml: not valid YAML") as info:
        SearchSpace.load(bad)
    assert "\n" not in str(info.value)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(space_dict(int8="no")))
    with pytest.raises(rs.RanksearchError, match=r"^search space .*wrong\.yaml: int8: "):
        SearchSpace.load(wrong)


def test_include_pattern_matching_no_layer():
    model, x = tiny()
    space = SearchSpace.from_dict(space_dict(layers={"include": ["conv", "hiden"]}), source="s.yaml")
    with pytest.raises(rs.RanksearchError, match=r"s\.yaml: layers.include: pattern 'hiden' .*did you mean 'hidden'"):
        space.layers(model, record_input_shapes(model, x))


def test_missing_or_wrong_input_shape():
    model, x = tiny()
    space = SearchSpace.from_dict(space_dict())
    shapes = record_input_shapes(model, x)
    with pytest.raises(rs.RanksearchError, match=r"layer 'conv': no input shape recorded; pass input_shapes="):
        space.layers(model, {n: s for n, s in shapes.items() if n != "conv"})
    with pytest.raises(rs.RanksearchError, match="does not fit"):
        space.layers(model, {**shapes, "conv": (4, 7, 16, 16)})


def sampled_configs(slots, rank_multiple, n_trials, calib, model):
    """Run a real two-objective study: every sampled config must apply and run."""
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    configs = []
    for _ in range(n_trials):
        trial = study.ask()
        config = sample_config(trial, slots, rank_multiple=rank_multiple)
        compressed = rs.apply_config(model, config, calib_inputs=calib)
        assert compressed(calib).shape == model(calib).shape
        params = sum(p.numel() for p in compressed.parameters())
        study.tell(trial, [params, len(trial.params)])
        configs.append(config)
    return study, configs


def test_sample_config_applies_on_tiny_model():
    model, x = tiny()
    space = SearchSpace.from_dict(space_dict())
    slots = space.layers(model, record_input_shapes(model, x))
    _, configs = sampled_configs(slots, space.rank_multiple, 12, x, model)
    chosen = {(n, c.technique) for config in configs for n, c in config.layers.items()}
    assert len({t for _, t in chosen}) >= 5
    assert any(c.int8 for config in configs for c in config.layers.values())
    assert any(c.data_aware for config in configs for c in config.layers.values())
    for config in configs:
        assert set(config.layers) == set(slots) and config.rank_multiple == 4
        for name, choice in config.layers.items():
            assert choice.technique in slots[name].techniques
            assert choice.rank is None or choice.rank in slots[name].ranks[choice.technique]
            if choice.technique == "tucker2":
                assert choice.options == {"hooi_iterations": 1}


def test_sample_config_applies_on_resnet18():
    torch.manual_seed(0)
    model = tvm.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    raw = yaml.safe_load(default_space_path("resnet").read_text())
    raw["layers"]["include"] = ["layer1.0.*", "layer2.0.*"]
    raw["techniques"]["spatial_conv"] = FAST  # cp (CP-ALS) is too slow for a unit test
    raw["options"].pop("cp", None)
    space = SearchSpace.from_dict(raw, source="resnet-fast")
    slots = space.layers(model, record_input_shapes(model, x))
    assert list(slots) == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer2.0.downsample.0",
    ]
    sampled_configs(slots, space.rank_multiple, 4, x, model)


def test_enqueued_params_reproduce_the_config():
    model, x = tiny()
    space = SearchSpace.from_dict(space_dict())
    slots = space.layers(model, record_input_shapes(model, x))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    random_configs = []
    for _ in range(5):
        trial = study.ask()
        random_configs.append(sample_config(trial, slots, rank_multiple=4))
        study.tell(trial, [1.0, 1.0])
    anchors = [
        uniform_config(slots, "keep", rank_multiple=4),
        uniform_config(slots, "svd", 0.5, rank_multiple=4),
        uniform_config(slots, "tucker2", 0.25, rank_multiple=4),
    ]
    for config in [*anchors, *random_configs]:
        study.enqueue_trial(config_to_params(config, slots))
        trial = study.ask()
        assert sample_config(trial, slots, rank_multiple=4) == config
        study.tell(trial, [1.0, 1.0])


def test_uniform_config_falls_back_to_keep():
    model, x = tiny()
    slots = SearchSpace.from_dict(space_dict()).layers(model, record_input_shapes(model, x))
    config = uniform_config(slots, "spatial_svd", 0.5, rank_multiple=4)
    assert set(config.layers) == set(slots)
    for name, choice in config.layers.items():
        if "spatial_svd" in slots[name].techniques and 0.5 in slots[name].ranks["spatial_svd"]:
            assert choice == rs.LayerChoice("spatial_svd", 0.5)
        else:
            assert choice == rs.LayerChoice("keep")
    assert config.layers["conv"].technique == "spatial_svd" and config.layers["hidden"].technique == "keep"
    grouped = uniform_config(slots, "grouped_svd", 0.5, rank_multiple=4)
    assert grouped.layers["conv"].options == {"groups": 2}
    rs.apply_config(model, config)(x)
    with pytest.raises(rs.RanksearchError, match="'svd' needs a rank choice"):
        uniform_config(slots, "svd", rank_multiple=4)
    with pytest.raises(rs.RanksearchError, match="'keep' takes no rank"):
        uniform_config(slots, "keep", 0.5, rank_multiple=4)


def test_config_to_params_rejects_what_the_space_cannot_sample():
    model, x = tiny()
    slots = SearchSpace.from_dict(space_dict(int8=False)).layers(model, record_input_shapes(model, x))
    base = uniform_config(slots, "keep", rank_multiple=4)
    bad = {
        "technique 'tucker2': not offered": {"hidden": rs.LayerChoice("tucker2", 0.5)},
        "rank 0.3 is not a choice; pick one of": {"conv": rs.LayerChoice("svd", 0.3)},
        "int8 is not offered here; set int8 to false": {"conv": rs.LayerChoice("svd", 0.5, int8=True)},
        "data_aware is not offered": {"conv": rs.LayerChoice("keep", data_aware=True)},
        "differ from the search space's": {"conv": rs.LayerChoice("grouped_svd", 0.5, options={"groups": 4})},
        "does not search": {"stem": rs.LayerChoice("keep")},
    }
    for fragment, change in bad.items():
        config = dataclasses.replace(base, layers={**base.layers, **change})
        with pytest.raises(rs.RanksearchError, match=fragment):
            config_to_params(config, slots)
